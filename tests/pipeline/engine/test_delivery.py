"""Delivery's bookkeeping with in-memory client doubles: exactly-once transactions, and
at-least-once commits that fail after they were handed over."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.engine.delivery import AtLeastOnce, ExactlyOnce
from pipeline.engine.offsets import OffsetTracker
from pipeline.serving.outcomes import Outcome, OutcomeEncoder
from schemas.codec import AvroCodec
from schemas.messages import Envelope, Request

TP = ("in", 0)


class TxnProducer:
    """Records transactional calls; acks on poll/commit; fails a commit when told to."""

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self.log: list[Any] = []
        self.committed: list[list[tuple[str, bytes]]] = []  # what each commit made visible
        self.open: list[tuple[str, bytes]] = []
        self.commit_errors: list[KafkaError] = []
        self.refuse_late: set[bytes] = set()  # values whose delivery report is an error
        self._acks: list[Any] = []

    def init_transactions(self, _: float) -> None:
        self.log.append("init")

    def begin_transaction(self) -> None:
        self.log.append("begin")

    def produce(self, topic: str, value: bytes, key: Any = None, **kw: Any) -> None:
        if len(value) > self.limit:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "too large"))
        err = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE) if value in self.refuse_late else None
        if kw.get("on_delivery") is not None:
            self._acks.append((kw["on_delivery"], err))
        self.open.append((topic, value))

    def poll(self, _: float = 0) -> int:
        acks, self._acks = self._acks, []
        for callback, err in acks:
            callback(err, None)
        return len(acks)

    def send_offsets_to_transaction(self, offsets: list[Any], _meta: Any, _t: float) -> None:
        self.log.append(("offsets", {(o.topic, o.partition): o.offset for o in offsets}))

    def commit_transaction(self, _: float) -> None:
        self.poll()
        if self.commit_errors:
            raise KafkaException(self.commit_errors.pop(0))
        if any(v in self.refuse_late for _, v in self.open):
            raise KafkaException(_abortable("a record in the transaction failed"))
        self.log.append("commit")
        self.committed.append(self.open)
        self.open = []

    def abort_transaction(self, _: float) -> None:
        self.log.append("abort")
        self.open = []


class Group:
    def consumer_group_metadata(self) -> str:
        return "meta"


def _abortable(msg: str) -> KafkaError:
    return KafkaError(KafkaError._STATE, msg, txn_requires_abort=True)


def _setup(producer: TxnProducer) -> tuple[ExactlyOnce, OffsetTracker, list[Outcome]]:
    tracker = OffsetTracker()
    acked: list[Outcome] = []
    encoder = OutcomeEncoder(AvroCodec(), "out", "dlq")
    d = ExactlyOnce(
        producer,  # type: ignore[arg-type]
        Group(),  # type: ignore[arg-type]
        tracker,
        encoder,
        acked.extend,
        lambda _: None,
        commit_interval_ms=10,
    )
    d.start()
    return d, tracker, acked


def _outcome(tracker: OffsetTracker, offset: int, tp: tuple[str, int] = TP) -> Outcome:
    env = Envelope(
        tp[0],
        tp[1],
        offset,
        b"k",
        b"request",
        0,
        time.monotonic(),
        tracker.generation(tp) or 0,
        Request(f"r{offset}", "m", {}),
    )
    return Outcome(env, "out", f"result-{offset}".encode())


def _consume(tracker: OffsetTracker, n: int, tp: tuple[str, int] = TP) -> list[Outcome]:
    tracker.assign(tp)
    outs = []
    for offset in range(n):
        tracker.track(tp, offset, 7)
        outs.append(_outcome(tracker, offset, tp))
    return outs


def test_outcomes_wait_for_every_earlier_record_then_go_in_offset_order() -> None:
    producer = TxnProducer()
    d, tracker, acked = _setup(producer)
    outs = _consume(tracker, 4)
    d.publish([outs[2], outs[1]])
    assert producer.open == []  # offset 0 has no outcome yet
    assert tracker.in_flight == 4
    d.publish([outs[0]])
    assert [v for _, v in producer.open] == [b"result-0", b"result-1", b"result-2"]
    assert tracker.in_flight == 1
    d.commit(force=True)
    assert producer.log == ["init", "begin", ("offsets", {TP: 3}), "commit"]
    assert [o.envelope.offset for o in acked] == [0, 1, 2]  # counted only once committed


@settings(max_examples=60, deadline=None)
@given(order=st.permutations(list(range(12))), commit_every=st.integers(1, 5))
def test_each_commit_holds_exactly_the_outcomes_of_the_offsets_it_commits(
    order: list[int], commit_every: int
) -> None:
    """Whatever order outcomes complete in, a transaction commits offsets [prev, pos) and
    exactly the outcomes of those offsets: nothing ahead of its offset, nothing twice."""
    producer = TxnProducer()
    d, tracker, _ = _setup(producer)
    outs = _consume(tracker, 12)
    for i, offset in enumerate(order, 1):
        d.publish([outs[offset]])
        if i % commit_every == 0:
            d.commit(force=True)
    d.commit(force=True)
    position = 0
    offsets_logged = [e[1][TP] for e in producer.log if isinstance(e, tuple)]
    assert len(offsets_logged) == len(producer.committed)
    for new_position, visible in zip(offsets_logged, producer.committed, strict=True):
        assert [v for _, v in visible] == [
            f"result-{o}".encode() for o in range(position, new_position)
        ]
        position = new_position
    assert position == 12


def test_an_aborted_transaction_is_redone_with_a_refused_result_replaced_by_a_dead_letter() -> None:
    producer = TxnProducer()
    d, tracker, acked = _setup(producer)
    outs = _consume(tracker, 3)
    producer.refuse_late.add(b"result-1")
    d.publish(outs)
    d.commit(force=True)  # fails: the refused record makes the transaction abortable
    assert producer.log[-1] == "begin"
    assert "abort" in producer.log
    assert acked == []
    d.commit(force=True)  # fails again, now with delivery reports saying which one
    assert producer.log.count("abort") == 2
    d.commit(force=True)
    [visible] = producer.committed
    assert [t for t, _ in visible] == ["out", "dlq", "out"]
    assert [o.reason for o in acked] == [None, "undeliverable", None]
    assert producer.log[-2:] == [("offsets", {TP: 3}), "commit"]


def test_a_retriable_commit_failure_keeps_the_transaction_and_retries() -> None:
    producer = TxnProducer()
    d, tracker, _ = _setup(producer)
    d.publish(_consume(tracker, 2))
    producer.commit_errors.append(KafkaError(KafkaError._TIMED_OUT, "slow", retriable=True))
    d.commit(force=True)
    assert "abort" not in producer.log
    d.commit(force=True)
    assert len(producer.committed[0]) == 2


def test_being_fenced_is_fatal_and_says_why() -> None:
    producer = TxnProducer()
    d, tracker, _ = _setup(producer)
    d.publish(_consume(tracker, 1))
    producer.commit_errors.append(KafkaError(KafkaError._FENCED, "fenced", fatal=True))
    d.commit(force=True)
    assert d.fatal is not None
    assert "fenced this one" in d.fatal


def test_outcomes_of_an_older_assignment_are_never_sent() -> None:
    producer = TxnProducer()
    d, tracker, _ = _setup(producer)
    old = _consume(tracker, 2)
    tracker.assign(TP)  # revoked and assigned again: a new generation
    d.publish(old)
    assert producer.open == []


def test_losing_a_partition_aborts_its_outcomes_and_redoes_the_others() -> None:
    producer = TxnProducer()
    d, tracker, _ = _setup(producer)
    other = ("in", 1)
    mine = _consume(tracker, 2)
    theirs = _consume(tracker, 2, other)
    d.publish(mine + theirs)
    d.lost([other])
    tracker.revoke(other)
    d.commit(force=True)
    [visible] = producer.committed
    assert [v for _, v in visible] == [b"result-0", b"result-1"]
    assert producer.log[-2] == ("offsets", {TP: 2})


def test_a_result_refused_at_produce_is_replaced_in_the_same_transaction() -> None:
    producer = TxnProducer(limit=10_000)
    d, tracker, acked = _setup(producer)
    outs = _consume(tracker, 1)
    outs[0].value = b"x" * 20_000
    d.publish(outs)
    d.commit(force=True)
    [visible] = producer.committed
    assert [t for t, _ in visible] == ["dlq"]
    assert acked[0].reason == "undeliverable"


def test_a_periodic_commit_runs_in_the_background_and_outcomes_wait_for_its_end() -> None:
    producer = TxnProducer()
    gate = threading.Event()
    commit = producer.commit_transaction

    def slow_commit(timeout: float) -> None:
        gate.wait(5)
        commit(timeout)

    producer.commit_transaction = slow_commit  # type: ignore[method-assign]
    d, tracker, acked = _setup(producer)
    outs = _consume(tracker, 4)
    d.publish(outs[:2])
    time.sleep(0.02)  # past the 10 ms commit interval
    d.commit(force=False)  # starts the commit and returns at once
    d.publish(outs[2:])  # arrives during the commit: held, not in the committing one
    assert [v for _, v in producer.open] == [b"result-0", b"result-1"]
    d.commit(force=False)  # still committing: nothing happens
    assert acked == []
    gate.set()
    assert d._committing is not None
    d._committing.join(5)
    d.commit(force=False)  # notes the end, releases what waited into a new transaction
    assert [o.envelope.offset for o in acked] == [0, 1]
    assert [v for _, v in producer.open] == [b"result-2", b"result-3"]
    d.commit(force=True)
    assert [o.envelope.offset for o in acked] == [0, 1, 2, 3]
    offsets = [e[1][TP] for e in producer.log if isinstance(e, tuple)]
    assert offsets == [2, 4]


class CommittingConsumer:
    """Records each commit's offsets; the test answers them as the broker would."""

    def __init__(self) -> None:
        self.commits: list[dict[tuple[str, int], int]] = []

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> None:
        self.commits.append({(o.topic, o.partition): o.offset for o in offsets})


