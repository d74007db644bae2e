"""Bounded runs: where each partition starts, when it is finished, when the run is over."""

from __future__ import annotations

from typing import Any

from confluent_kafka import TopicPartition

from pipeline.engine.offsets import OffsetTracker
from pipeline.engine.ranges import BoundedRanges


class FakeConsumer:
    def __init__(self, committed: dict[int, int]) -> None:
        self._committed = committed
        self.assigned: list[tuple[int, int]] = []
        self.paused: list[int] = []

    def committed(self, parts: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        return [
            TopicPartition(p.topic, p.partition, self._committed.get(p.partition, -1001))
            for p in parts
        ]

    def assign(self, parts: list[TopicPartition]) -> None:
        self.assigned = [(p.partition, p.offset) for p in parts]

    def pause(self, parts: list[TopicPartition]) -> None:
        self.paused += [p.partition for p in parts]


def test_each_partition_starts_at_its_last_commit_inside_the_range_else_its_start() -> None:
    ranges = BoundedRanges({("t", 0): (10, 20), ("t", 1): (10, 20), ("t", 2): (10, 20)})
    consumer: Any = FakeConsumer({0: 15, 1: 3, 2: 20})  # resumed, before the range, done
    assert ranges.assign(consumer, OffsetTracker()) == 2
    assert consumer.assigned == [(0, 15), (1, 10)]
    assert ranges.begin == {("t", 0): 15, ("t", 1): 10, ("t", 2): 20}
    assert ranges.finished == {("t", 2)}


def test_a_partition_is_finished_at_the_last_record_of_its_range() -> None:
    ranges = BoundedRanges({("t", 0): (0, 3)})
    consumer: Any = FakeConsumer({})
    assert ranges.admit(consumer, ("t", 0), 1)
    assert not ranges.served(0)
    assert ranges.admit(consumer, ("t", 0), 2)  # the last one in range: served, then paused
    assert consumer.paused == [0]
    assert not ranges.admit(consumer, ("t", 0), 3)  # past the end (prefetched)
    assert consumer.paused == [0]  # paused once
    assert not ranges.served(1)  # still one in flight
    assert ranges.served(0)


def test_a_consumed_batch_is_cut_at_the_ranges_end() -> None:
    consumer: Any = FakeConsumer({})
    ranges = BoundedRanges({("t", 0): (0, 4)})
    assert ranges.admit_many(consumer, ("t", 0), [0, 1]) == 2
    assert ranges.finished == set()
    assert ranges.admit_many(consumer, ("t", 0), [2, 3, 4, 5]) == 2  # 4 and 5: prefetched
    assert (ranges.finished, consumer.paused) == ({("t", 0)}, [0])
