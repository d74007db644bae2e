"""A consumed batch into the tracker and envelopes: per partition run, with every check.

Real confluent `Message` objects; the tracker, accounting and bounded ranges are the
real ones, the consumer a recorder of pauses.
"""

from __future__ import annotations

from typing import Any

from confluent_kafka import TIMESTAMP_CREATE_TIME, KafkaError, Message

from pipeline.engine.accounting import Accounting
from pipeline.engine.consumed import Consumed
from pipeline.engine.offsets import OffsetTracker
from pipeline.engine.ranges import BoundedRanges
from pipeline.observability.metrics import Metrics


class Pauses:
    def __init__(self) -> None:
        self.paused: list[tuple[str, int]] = []

    def pause(self, parts: list[Any]) -> None:
        self.paused += [(p.topic, p.partition) for p in parts]


def _msg(partition: int, offset: int, value: bytes | None = b"v", stamp: int = 5) -> Message:
    return Message(
        topic="in",
        partition=partition,
        offset=offset,
        key=b"k",
        value=value,
        timestamp=(TIMESTAMP_CREATE_TIME, stamp),
    )


def _consumed(bounded: BoundedRanges | None = None) -> tuple[Consumed, OffsetTracker, Pauses]:
    tracker, consumer = OffsetTracker(), Pauses()
    accounting = Accounting(Metrics(), [])
    return Consumed(consumer, tracker, accounting, bounded), tracker, consumer  # type: ignore[arg-type]


def test_runs_of_each_partition_are_tracked_and_become_envelopes_in_order() -> None:
    consumed, tracker, _ = _consumed()
    g0, g1 = tracker.assign(("in", 0)), tracker.assign(("in", 1))
    msgs = [_msg(0, 3), _msg(0, 4, None), _msg(1, 9, b"abc"), _msg(0, 5, stamp=0)]
    batch = consumed.take(msgs, now=7.0)
    assert [(e.partition, e.offset, e.generation) for e in batch.rows] == [
        (0, 3, g0),
        (0, 4, g0),
        (1, 9, g1),
        (0, 5, g0),
    ]
    assert batch.tombstones == [1]
    assert batch.rows[1].value == b""
    assert batch.rows[3].timestamp_ms > 1_000_000_000_000  # none on the record: arrival
    assert all(e.consumed_at == 7.0 for e in batch.rows)
    assert (tracker.in_flight, tracker.in_flight_bytes) == (4, 1 + 0 + 3 + 1)
    assert consumed.accounting.stats.consumed == 4


def test_revoked_partitions_re_deliveries_and_errors_are_not_served() -> None:
    consumed, tracker, _ = _consumed()
    tracker.assign(("in", 0))
    consumed.take([_msg(0, 0), _msg(0, 1)], now=0.0)
    error = Message(topic="in", partition=0, error=KafkaError(KafkaError._TRANSPORT))
    msgs = [_msg(0, 1), _msg(0, 2), _msg(0, 2), _msg(0, 1), _msg(0, 3), error, _msg(2, 0)]
    batch = consumed.take(msgs, now=0.0)
    assert [e.offset for e in batch.rows] == [2, 3]  # 1 again, 2 twice, 1 late; 2: revoked
    assert [m.error().code() for m in batch.errors] == [KafkaError._TRANSPORT]
    assert tracker.in_flight == 4


def test_a_bounded_run_stops_at_its_ranges_end() -> None:
    bounded = BoundedRanges({("in", 0): (0, 3)})
    consumed, tracker, consumer = _consumed(bounded)
    tracker.assign(("in", 0))
    batch = consumed.take([_msg(0, o) for o in range(5)], now=0.0)
    assert [e.offset for e in batch.rows] == [0, 1, 2]
    assert consumer.paused == [("in", 0)]
    assert bounded.finished == {("in", 0)}


def test_records_headers_ride_on_their_envelopes_only_where_there_are_any() -> None:
    consumed, tracker, _ = _consumed()
    tracker.assign(("in", 0))
    traced = [("traceparent", b"00-ab-cd-01"), ("empty", None)]
    msgs = [_msg(0, 0), _msg(0, 1), _msg(0, 2)]
    msgs[1].set_headers(traced)
    batch = consumed.take(msgs, now=0.0)
    assert [e.headers for e in batch.rows] == [None, traced, None]
    plain = consumed.take([_msg(0, 3)], now=0.0)
    assert plain.rows[0].headers is None