@dataclass
class Answer:
    """A committed partition as the commit callback gets it (TopicPartition's error is
    read-only, so a test cannot set one)."""

    topic: str
    partition: int
    offset: int
    error: KafkaError | None


def _at_least_once() -> tuple[AtLeastOnce, OffsetTracker, CommittingConsumer]:
    tracker, consumer = OffsetTracker(), CommittingConsumer()
    d = AtLeastOnce(
        TxnProducer(),  # type: ignore[arg-type]
        consumer,  # type: ignore[arg-type]
        tracker,
        OutcomeEncoder(AvroCodec(), "out", "dlq"),
        lambda _: None,
        lambda _: None,
        commit_interval_ms=60_000,
    )
    return d, tracker, consumer


def _done(tracker: OffsetTracker, tp: tuple[str, int], n: int) -> None:
    generation = tracker.assign(tp)
    for offset in range(n):
        tracker.track(tp, offset)
        tracker.done(tp, offset, generation)


def test_an_asynchronous_commit_that_fails_is_sent_again_without_new_progress() -> None:
    d, tracker, consumer = _at_least_once()
    other = ("in", 1)
    _done(tracker, TP, 3)
    _done(tracker, other, 2)
    d.commit(force=True)
    assert consumer.commits == [{TP: 3, other: 2}]
    d.commit(force=False)  # nothing moved, and the interval (60 s) has not passed
    assert len(consumer.commits) == 1
    # The broker went away: partition 0's commit failed, partition 1's went through.
    failed = Answer(*TP, 3, KafkaError(KafkaError.NOT_COORDINATOR))
    d.commit_done(None, [failed, TopicPartition(*other, 2)])  # type: ignore[list-item]
    d.commit(force=False)  # due at once, not an interval later; only what failed
    assert consumer.commits[1:] == [{TP: 3}]
    d.commit_done(None, [TopicPartition(*TP, 3)])  # this time it went through
    d.commit(force=True)
    assert len(consumer.commits) == 2


