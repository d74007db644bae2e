"""A finished batch's per-row passes, one call per batch: compiled where pip built them.

`OutcomeEncoder.results` needs, for every row of a batch, the fields its result is
encoded from (the request's id, its timings, where its record came from) and then an
`Outcome` per row. Written as Python loops they cost ~0.5 µs a row on a model's thread,
which holds the GIL the Kafka loop needs too. As in `pipeline.engine.rows`, each pass is
written twice: here in Python, the reference, and in Cython
(`pipeline/serving/_outcomes_fast.pyx`, built by ``pip install`` with the machine's C
compiler), one C loop that reads the same fields and builds the same objects (an
`Outcome` filled from C, schemas/_slots.pxi). `COMPILED` says which serves
(tests/pipeline/serving/test_result_rows.py checks the two agree under hypothesis).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from schemas.messages import Envelope

__all__ = ["COMPILED", "ResultFields", "outcomes", "result_fields"]

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


try:
    from pipeline.serving import _outcomes_fast
except ImportError:  # built without a C compiler: the reference serves
    _outcomes_fast = None  # type: ignore[assignment]

COMPILED: bool = _outcomes_fast is not None
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
    if _outcomes_fast is not None and type(rows) is list:
        return ResultFields(
            *_outcomes_fast.result_fields(rows, started, now_ms, pre_ms, compute_ms, post_ms)
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
    if _outcomes_fast is not None and type(rows) is list and type(values) is list:
        return _outcomes_fast.outcomes(cls, rows, values, output, replies, model)
    return _outcomes(cls, rows, values, output, replies, model)
