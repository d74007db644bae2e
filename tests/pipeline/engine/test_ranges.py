"""Bounded runs: where each partition starts, when it is finished, when the run is over."""

from __future__ import annotations

from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

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


# -- shared runs: the replicas of one replay split the range through its group -------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _tps(*partitions: int) -> list[TopicPartition]:
    return [TopicPartition("t", p) for p in partitions]


def test_shared_each_partition_given_starts_at_the_groups_commit_else_the_range_start() -> None:
    ranges = BoundedRanges({("t", p): (10, 20) for p in range(3)}, shared=True)
    offsets: Any = FakeConsumer({0: 15, 1: 3, 2: 20})
    placed = ranges.placed(offsets, _tps(0, 1, 2, 7))  # 7: no records in the range
    assert [(p.partition, p.offset) for p in placed[:3]] == [(0, 15), (1, 10), (2, 20)]
    assert placed[3].partition == 7
    assert ranges.owned == {("t", 0), ("t", 1), ("t", 2), ("t", 7)}
    assert ranges.finished == {("t", 2), ("t", 7)}
    consumer: Any = FakeConsumer({})
    ranges.pause_finished(consumer, placed)
    assert consumer.paused == [2, 7]
    assert not ranges.admit(consumer, ("t", 7), 0)  # prefetched before the pause: not served


def test_shared_a_partition_taken_away_is_no_longer_this_replicas() -> None:
    ranges = BoundedRanges({("t", 0): (0, 5)}, shared=True)
    ranges.placed(FakeConsumer({0: 5}), _tps(0))  # type: ignore[arg-type]
    assert ranges.finished == {("t", 0)}
    ranges.release(("t", 0))
    assert ranges.owned == set()
    assert ranges.finished == set()


def test_shared_run_is_over_when_its_own_are_finished_and_the_group_committed_the_rest() -> None:
    clock = Clock()
    ranges = BoundedRanges({("t", 0): (0, 5), ("t", 1): (0, 5)}, shared=True, clock=clock)
    group = {0: -1001, 1: 2}
    offsets: Any = FakeConsumer(group)
    assert not ranges.served(0, offsets)  # nothing assigned yet, nothing committed
    ranges.placed(offsets, _tps(0))
    consumer: Any = FakeConsumer({})
    for offset in range(5):
        assert ranges.admit(consumer, ("t", 0), offset)
    assert not ranges.served(1, offsets)  # its last request still in flight
    clock.now += 1
    assert not ranges.served(0, offsets)  # partition 1, another replica's, is at 2 of 5
    group[1] = 5
    assert not ranges.served(0, offsets)  # asked again only a second later
    clock.now += 1
    assert ranges.served(0, offsets)


def test_shared_run_ends_at_once_when_an_earlier_run_committed_everything() -> None:
    ranges = BoundedRanges({("t", 0): (0, 5), ("t", 1): (3, 9)}, shared=True)
    assert ranges.served(0, FakeConsumer({0: 5, 1: 9}))  # type: ignore[arg-type]


def test_shared_run_takes_no_answer_from_the_group_as_not_yet() -> None:
    class Silent(FakeConsumer):
        def committed(self, parts: list[TopicPartition], timeout: float) -> list[TopicPartition]:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT))

    ranges = BoundedRanges({("t", 0): (0, 5)}, shared=True)
    assert not ranges.served(0, Silent({}))  # type: ignore[arg-type]


def test_shared_a_partition_given_again_is_judged_by_its_commit_not_by_before() -> None:
    ranges = BoundedRanges({("t", 0): (0, 5)}, shared=True)
    consumer: Any = FakeConsumer({})
    ranges.finish(consumer, ("t", 0))  # e.g. an end-of-partition event after it moved away
    ranges.placed(FakeConsumer({0: 2}), _tps(0))  # type: ignore[arg-type]
    assert ranges.finished == set()  # 2 of 5 committed: there is more to read


def test_a_consumed_batch_is_cut_at_the_ranges_end() -> None:
    consumer: Any = FakeConsumer({})
    ranges = BoundedRanges({("t", 0): (0, 4)})
    assert ranges.admit_many(consumer, ("t", 0), [0, 1]) == 2
    assert ranges.finished == set()
    assert ranges.admit_many(consumer, ("t", 0), [2, 3, 4, 5]) == 2  # 4 and 5: prefetched
    assert (ranges.finished, consumer.paused) == ({("t", 0)}, [0])