def test_a_failed_commit_is_not_sent_again_once_a_newer_one_or_a_revoke_covers_it() -> None:
    d, tracker, consumer = _at_least_once()
    _done(tracker, TP, 3)
    d.commit(force=True)
    generation = tracker.generation(TP) or 0
    for offset in (3, 4):
        tracker.track(TP, offset)
        tracker.done(TP, offset, generation)
    d.commit(force=True)
    assert consumer.commits == [{TP: 3}, {TP: 5}]
    error = KafkaError(KafkaError.REQUEST_TIMED_OUT)
    d.commit_done(error, [TopicPartition(*TP, 3)])  # the older one failed: 5 covers it
    d.commit(force=True)
    assert len(consumer.commits) == 2
    tracker.revoke(TP)
    d.commit_done(error, [TopicPartition(*TP, 5)])  # gone: the next owner commits
    d.commit(force=True)
    assert len(consumer.commits) == 2


# -- at-least-once: commit points instead of a callback per record ---------------------------


class HoldingProducer:
    """librdkafka with ``delivery.report.only.error``, acknowledging only when told.

    ``produce`` holds a record until `ack` (or ``flush``) delivers it; a success leaves
    no report, a failure (values in ``fail``) queues one that ``poll`` serves. ``len``
    counts records held and reports not yet served, as ``len(Producer)`` does.
    """

    def __init__(self) -> None:
        self.default: Any = None  # the ``on_delivery`` setting: records without their own
        self.callbacks: list[Any] = []  # each produce's own callback (None: none given)
        self.held: list[tuple[Any, str, bytes, bytes | None]] = []
        self.reports: list[tuple[Any, KafkaError, Message]] = []
        self.fail: dict[bytes, KafkaError] = {}
        self.sent: list[tuple[str, bytes]] = []
        self.flushes = 0
        self.waits: list[float] = []  # each flush's timeout
        self.down = False  # the broker acknowledges nothing

    def produce(self, topic: str, value: bytes, key: Any = None, **kw: Any) -> None:
        self.callbacks.append(kw.get("on_delivery"))
        self.held.append((kw.get("on_delivery") or self.default, topic, value, key))
        self.sent.append((topic, value))

    def ack(self) -> None:
        held, self.held = self.held, []
        for callback, topic, value, key in held:
            if value in self.fail:
                msg = Message(topic=topic, value=value, key=key)
                self.reports.append((callback, self.fail[value], msg))

    def poll(self, _: float = 0) -> int:
        reports, self.reports = self.reports, []
        for callback, err, msg in reports:
            callback(err, msg)
        return len(reports)

    def flush(self, timeout: float = 0) -> int:
        self.flushes += 1
        self.waits.append(timeout)
        if not self.down:
            self.ack()
        self.poll()
        return len(self)

    def __len__(self) -> int:
        return len(self.held) + len(self.reports)


