"""Types of the compiled codec (schemas/_codec_fast.pyx); see its docstring for what it does."""

from collections.abc import Callable, Sequence
from typing import Any

from schemas.errors import RequestError
from schemas.messages import Request

def decode_requests(
    values: Sequence[bytes], slow: Callable[[bytes], Request | RequestError]
) -> list[Request | RequestError]: ...
def bytes_cells(arr: Any) -> list[bytes] | None: ...
def classify(record: bytes) -> Request | str: ...
def encode_results(
    header: bytes,
    head: bytes,
    tensors: list[tuple[bytes, int, bytes | None, list[bytes] | None]],
    rids: Sequence[str],
    timings: Sequence[tuple[float, float, float, float, float]],
    batch_size: int,
    topics: Sequence[str],
    partitions: Sequence[int],
    offsets: Sequence[int],
    row: Callable[[int], bytes],
) -> list[bytes]: ...
def match_signatures(
    items: Sequence[Request | RequestError],
    table: dict[
        str, tuple[int, str, tuple[str, ...], tuple[Any, ...], tuple[tuple[int, ...], ...]]
    ],
) -> list[int]: ...
