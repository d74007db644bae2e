"""Types of the compiled batch passes (pipeline/serving/_batch_rows_fast.pyx); see batch_rows.py."""

from typing import Any

import numpy as np

def result_fields(
    rows: list[Any],
    started: float,
    now_ms: float,
    pre_ms: float,
    compute_ms: float,
    post_ms: float,
) -> tuple[
    list[str],
    list[tuple[float, float, float, float, float]],
    list[str],
    list[int],
    list[int],
    bool,
]: ...
def outcomes(
    cls: type[Any], rows: list[Any], values: list[bytes], output: str, replies: bool, model: str
) -> tuple[list[Any], list[int]]: ...
def no_deadlines(rows: list[Any]) -> bool: ...
def ages(rows: list[Any], now_ms: float) -> list[float]: ...
def inputs(rows: list[Any], name: str) -> list[Any]: ...
def gather(arrays: list[np.ndarray[Any, Any]]) -> np.ndarray[Any, Any] | None: ...