def _points(
    confirm_every: int = 1000, default_reports: bool = False
) -> tuple[AtLeastOnce, OffsetTracker, HoldingProducer, list[Outcome]]:
    tracker, producer, acked = OffsetTracker(), HoldingProducer(), []
    d = AtLeastOnce(
        producer,  # type: ignore[arg-type]
        CommittingConsumer(),  # type: ignore[arg-type]
        tracker,
        OutcomeEncoder(AvroCodec(), "out", "dlq"),
        acked.extend,
        lambda _: None,
        commit_interval_ms=60_000,
        confirm_every=confirm_every,
        default_reports=default_reports,
    )
    if default_reports:  # as the replica builds its producer: on_report is its default
        producer.default = d.on_report
    return d, tracker, producer, acked


def test_outcomes_are_done_only_at_a_commit_point_after_their_produce() -> None:
    d, tracker, producer, acked = _points()
    outs = _consume(tracker, 4)
    d.publish(outs[:2])
    d.confirm(force=False)  # the producer still holds them: no commit point
    assert (tracker.committable(), acked) == ({}, [])
    producer.ack()
    d.publish(outs[2:])  # produced after those two were acknowledged
    d.confirm(force=False)  # still held: none is done, not even the acknowledged ones
    assert tracker.committable() == {}
    producer.ack()
    producer.poll()
    d.confirm(force=False)  # nothing held: a free commit point
    assert tracker.committable() == {TP: 4}
    assert [o.envelope.offset for o in acked] == [0, 1, 2, 3]
    assert (tracker.in_flight, tracker.in_flight_bytes, producer.flushes) == (0, 0, 0)


def test_a_commit_or_enough_waiting_outcomes_make_a_commit_point_with_a_flush() -> None:
    d, tracker, producer, _ = _points(confirm_every=3)
    outs = _consume(tracker, 5)
    d.publish(outs[:2])
    d.confirm(force=False)
    assert (producer.flushes, tracker.committable()) == (0, {})
    d.publish(outs[2:3])  # three waiting: flush
    d.confirm(force=False)
    assert (producer.flushes, tracker.committable()) == (1, {TP: 3})
    d.publish(outs[3:])
    d.commit(force=True)  # a commit makes its own point first
    assert (producer.flushes, tracker.committable()) == (2, {})
    assert isinstance(d.consumer, CommittingConsumer)
    assert d.consumer.commits[-1] == {TP: 5}


