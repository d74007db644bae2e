"""Bounded runs (replays): serve ``[start, end)`` of each listed partition, then stop.

A bounded run assigns its partitions directly (no group membership), starting each one
where this run's group last committed inside the range (so a stopped replay resumes), or
at the range's start. A partition is finished once its last record in range is read, or
the broker says it ended (``enable.partition.eof``); it is paused then, so nothing past
the range is fetched. The run is over once every partition is finished and everything
read is delivered.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Mapping, Sequence

from confluent_kafka import Consumer, TopicPartition

from pipeline.engine.offsets import OffsetTracker
from schemas.messages import Partition, partition_of

__all__ = ["BoundedRanges", "names"]

log = logging.getLogger(__name__)


class BoundedRanges:
    """The ranges of one bounded run, and which partitions are done reading them."""

    def __init__(self, ranges: Mapping[Partition, tuple[int, int]]) -> None:
        self.ranges = dict(ranges)
        self.begin: dict[Partition, int] = {}  # where this run started each partition
        self.finished: set[Partition] = set()

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

    def admit(self, consumer: Consumer, tp: Partition, offset: int) -> bool:
        """Whether to serve this record; the partition is finished at its range's end."""
        return self.admit_many(consumer, tp, [offset]) == 1

    def admit_many(self, consumer: Consumer, tp: Partition, offsets: Sequence[int]) -> int:
        """How many of these increasing offsets to serve (a prefix): those in the range.

        The partition is finished once its range's last record is among them, or one past
        the range's end was fetched.
        """
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

    def served(self, in_flight: int) -> bool:
        """Every partition read to its end, and nothing left in flight."""
        return len(self.finished) == len(self.ranges) and in_flight == 0


def names(partitions: list[TopicPartition]) -> str:
    """``topic[0], topic[3]`` for logs; ``nothing`` for none."""
    return ", ".join(f"{p.topic}[{p.partition}]" for p in partitions) or "nothing"
