"""Types of the compiled result passes (pipeline/serving/_outcomes_fast.pyx); see result_rows.py."""

from typing import Any

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