@pytest.mark.parametrize("default_reports", [False, True], ids=["per-record", "default"])
def test_a_record_refused_for_good_is_left_out_of_its_point_and_done_with_its_stand_in(
    default_reports: bool,
) -> None:
    d, tracker, producer, acked = _points(default_reports=default_reports)
    outs = _consume(tracker, 3)
    producer.fail[b"result-1"] = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)
    d.publish(outs[:1])  # in an earlier batch than the refused one: found all the same
    d.publish(outs[1:])
    producer.flush()
    d.confirm(force=False)
    assert tracker.committable() == {TP: 1}  # 0 done, 1 refused, 2 done but after 1
    assert [o.envelope.offset for o in acked] == [0, 2]
    [stand_in] = d._take_pending()
    assert (stand_in.topic, stand_in.reason) == ("dlq", "undeliverable")
    d.publish([stand_in])
    producer.flush()
    d.confirm(force=False)
    assert tracker.committable() == {TP: 3}
    assert [o.reason for o in acked] == [None, None, "undeliverable"]
    assert ("dlq", stand_in.value) in producer.sent
    assert d.fatal is None
    # With a default callback no record carries one of its own (each costs ~0.5 µs).
    assert all((cb is None) == default_reports for cb in producer.callbacks)


def test_a_transient_delivery_failure_is_fatal_and_its_record_never_done() -> None:
    d, tracker, producer, acked = _points()
    outs = _consume(tracker, 3)
    producer.fail[b"result-1"] = KafkaError(KafkaError._MSG_TIMED_OUT)
    d.publish(outs)
    producer.flush()
    d.confirm(force=False)
    assert "delivery to out failed for in/0@1" in (d.fatal or "")
    assert tracker.committable() == {TP: 1}
    assert tracker.outstanding(TP) == 1
    assert [o.envelope.offset for o in acked] == [0, 2]  # delivered, so counted
    assert d._take_pending() == []


def test_outcomes_of_a_revoked_partition_are_not_done_at_their_point() -> None:
    d, tracker, producer, _ = _points()
    outs = _consume(tracker, 2)
    d.publish(outs)
    tracker.revoke(TP)
    generation = tracker.assign(TP)  # back, from the last commit: served again
    tracker.track(TP, 0)
    producer.flush()
    d.confirm(force=False)
    assert tracker.committable() == {}
    assert tracker.outstanding(TP) == 1
    assert tracker.done(TP, 0, generation)


def test_a_periodic_commit_waits_briefly_for_a_broker_that_is_away_and_commits_nothing() -> None:
    d, tracker, producer, acked = _points()
    d.commit_interval_s = 0.0  # every call is due
    outs = _consume(tracker, 2)
    d.publish(outs)
    producer.down = True
    d.commit(force=False)
    assert producer.waits == [0.1]  # not the 30 s a forced commit may take
    assert (tracker.committable(), acked) == ({}, [])
    producer.down = False
    d.commit(force=True)
    assert producer.waits == [0.1, 30.0]
    assert tracker.committable() == {}  # handed to the consumer's commit
    assert isinstance(d.consumer, CommittingConsumer)
    assert d.consumer.commits == [{TP: 2}]


def test_plain_outcomes_go_in_one_pass_and_those_refused_at_produce_get_their_stand_ins() -> None:
    """The usual outcomes are produced by the compiled pass (or its reference); one the
    producer refuses there (too large, a full queue) or that has headers is produced by
    `_produce`, the pass going on after it, and the point marks all of them done."""
    d, tracker, producer, acked = _points(default_reports=True)
    outs = _consume(tracker, 6)
    outs[1].headers = [("traceparent", b"00-x")]
    refuse = {b"result-2": KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "big"))}
    full_once = {b"result-4"}
    produce = producer.produce

    def refusing(topic: str, value: bytes, key: Any = None, **kw: Any) -> None:
        if value in refuse:
            raise refuse[value]
        if value in full_once:
            full_once.discard(value)
            raise BufferError("queue full")
        produce(topic, value, key, **kw)

    producer.produce = refusing  # type: ignore[method-assign]
    d.publish(outs)
    sent = [value for _, value in producer.sent]
    assert sent == [b"result-0", b"result-1", b"result-3", b"result-4", b"result-5"]
    assert [cb for cb in producer.callbacks] == [None] * 5  # the default callback only
    [stand_in] = d._take_pending()
    assert (stand_in.reason, stand_in.envelope.offset) == ("undeliverable", 2)
    d.publish([stand_in])
    producer.flush()
    d.confirm(force=False)
    assert tracker.committable() == {TP: 6}
    assert sorted(o.envelope.offset for o in acked) == [0, 1, 2, 3, 4, 5]
    assert d.fatal is None
