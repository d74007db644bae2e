"""A consumed batch, tracked and turned into envelopes: the Kafka loop's intake, per batch.

`Consumed.take` splits what ``Consumer.consume`` returned into runs of one partition
(librdkafka hands a partition's fetched records out together), and per run makes the
few calls the guarantees need: the generation check (records prefetched before a revoke
are left to the new owner), a bounded run's end (`pipeline.engine.ranges`), one
`OffsetTracker.track_many` (which skips records re-delivered after the client went
back) and one accounting call. Then an `Envelope` per record, for `Intake.admit_batch`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import cast

from confluent_kafka import Consumer, Message

from pipeline.engine.accounting import Accounting
from pipeline.engine.offsets import OffsetTracker
from pipeline.engine.ranges import BoundedRanges
from pipeline.engine.rows import envelopes, partition_runs, read_run
from schemas.messages import Envelope, Partition

__all__ = ["Batch", "Consumed"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Batch:
    """Envelopes of the records to serve, the positions of tombstones, and errors."""

    rows: list[Envelope] = field(default_factory=list)
    tombstones: list[int] = field(default_factory=list)
    errors: list[Message] = field(default_factory=list)


class Consumed:
    """Takes consumed batches into the tracker, for one replica's consumer."""

    def __init__(
        self,
        consumer: Consumer,
        tracker: OffsetTracker,
        accounting: Accounting,
        bounded: BoundedRanges | None,
    ) -> None:
        self.consumer = consumer
        self.tracker = tracker
        self.accounting = accounting
        self.bounded = bounded

    def take(self, msgs: list[Message], now: float) -> Batch:
        """Track ``msgs`` (consumed at ``now``) and make the envelopes of those to serve."""
        out = Batch()
        for tp, run in _runs(msgs):
            if tp is None:  # an error, not a record
                out.errors.extend(run)
            else:
                self._run(tp, run, now, out)
        return out

    def _run(self, tp: Partition, run: list[Message], now: float, out: Batch) -> None:
        """Track consecutive records of one partition; add their envelopes to ``out``.

        Each record's fields are read once, in one call (`pipeline.engine.rows`).
        """
        generation = self.tracker.generation(tp)
        if generation is None:  # prefetched before a revoke: the new owner will serve it
            return
        cols = read_run(run)
        if not cols.ordered:  # the client went back (rare)
            run = _increasing(run)
            cols = read_run(run)
        offsets, raw, keys, stamps, sizes = (
            cols.offsets,
            cols.values,
            cols.keys,
            cols.stamps,
            cols.sizes,
        )
        if self.bounded is not None:
            keep = self.bounded.admit_many(self.consumer, tp, offsets)
            if keep < len(run):
                run, offsets, raw = run[:keep], offsets[:keep], raw[:keep]
                keys, stamps, sizes = keys[:keep], stamps[:keep], sizes[:keep]
            if not run:
                return
        if min(stamps) <= 0:  # no timestamp on a record: date it by its arrival
            arrival = int(time.time() * 1000)
            stamps = [t if t > 0 else arrival for t in stamps]
        taken = self.tracker.track_many(tp, offsets, sizes, stamps)
        if taken < len(run):
            skipped = len(run) - taken
            log.warning(
                "%s[%d]: %d records re-delivered by the client; already served", *tp, skipped
            )
            run, offsets, raw = run[skipped:], offsets[skipped:], raw[skipped:]
            keys, stamps, sizes = keys[skipped:], stamps[skipped:], sizes[skipped:]
        self.accounting.consumed_many(tp, taken, sum(sizes))
        topic, partition = tp
        values = cast(list[bytes], raw)
        if cols.tombstones:  # tombstones: served as dead letters, their places noted
            start = len(out.rows)
            out.tombstones.extend(start + i for i, v in enumerate(raw) if v is None)
            values = [v or b"" for v in raw]
        rows = envelopes(topic, partition, generation, now, keys, values, offsets, stamps)
        if cols.headers:  # kept for the outcome to carry (trace context, named headers)
            for env, msg in zip(rows, run, strict=True):
                env.headers = cast("list[tuple[str, bytes | None]] | None", msg.headers())
        out.rows.extend(rows)


def _runs(msgs: list[Message]) -> Iterator[tuple[Partition | None, list[Message]]]:
    """Consecutive messages of one partition (as librdkafka hands them out), in order.

    Errors come as runs of their own, with no partition. The runs are found in one pass
    (`pipeline.engine.rows.partition_runs`, compiled where pip built it).
    """
    runs = partition_runs(msgs)
    if len(runs) == 1:  # the usual case: one partition's records
        failed, topic, partition, _, _ = runs[0]
        yield (None if failed else (cast(str, topic), cast(int, partition))), msgs
        return
    for failed, topic, partition, start, stop in runs:
        yield (None if failed else (cast(str, topic), cast(int, partition))), msgs[start:stop]


def _increasing(run: list[Message]) -> list[Message]:
    """The records of a run past every one before them, in order.

    A record at or below an earlier offset was fetched again after the client went back,
    and is tracked already.
    """
    out: list[Message] = []
    last = -1
    for msg in run:
        offset = cast(int, msg.offset())
        if offset > last:
            out.append(msg)
            last = offset
        else:
            log.warning(
                "%s[%d]@%d re-delivered by the client; already served",
                msg.topic(),
                msg.partition(),
                offset,
            )
    return out
