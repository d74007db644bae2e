"""Lag in records and seconds: watermark history, starts, paused partitions."""

from __future__ import annotations

import time
from typing import Any

import pytest
from confluent_kafka import TopicPartition

from pipeline.engine.lag import LagMonitor, PartitionLag, WatermarkHistory
from pipeline.engine.offsets import OffsetTracker

TP = ("in", 0)


class FakeConsumer:
    """Cached watermarks from 'fetch responses', queried ones from 'ListOffsets'."""

    def __init__(self) -> None:
        self.cached: dict[tuple[str, int], int] = {}
        self.queried: dict[tuple[str, int], tuple[int, int]] = {}
        self.positions: dict[tuple[str, int], int] = {}
        self.commits: dict[tuple[str, int], int] = {}
        self.queries = 0

    def get_watermark_offsets(
        self, tp: TopicPartition, timeout: float = 1.0, cached: bool = False
    ) -> tuple[int, int]:
        key = (tp.topic, tp.partition)
        if cached:
            return (-1001, self.cached.get(key, -1001))
        self.queries += 1
        return self.queried.get(key, (-1001, -1001))

    def position(self, parts: list[TopicPartition]) -> list[TopicPartition]:
        return [
            TopicPartition(p.topic, p.partition, self.positions.get((p.topic, p.partition), -1001))
            for p in parts
        ]

    def committed(self, parts: list[TopicPartition], timeout: float = 1.0) -> list[TopicPartition]:
        return [
            TopicPartition(p.topic, p.partition, self.commits.get((p.topic, p.partition), -1001))
            for p in parts
        ]


def _monitor(consumer: FakeConsumer) -> LagMonitor:
    return LagMonitor(consumer, refresh_s=0.01)  # type: ignore[arg-type]


def test_history_interpolates_when_a_record_arrived() -> None:
    h = WatermarkHistory()
    h.observe(100, 10.0)
    h.observe(100, 11.0)  # no progress: not a new point
    h.observe(200, 20.0)
    assert h.arrival(50) is None  # before the history began
    assert h.arrival(149) == pytest.approx(15.0)
    assert h.arrival(199) == pytest.approx(20.0)
    assert h.arrival(200) is None  # not arrived yet
    assert h.first_seen == 10.0


def test_in_flight_records_date_the_lag_and_count_from_the_oldest() -> None:
    c = FakeConsumer()
    c.cached[TP] = 110
    t = OffsetTracker()
    t.assign(TP)
    for off in range(100, 105):
        t.track(TP, off, 10, timestamp_ms=int((1000.0 + off) * 1000))
    t.done(TP, 100, 1)
    lag = _monitor(c).measure(t, [TP], paused=False, now=1200.0)[TP]
    assert lag.messages == 110 - 101
    assert lag.seconds == pytest.approx(1200.0 - 1101.0)


def test_caught_up_partition_has_no_lag() -> None:
    c = FakeConsumer()
    c.cached[TP] = 5
    t = OffsetTracker()
    t.assign(TP)
    for off in range(5):
        t.track(TP, off)
        t.done(TP, off, 1)
    assert _monitor(c).measure(t, [TP], paused=False, now=50.0)[TP] == PartitionLag(0, 0.0)


def test_records_still_in_kafka_are_dated_by_the_watermark_history() -> None:
    c = FakeConsumer()
    t = OffsetTracker()
    t.assign(TP)
    for off in range(10):
        t.track(TP, off, timestamp_ms=1000)
        t.done(TP, off, 1)
    m = _monitor(c)
    c.cached[TP] = 10
    m.measure(t, [TP], paused=True, now=100.0)
    c.cached[TP] = 30  # 20 records arrived while this replica was paused
    lag = m.measure(t, [TP], paused=True, now=110.0)[TP]
    assert lag.messages == 20
    assert lag.seconds == pytest.approx(110.0 - 100.5)  # offset 10 arrived just after 100 s


def test_a_backlog_older_than_the_history_is_dated_by_the_newest_consumed_record() -> None:
    c = FakeConsumer()
    c.cached[TP] = 1000
    t = OffsetTracker()
    t.assign(TP)
    t.track(TP, 0, timestamp_ms=40_000)
    t.done(TP, 0, 1)
    lag = _monitor(c).measure(t, [TP], paused=True, now=100.0)[TP]
    assert lag.messages == 999
    assert lag.seconds == pytest.approx(60.0)


def test_paused_partitions_are_queried_and_the_larger_watermark_wins() -> None:
    c = FakeConsumer()
    c.cached[TP] = 50  # stale: the partition stopped fetching when paused
    c.queried[TP] = (0, 80)
    c.positions[TP] = 50
    m = _monitor(c)
    t = OffsetTracker()
    t.assign(TP)
    assert m.measure(t, [TP], paused=True)[TP].messages == 0
    m.start()
    try:
        deadline = time.monotonic() + 5
        while c.queries == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
    finally:
        m.stop()
    assert m.measure(t, [TP], paused=True)[TP].messages == 30
    c.queried[TP] = (0, 40)  # a broker whose ListOffsets lags (Tansu) never lowers it
    assert m.measure(t, [TP], paused=True)[TP].messages == 30


def test_a_partition_never_consumed_counts_from_its_committed_offset() -> None:
    c = FakeConsumer()
    c.cached[TP] = -1001
    c.queried[TP] = (0, 500)
    c.commits[TP] = 200
    m = _monitor(c)
    t = OffsetTracker()
    t.assign(TP)
    assert m.measure(t, [TP], paused=True) == {}
    m.start()
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not m.measure(t, [TP], paused=True):
            time.sleep(0.02)
    finally:
        m.stop()
    assert m.measure(t, [TP], paused=True)[TP].messages == 300


def test_forget_drops_a_revoked_partition() -> None:
    c: Any = FakeConsumer()
    c.cached[TP] = 10
    c.positions[TP] = 10
    m = _monitor(c)
    t = OffsetTracker()
    t.assign(TP)
    m.measure(t, [TP], paused=False, now=1.0)
    m.forget(TP)
    assert TP not in m._history
