"""Which decoded requests fit their model's one exact input signature, a batch at a time.

Most served models take tensors of one fixed signature (names, datatypes, shapes). For
them, routing a consumed batch comes down to one question per request: is it a request
for a served model (and version) whose inputs are exactly that signature? Asked in
Python, per row, it cost the Kafka loop ~0.4 µs a request (`ModelRoute.batch_key`); the
compiled codec answers it for the whole batch in one call. Requests that fail the
question are not refused here: they take the full routing path, which names what is
wrong (`pipeline.serving.routing`).

`match_signatures` here is the reference; the compiled one must answer exactly as it
does (tests/schemas/test_signatures.py, hypothesis).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import numpy as np

from schemas.errors import RequestError
from schemas.messages import Request

try:
    from schemas import _codec_fast
except ImportError:  # built without a compiler: the reference below answers
    _codec_fast = None  # type: ignore[assignment]

__all__ = ["Signature", "match_signatures"]

Signature: TypeAlias = tuple[
    int, str, tuple[str, ...], tuple[np.dtype[Any], ...], tuple[tuple[int, ...], ...]
]
"""A model's exact signature: (its index, its version, input names, dtypes, shapes)."""


def match_signatures(
    items: Sequence[Request | RequestError],
    table: Mapping[str, Signature],
    compiled: bool = True,
) -> list[int]:
    """Per item: its model's index when it fits that model's exact signature, else -1.

    An item fits when it is a `Request`, its model is in ``table``, its version is
    unset, empty or the table's, and its inputs are exactly the table's names, each of
    the table's dtype and shape. ``compiled``: use the compiled codec where it was built.
    """
    if compiled and _codec_fast is not None:
        out: list[int] = _codec_fast.match_signatures(
            items, table if type(table) is dict else dict(table)
        )
        return out
    return [_match(r, table) for r in items]


def _match(r: Request | RequestError, table: Mapping[str, Signature]) -> int:
    if type(r) is not Request:
        return -1
    entry = table.get(r.model)
    if entry is None:
        return -1
    index, version, names, dtypes, shapes = entry
    if r.model_version not in (None, "", version):
        return -1
    inputs = r.inputs
    if len(inputs) != len(names):
        return -1
    for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
        arr = inputs.get(name)
        if not isinstance(arr, np.ndarray) or arr.dtype != dtype or arr.shape != shape:
            return -1
    return index
