"""Types of the compiled row passes (pipeline/engine/_rows_fast.pyx); see rows.py."""

from collections.abc import Callable, Sequence
from typing import Any

def read_run(
    run: list[Any],
) -> tuple[
    list[int], list[bytes | None], list[bytes | None], list[int], list[int], bool, bool, bool
]: ...
def envelopes(
    cls: type[Any],
    topic: str,
    partition: int,
    generation: int,
    now: float,
    keys: Sequence[bytes | None],
    values: Sequence[bytes],
    offsets: Sequence[int],
    stamps: Sequence[int],
) -> list[Any]: ...
def offset_runs(outcomes: list[Any]) -> dict[tuple[str, int, int], list[int]]: ...
def kinds(outcomes: list[Any]) -> dict[tuple[str, str, str | None, str], int]: ...
def partition_runs(msgs: list[Any]) -> list[tuple[bool, str | None, int | None, int, int]]: ...
def produce_plain(produce: Callable[..., None], outcomes: list[Any], start: int) -> int: ...
def bind_layouts(outcome_cls: type[Any], envelope_cls: type[Any]) -> None: ...
