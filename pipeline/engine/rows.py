"""The Kafka loop's per-record passes, one call per batch: compiled where pip built them.

A consumed batch is thousands of records, and each pass over them in Python (reading a
field of every `Message`, making every `Envelope`, grouping every delivered outcome's
offset) costs ~0.1–0.3 µs a record on the one thread that holds the GIL. These passes are
written here twice: in Python, the reference, and in Cython (`pipeline/engine/_rows_fast.pyx`,
built by ``pip install`` with the machine's C compiler, like the codec), which reads the
same fields and builds the same objects in one C loop. `COMPILED` says which serves; where
no compiler existed the Python one does, with the same results
(tests/pipeline/engine/test_rows.py checks the two agree under hypothesis).
"""

from __future__ import annotations

import operator
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

from confluent_kafka import KafkaException, Message

from pipeline.serving.outcomes import Outcome
from schemas.messages import Envelope

__all__ = [
    "COMPILED",
    "RunColumns",
    "envelopes",
    "kinds",
    "offset_runs",
    "partition_runs",
    "produce_plain",
    "read_run",
]


class RunColumns(NamedTuple):
    """What a run of one partition's records holds, a column per field.

    ``values`` keeps a tombstone's None (its size is 0); ``ordered``:
    every offset is past the one before it; ``tombstones``/``headers``: some record has
    no value / has headers.
    """

    offsets: list[int]
    values: list[bytes | None]
    keys: list[bytes | None]
    stamps: list[int]
    sizes: list[int]
    ordered: bool
    tombstones: bool
    headers: bool


def _read_run(run: list[Message]) -> RunColumns:
    offsets = [cast(int, m.offset()) for m in run]
    values = [m.value() for m in run]
    keys = [m.key() for m in run]
    stamps = [m.timestamp()[1] for m in run]
    return RunColumns(
        offsets,
        values,
        keys,
        stamps,
        [len(v) if v else 0 for v in values],
        all(map(operator.lt, offsets, offsets[1:])),
        None in values,
        any([m.headers() for m in run]),
    )


def _envelopes(
    topic: str,
    partition: int,
    generation: int,
    now: float,
    keys: Sequence[bytes | None],
    values: Sequence[bytes],
    offsets: Sequence[int],
    stamps: Sequence[int],
) -> list[Envelope]:
    return [
        Envelope(topic, partition, offset, key, value, stamp, now, generation)
        for key, value, offset, stamp in zip(keys, values, offsets, stamps, strict=True)
    ]


# An outcome's (topic, partition, generation) and offset, read in C.
_RUN = operator.attrgetter("envelope.topic", "envelope.partition", "envelope.generation")
_OFFSET = operator.attrgetter("envelope.offset")


def _offset_runs(outcomes: Sequence[Any]) -> dict[tuple[str, int, int], list[int]]:
    runs: defaultdict[tuple[str, int, int], list[int]] = defaultdict(list)
    for key, offset in zip(map(_RUN, outcomes), map(_OFFSET, outcomes), strict=True):
        runs[key].append(offset)
    return dict(runs)


Run = tuple[bool, str | None, int | None, int, int]
"""Consecutive consumed messages of one partition: (failed, topic, partition, start, stop).

``failed``: they are errors, not records (their topic and partition as the error has
them); ``msgs[start:stop]`` are the run."""


def _partition_runs(msgs: Sequence[Message]) -> list[Run]:
    keys = [(m.error() is not None, m.topic(), m.partition()) for m in msgs]
    out: list[Run] = []
    start = 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[start]:
            out.append((*keys[start], start, i))
            start = i
    return out


REFUSED_AT_PRODUCE = (BufferError, KafkaException, ValueError, TypeError)
"""What ``Producer.produce`` raises for a record it does not take: a full queue, a record
too large or a topic it cannot name (refused before sending), arguments it cannot read."""


def _produce_plain(produce: Callable[..., None], outcomes: list[Any], start: int) -> int:
    for i in range(start, len(outcomes)):
        out = outcomes[i]
        if out.headers is not None:
            return i
        try:
            produce(out.topic, out.value, out.envelope.key)
        except REFUSED_AT_PRODUCE:
            return i
    return len(outcomes)


# What an acknowledged outcome is counted by: (topic, model, reason, status).
_KIND = operator.attrgetter("topic", "model", "reason", "status")


def _kinds(outcomes: Sequence[Any]) -> dict[tuple[str, str, str | None, str], int]:
    return dict(Counter(map(_KIND, outcomes)))


try:
    from pipeline.engine import _rows_fast
except ImportError:  # built without a C compiler: the reference serves
    _rows_fast = None  # type: ignore[assignment]

COMPILED: bool = _rows_fast is not None
if _rows_fast is not None:  # outcomes and envelopes are read at their slots
    _rows_fast.bind_layouts(Outcome, Envelope)
"""Whether the compiled passes serve (else the Python reference does)."""


def read_run(run: list[Message]) -> RunColumns:
    """The fields of a run of records (one partition's, in consumed order), read once."""
    if _rows_fast is not None:
        return RunColumns(*_rows_fast.read_run(run))
    return _read_run(run)


def envelopes(
    topic: str,
    partition: int,
    generation: int,
    now: float,
    keys: Sequence[bytes | None],
    values: Sequence[bytes],
    offsets: Sequence[int],
    stamps: Sequence[int],
) -> list[Envelope]:
    """An `Envelope` per record of one partition's run (``values`` without tombstones)."""
    if _rows_fast is not None:
        return cast(
            list[Envelope],
            _rows_fast.envelopes(
                Envelope, topic, partition, generation, now, keys, values, offsets, stamps
            ),
        )
    return _envelopes(topic, partition, generation, now, keys, values, offsets, stamps)


def offset_runs(outcomes: Sequence[Any]) -> dict[tuple[str, int, int], list[int]]:
    """Delivered outcomes' offsets by (topic, partition, generation), in their order."""
    if _rows_fast is not None and type(outcomes) is list:
        return _rows_fast.offset_runs(outcomes)
    return _offset_runs(outcomes)


def kinds(outcomes: Sequence[Any]) -> dict[tuple[str, str, str | None, str], int]:
    """Outcomes counted by (topic, model, reason, status), keys in first-seen order."""
    if _rows_fast is not None and type(outcomes) is list:
        return _rows_fast.kinds(outcomes)
    return _kinds(outcomes)


def partition_runs(msgs: list[Message]) -> list[Run]:
    """A consumed batch's runs of one partition (errors apart), in consumed order."""
    if _rows_fast is not None:
        return _rows_fast.partition_runs(msgs)
    return _partition_runs(msgs)


def produce_plain(produce: Callable[..., None], outcomes: list[Any], start: int) -> int:
    """Produce ``outcomes[start:]`` while plain; the index of the first left to the caller.

    Each as (topic, value, key), positionally, until one has headers or ``produce``
    refuses it (the exception dropped: the caller produces that one its own way), else
    ``len(outcomes)``. ``produce`` is the producer's: with no callback per record (its
    default callback hears of failures), as `pipeline.engine.delivery` produces the
    usual outcome.
    """
    if _rows_fast is not None:
        return _rows_fast.produce_plain(produce, outcomes, start)
    return _produce_plain(produce, outcomes, start)
