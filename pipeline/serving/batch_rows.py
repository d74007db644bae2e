"""A batch's per-row passes on the model side: one call per batch, compiled where pip built them.

A model's threads read every row of a batch a few times: for its tensors (joined into
one array per input), its deadline and age, then the fields its result is encoded from
(the request's id, its timings, where its record came from), and they make an `Outcome`
per row. Written as Python loops, and NumPy joining hundreds of small arrays, that cost
~1 µs a row on threads that hold the GIL the Kafka loop needs too. As in
`pipeline.engine.rows`, each pass is written twice: here in Python, the reference, and in
Cython (`pipeline/serving/_batch_rows_fast.pyx`, built by ``pip install`` with the
machine's C compiler), one C loop that reads the same fields (at their slots' offsets,
schemas/_slots.pxi) and builds the same objects. `COMPILED` says which serves
(tests/pipeline/serving/test_batch_rows.py checks the two agree under hypothesis).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from schemas.messages import Envelope

__all__ = [
    "COMPILED",
    "ResultFields",
    "ages",
    "gather",
    "inputs",
    "no_deadlines",
    "outcomes",
    "result_fields",
]

Timings = tuple[float, float, float, float, float]


class ResultFields(NamedTuple):
    """What each row's result is encoded from, a column per field.

    ``timings``: (queue, preprocess, compute, postprocess, end to end) in ms, the
    schema's order; ``other_encoding``: some row's request was not Avro (its result may
    go out as JSON or Protobuf).
    """

    ids: list[str]
    timings: list[Timings]
    topics: list[str]
    partitions: list[int]
    offsets: list[int]
    other_encoding: bool


def _result_fields(
    rows: Sequence[Envelope],
    started: float,
    now_ms: float,
    pre_ms: float,
    compute_ms: float,
    post_ms: float,
) -> ResultFields:
    return ResultFields(
        [env.request.id for env in rows],  # type: ignore[union-attr]  # served rows: decoded
        [
            (
                (started - env.consumed_at) * 1000.0,
                pre_ms,
                compute_ms,
                post_ms,
                now_ms - env.timestamp_ms,
            )
            for env in rows
        ],
        [env.topic for env in rows],
        [env.partition for env in rows],
        [env.offset for env in rows],
        any(env.encoding for env in rows),
    )


def _outcomes(
    cls: type[Any],
    rows: Sequence[Envelope],
    values: Sequence[bytes],
    output: str,
    replies: bool,
    model: str,
) -> tuple[list[Any], list[int]]:
    made = [
        cls(env, (replies and env.request.reply_topic) or output, value, None, None, model)  # type: ignore[union-attr]
        for env, value in zip(rows, values, strict=True)
    ]
    return made, [i for i, env in enumerate(rows) if env.headers]


def _no_deadlines(rows: Sequence[Envelope]) -> bool:
    return all(r.request is None or r.request.deadline_ms is None for r in rows)


def _ages(rows: Sequence[Envelope], now_ms: float) -> list[float]:
    return [(now_ms - r.timestamp_ms) / 1000.0 for r in rows]


def _inputs(rows: Sequence[Envelope], name: str) -> list[Any]:
    return list(map(operator.itemgetter(name), map(_INPUTS, rows)))


_INPUTS = operator.attrgetter("request.inputs")


try:
    from pipeline.serving import _batch_rows_fast
except ImportError:  # built without a C compiler: the reference serves
    _batch_rows_fast = None  # type: ignore[assignment]

COMPILED: bool = _batch_rows_fast is not None
"""Whether the compiled passes serve (else the Python reference does)."""


def result_fields(
    rows: Sequence[Envelope],
    started: float,
    now_ms: float,
    pre_ms: float,
    compute_ms: float,
    post_ms: float,
) -> ResultFields:
    """The fields each row's result is encoded from.

    ``started``: the monotonic time the batch left the batcher; ``now_ms``: wall-clock
    ms now; the three phase times are the batch's.
    """
    if _batch_rows_fast is not None and type(rows) is list:
        return ResultFields(
            *_batch_rows_fast.result_fields(rows, started, now_ms, pre_ms, compute_ms, post_ms)
        )
    return _result_fields(rows, started, now_ms, pre_ms, compute_ms, post_ms)


def outcomes(
    cls: type[Any],
    rows: Sequence[Envelope],
    values: Sequence[bytes],
    output: str,
    replies: bool,
    model: str,
) -> tuple[list[Any], list[int]]:
    """``cls(env, topic, value, None, None, model)`` per row, and the rows with headers.

    The topic is the request's reply topic when ``replies`` and it names one, else
    ``output``. The caller sets the outcomes' headers of the rows listed (few have any).
    """
    if _batch_rows_fast is not None and type(rows) is list and type(values) is list:
        return _batch_rows_fast.outcomes(cls, rows, values, output, replies, model)
    return _outcomes(cls, rows, values, output, replies, model)


def no_deadlines(rows: Sequence[Envelope]) -> bool:
    """Whether no row's request has a deadline (a row without a request has none)."""
    if _batch_rows_fast is not None and type(rows) is list:
        return _batch_rows_fast.no_deadlines(rows)
    return _no_deadlines(rows)


def ages(rows: Sequence[Envelope], now_ms: float) -> list[float]:
    """Each row's age in seconds at wall-clock ``now_ms``, from its record's timestamp."""
    if _batch_rows_fast is not None and type(rows) is list:
        return _batch_rows_fast.ages(rows, now_ms)
    return _ages(rows, now_ms)


def inputs(rows: Sequence[Envelope], name: str) -> list[Any]:
    """Every row's tensor ``name`` (rows a model serves: decoded, with that input)."""
    if _batch_rows_fast is not None and type(rows) is list:
        return _batch_rows_fast.inputs(rows, name)
    return _inputs(rows, name)


def gather(arrays: list[np.ndarray[Any, Any]]) -> np.ndarray[Any, Any] | None:
    """The arrays end to end under a batch dimension, one memcpy each; or None.

    None where that does not apply (not all C-contiguous arrays of one very dtype, in
    native byte order and without objects, and one shape; scalars) or the pass was not
    compiled: the caller joins them with NumPy (`pipeline.serving.steps.stack_rows`).
    """
    if _batch_rows_fast is not None:
        return _batch_rows_fast.gather(arrays)
    return None
