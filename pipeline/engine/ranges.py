"""Bounded runs (replays): serve ``[start, end)`` of each listed partition, then stop.

A bounded run assigns its partitions directly (no group membership), starting each one
where this run's group last committed inside the range (so a stopped replay resumes), or
at the range's start. A partition is finished once its last record in range is read, or
the broker says it ended (``enable.partition.eof``); it is paused then, so nothing past
the range is fetched. The run is over once every partition is finished and everything
read is delivered.

A shared run (``shared=True``: ``replay --workers N``, or the same replay started on
several machines) splits the partitions between its replicas through the replay's own
consumer group instead: each replica subscribes, and each partition the group gives it
starts where the group last committed inside the range (`placed`), so a partition that
moves between replicas, or a replay started again, goes on from the last commit. A
replica is over when the partitions it holds are finished and delivered and the group's
committed offset of every other partition of the range is at its end (checked at most
once a second, through ``offsets``: a client of its own that joins no group, since a
request to the coordinator from the member's own consumer waits behind its JoinGroup
during a rebalance): it stays in the group until then, ready to take over the partitions of a
replica that dies. A partition its owner finished at the broker's end of the partition
with a commit short of the range's end (the range ended on records a reader never sees)
counts as done for its owner; the others see it done once the owner has left and one of
them has found the same end.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence

from confluent_kafka import Consumer, KafkaException, TopicPartition

from pipeline.engine.offsets import OffsetTracker
from schemas.messages import Partition, partition_of

__all__ = ["BoundedRanges", "names"]

log = logging.getLogger(__name__)


class BoundedRanges:
    """The ranges of one bounded run, and which partitions are done reading them."""

    def __init__(
        self,
        ranges: Mapping[Partition, tuple[int, int]],
        shared: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ranges = dict(ranges)
        self.shared = shared
        self.begin: dict[Partition, int] = {}  # where this run started each partition
        self.finished: set[Partition] = set()
        self.owned: set[Partition] = set()  # shared: what the group gave this replica
        self._clock = clock
        self._next_check = 0.0

    def assign(self, consumer: Consumer, tracker: OffsetTracker) -> int:
        """Assign each partition at its start or its last commit; returns how many."""
        listed = [TopicPartition(t, p) for t, p in self.ranges]
        committed = {partition_of(c): c.offset for c in consumer.committed(listed, timeout=30)}
        parts = []
        for tp, (start, end) in self.ranges.items():
            done = committed.get(tp, -1)
            begin = done if start <= done <= end else start
            self.begin[tp] = begin
            tracker.assign(tp)
            if begin >= end:
                self.finished.add(tp)
            else:
                parts.append(TopicPartition(tp[0], tp[1], begin))
        consumer.assign(parts)
        log.info("replaying %s", names(parts))
        return len(parts)

    def placed(self, offsets: Consumer, partitions: list[TopicPartition]) -> list[TopicPartition]:
        """Shared: the partitions the group just gave, each at the offset to start from.

        ``offsets`` reads the group's committed offsets (see the module docstring).
        Partitions finished already (read to their end, or outside the range) are assigned
        too, as the group protocol expects, and paused by `pause_finished` right after.
        """
        committed = {partition_of(c): c.offset for c in offsets.committed(partitions, timeout=30)}
        out = []
        for p in partitions:
            tp = partition_of(p)
            self.owned.add(tp)
            self.finished.discard(tp)  # decided afresh from the commit, not from before
            if tp not in self.ranges:  # no records of it in the range
                self.finished.add(tp)
                out.append(TopicPartition(p.topic, p.partition))
                continue
            start, end = self.ranges[tp]
            done = committed.get(tp, -1)
            begin = done if start <= done <= end else start
            self.begin[tp] = begin
            if begin >= end:
                self.finished.add(tp)
            out.append(TopicPartition(p.topic, p.partition, begin))
        return out

    def pause_finished(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Pause those of ``partitions`` that have nothing (left) to read."""
        done = [p for p in partitions if partition_of(p) in self.finished]
        if done:
            consumer.pause(done)

    def release(self, tp: Partition) -> None:
        """Shared: the group took ``tp`` away; whoever gets it resumes from its commit."""
        self.owned.discard(tp)
        self.finished.discard(tp)

    def admit(self, consumer: Consumer, tp: Partition, offset: int) -> bool:
        """Whether to serve this record; the partition is finished at its range's end."""
        return self.admit_many(consumer, tp, [offset]) == 1

    def admit_many(self, consumer: Consumer, tp: Partition, offsets: Sequence[int]) -> int:
        """How many of these increasing offsets to serve (a prefix): those in the range.

        The partition is finished once its range's last record is among them, or one past
        the range's end was fetched.
        """
        if tp not in self.ranges:  # shared: a partition with no records in the range
            self.finish(consumer, tp)
            return 0
        end = self.ranges[tp][1]
        keep = bisect_left(offsets, end)
        if keep < len(offsets) or (keep and offsets[keep - 1] == end - 1):
            self.finish(consumer, tp)
        return keep

    def finish(self, consumer: Consumer, tp: Partition) -> None:
        """Stop reading ``tp``: its range is read."""
        if tp not in self.finished:
            self.finished.add(tp)
            consumer.pause([TopicPartition(*tp)])

    def served(self, in_flight: int, offsets: Consumer | None = None) -> bool:
        """Every partition read to its end, and nothing left in flight.

        Shared: this replica's partitions are, and the group has committed every other
        partition of the range to its end (``offsets`` asks the group's coordinator; no
        answer in time counts as not yet).
        """
        if in_flight:
            return False
        if not self.shared:
            return len(self.finished) == len(self.ranges)
        if offsets is None or not self.owned <= self.finished:
            return False
        now = self._clock()
        if now < self._next_check:
            return False
        self._next_check = now + 1.0
        others = [TopicPartition(t, p) for t, p in self.ranges if (t, p) not in self.owned]
        if not others:
            return True
        try:
            committed = offsets.committed(others, timeout=5)
        except KafkaException as e:
            log.debug("group offsets: %s; asking again", e)
            return False
        return all(c.offset >= self.ranges[partition_of(c)][1] for c in committed)


def names(partitions: list[TopicPartition]) -> str:
    """``topic[0], topic[3]`` for logs; ``nothing`` for none."""
    return ", ".join(f"{p.topic}[{p.partition}]" for p in partitions) or "nothing"
