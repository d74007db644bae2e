"""The main loop's delivery decisions, with in-memory Kafka doubles (no broker)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from pipeline.config.loader import parse_topology
from pipeline.engine.loop import Replica
from pipeline.kafka import batch_producer
from pipeline.kafka.batch_producer import BatchProducer
from pipeline.serving.outcomes import Outcome
from schemas.codec import AvroCodec
from schemas.messages import Envelope, Request

ROOT = Path(__file__).resolve().parents[3]
TOPOLOGY = """
topics: {input: [in], output: out, dead_letter: dlq}
flow: {max_in_flight: 10}
models:
  - name: m
    backend: onnxruntime
    artifact: x.onnx
    inputs: [{name: x, datatype: FP32, shape: [1]}]
"""


class FakeProducer:
    """Refuses values over ``limit`` bytes at produce(); acks the rest on poll().

    As librdkafka with ``delivery.report.only.error``: a delivery report only for a
    failure (``late_error``, for records to "out"); ``len`` counts what is unacknowledged.
    """

    def __init__(self, limit: int, late_error: KafkaError | None = None) -> None:
        self.limit = limit
        self.late_error = late_error
        self.sent: list[tuple[str, bytes]] = []
        self._acks: list[Any] = []

    def produce(
        self,
        topic: str,
        value: bytes,
        key: Any = None,
        headers: Any = None,
        on_delivery: Any = None,
    ) -> None:
        if len(value) > self.limit:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "too large"))
        err = self.late_error if topic == "out" else None
        self._acks.append((on_delivery, err, Message(topic=topic, value=value, key=key)))
        self.sent.append((topic, value))

    def poll(self, _: float = 0) -> int:
        acks, self._acks = self._acks, []
        failed = [(callback, err, msg) for callback, err, msg in acks if err is not None]
        for callback, err, msg in failed:
            callback(err, msg)
        return len(failed)

    def flush(self, _: float = 0) -> int:
        self.poll()
        return 0

    def __len__(self) -> int:
        return len(self._acks)


def _pipeline(producer: FakeProducer) -> Replica:
    topology = parse_topology(TOPOLOGY, "t.yaml", {})
    return Replica(topology, [], "unused:9092", consumer=object(), producer=producer)  # type: ignore[arg-type]


def _envelope(p: Replica, value: bytes) -> Envelope:
    generation = p.tracker.assign(("in", 0))
    p.tracker.track(("in", 0), 7)
    return Envelope(
        "in", 0, 7, b"k", value, 0, time.monotonic(), generation, Request("r7", "m", {})
    )


def _settle(p: Replica) -> None:
    for _ in range(3):
        p._publish()
        p.producer.poll(0)
        p.delivery.confirm(force=False)


def test_a_result_too_large_to_send_becomes_a_dead_letter() -> None:
    producer = FakeProducer(limit=400)
    p = _pipeline(producer)
    env = _envelope(p, b"small request")
    p._pending.append(Outcome(env, "out", b"x" * 1000))
    _settle(p)
    [(topic, value)] = producer.sent
    letter = AvroCodec().decode_dead_letter(value)
    assert (topic, letter.reason, letter.payload) == ("dlq", "undeliverable", b"small request")
    assert "cannot be written to out" in letter.error
    assert p.tracker.committable() == {("in", 0): 8}
    assert p._failure() is None


def test_a_dead_letter_too_large_is_sent_without_the_request_bytes() -> None:
    producer = FakeProducer(limit=400)
    p = _pipeline(producer)
    env = _envelope(p, b"y" * 1000)
    p._pending.append(p.encoder.dead_letter(env, "bad_tensor", "wrong shape"))
    _settle(p)
    [(topic, value)] = producer.sent
    letter = AvroCodec().decode_dead_letter(value)
    assert (topic, letter.reason, letter.payload) == ("dlq", "bad_tensor", b"")
    assert "bytes were dropped" in letter.error
    assert p.tracker.committable() == {("in", 0): 8}


def test_a_refused_result_reported_late_also_becomes_a_dead_letter() -> None:
    producer = FakeProducer(
        limit=10_000, late_error=KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)
    )
    p = _pipeline(producer)
    p._pending.append(Outcome(_envelope(p, b"req"), "out", b"result"))
    _settle(p)
    assert [t for t, _ in producer.sent] == ["out", "dlq"]
    assert p.tracker.committable() == {("in", 0): 8}


def test_a_transient_failure_stops_without_committing() -> None:
    producer = FakeProducer(limit=10_000, late_error=KafkaError(KafkaError._MSG_TIMED_OUT))
    p = _pipeline(producer)
    p._pending.append(Outcome(_envelope(p, b"req"), "out", b"result"))
    _settle(p)
    assert p._failure() is not None
    assert "delivery to out failed for in/0@7" in (p._failure() or "")
    assert p.tracker.committable() == {}


class PausingConsumer:
    """Records pause, resume and seek; knows each partition's position."""

    def assign(self, parts: list[Any]) -> None:
        self.assigned = parts

    def __init__(self, positions: dict[int, int]) -> None:
        self.positions = positions
        self.calls: list[tuple[str, list[tuple[int, int]]]] = []

    def pause(self, parts: list[Any]) -> None:
        self.calls.append(("pause", [(tp.partition, tp.offset) for tp in parts]))

    def resume(self, parts: list[Any]) -> None:
        self.calls.append(("resume", [(tp.partition, tp.offset) for tp in parts]))

    def position(self, parts: list[Any]) -> list[Any]:
        from confluent_kafka import TopicPartition

        return [
            TopicPartition(tp.topic, tp.partition, self.positions[tp.partition]) for tp in parts
        ]

    def seek(self, tp: Any) -> None:
        if tp.partition == 2:
            raise KafkaException(KafkaError(KafkaError._STATE, "not fetching"))
        self.calls.append(("seek", [(tp.partition, tp.offset)]))


def test_resuming_seeks_each_partition_to_where_it_stands() -> None:
    """librdkafka only fetches a resumed partition at its next timer (~0.9 s measured);
    a seek to the current position makes it fetch at once. Never-consumed partitions
    (no position) are left alone, and a refused seek is not an error."""
    consumer = PausingConsumer({0: 41, 1: -1001, 2: 5})
    topology = parse_topology(TOPOLOGY, "t.yaml", {})
    p = Replica(topology, [], "unused:9092", consumer=consumer, producer=FakeProducer(10))  # type: ignore[arg-type]
    for part in (0, 1, 2):
        p.tracker.assign(("in", part))
    for offset in range(10):  # the high mark: 10 in flight
        p.tracker.track(("in", 0), offset)
    p._apply_backpressure()
    assert [c[0] for c in consumer.calls] == ["pause"]
    for offset in range(6):  # down to the low mark (5)
        p.tracker.done(("in", 0), offset, p.tracker.generation(("in", 0)))
    p._apply_backpressure()
    assert consumer.calls[1:] == [
        ("resume", [(0, -1001), (1, -1001), (2, -1001)]),
        ("seek", [(0, 41)]),
    ]


def test_a_replica_whose_partitions_are_all_lost_is_not_ready_until_assigned_again() -> None:
    from confluent_kafka import TopicPartition

    p = _pipeline(FakeProducer(limit=10_000))
    p._on_assign(PausingConsumer({}), [TopicPartition("in", 0)])  # type: ignore[arg-type]
    assert p.health.assignment == 1
    p._on_lost(object(), [TopicPartition("in", 0)])  # type: ignore[arg-type]
    assert p.health.assignment is None
    p._on_assign(PausingConsumer({}), [])  # type: ignore[arg-type]
    assert p.health.assignment == 0  # assigned nothing on purpose: ready


def test_a_model_runtime_that_stopped_fatally_stops_the_replica() -> None:
    class Stopped:
        fatal = "model m: emit refused 3 outcomes: RuntimeError: gone"
        busy = 0

    p = _pipeline(FakeProducer(limit=10_000))
    assert p._failure() is None
    p.runtimes["m"] = Stopped()  # type: ignore[assignment]
    assert p._failure() == "model m: emit refused 3 outcomes: RuntimeError: gone"


@pytest.mark.parametrize("batches", [True, False], ids=["batch-producer", "confluent"])
def test_the_replicas_own_producer_reports_a_failed_delivery(
    batches: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A producer the replica builds hands records no callback of their own: a failure
    must still reach delivery, through `BatchProducer.resolved` or (confluent-kafka's
    producer) `Delivery.on_report`, its ``on_delivery`` setting. A real librdkafka
    producer with no broker to reach times its record out."""
    if batches and not batch_producer.COMPILED:
        pytest.skip("batch producer not compiled")
    if not batches:
        monkeypatch.setenv("KP_BATCH_PRODUCER", "0")
    topology = parse_topology(
        TOPOLOGY + "kafka: {producer: {message.timeout.ms: 300}}\n", "t.yaml", {}
    )
    p = Replica(topology, [], "127.0.0.1:1", consumer=object())  # type: ignore[arg-type]
    assert isinstance(p.producer, BatchProducer) == batches
    assert p.delivery.default_reports
    env = _envelope(p, b"request")
    p._pending.append(Outcome(env, "out", b"result"))
    p._publish()
    deadline = time.monotonic() + 10
    while p.delivery.fatal is None and time.monotonic() < deadline:
        p.producer.flush(0.2)  # serves the delivery report once the record times out
        p.delivery.confirm(force=False)
    assert "delivery to out failed for in/0@7" in (p.delivery.fatal or "")
    assert p.tracker.committable() == {}  # never done, never committed


class RebalancingConsumer:
    """Refuses commits (ILLEGAL_GENERATION) until a consume has let it rejoin the group."""

    def __init__(self, rejoins: bool = True) -> None:
        self.rejoins = rejoins
        self.rejoined = False
        self.paused: list[Any] = []
        self.commits: list[Any] = []

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition("in", 0)]

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused.append(partitions)

    def consume(self, n: int, timeout: float) -> list[Any]:
        self.rejoined = self.rejoins
        return []

    def commit(self, offsets: Any = None, asynchronous: bool = True) -> None:
        if not self.rejoined:
            raise KafkaException(KafkaError(KafkaError.ILLEGAL_GENERATION))
        self.commits.append([(o.topic, o.partition, o.offset) for o in offsets])


@pytest.mark.parametrize("rejoins", [True, False])
def test_a_replica_stopping_during_a_rebalance_commits_once_the_group_settles(
    rejoins: bool,
) -> None:
    """Its last commit is refused (the group's generation moved on); it serves the group
    with every partition paused and commits again, or stops at the deadline saying so."""
    consumer = RebalancingConsumer(rejoins)
    p = Replica(parse_topology(TOPOLOGY, "t.yaml", {}), [], "127.0.0.1:1", consumer=consumer)  # type: ignore[arg-type]
    tp = ("in", 0)
    generation = p.tracker.assign(tp)
    p.tracker.track(tp, 7)
    p.tracker.done(tp, 7, generation)
    p._commit_through_rebalance(time.monotonic() + (5 if rejoins else 0.5))
    assert consumer.paused
    if rejoins:
        assert consumer.commits == [[("in", 0, 8)]]
        assert p.tracker.committable() == {}
    else:
        assert consumer.commits == []
        assert p.tracker.committable() == {tp: 8}


class CountingConsumer:
    """Records how it is read; nothing ever arrives."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, float]] = []

    def consume(self, n: int, timeout: float) -> list[Any]:
        self.calls.append(("consume", n, timeout))
        return []

    def poll(self, timeout: float) -> None:
        self.calls.append(("poll", 1, timeout))


class OpenBatch:
    def __init__(self, due_in_s: float) -> None:
        self.due = time.monotonic() + due_in_s

    def next_deadline(self) -> float:
        return self.due


def test_with_no_batch_open_a_record_is_taken_the_moment_it_comes() -> None:
    """librdkafka's consume(n, t) holds the records it has until n or t: with nothing
    waiting in a batch the loop asks for what is there, then for the first to come."""
    consumer = CountingConsumer()
    p = Replica(parse_topology(TOPOLOGY, "t.yaml", {}), [], "unused:9092", consumer=consumer)  # type: ignore[arg-type]
    p._pull()
    assert consumer.calls == [("consume", 10, 0), ("poll", 1, 0.01)]  # flow.max_in_flight 10


def test_with_a_batch_open_records_are_gathered_until_its_deadline() -> None:
    consumer = CountingConsumer()
    p = Replica(parse_topology(TOPOLOGY, "t.yaml", {}), [], "unused:9092", consumer=consumer)  # type: ignore[arg-type]
    p.batchers = {"m": OpenBatch(0.004)}  # type: ignore[dict-item]
    p._pull()
    [(call, n, timeout)] = consumer.calls
    assert (call, n) == ("consume", 10)
    assert 0 < timeout <= 0.004


class ClosingConsumer:
    """Enough of a consumer for the replica's shutdown: it is closed, and says so."""

    closed = False

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("batches", [True, False], ids=["batch producer", "confluent-kafka's"])
def test_shutdown_closes_the_replicas_producer(
    monkeypatch: pytest.MonkeyPatch, batches: bool
) -> None:
    """Left to the collector, the producer outlived its broker (the replica sits in
    reference cycles) and logged a failed connect every few ms. (What a closing
    producer gives up: tests/pipeline/kafka.)"""
    if batches and not batch_producer.COMPILED:
        pytest.skip("batch producer not compiled")
    if not batches:
        monkeypatch.setenv("KP_BATCH_PRODUCER", "0")
    consumer = ClosingConsumer()
    p = Replica(parse_topology(TOPOLOGY, "t.yaml", {}), [], "127.0.0.1:1", consumer=consumer)  # type: ignore[arg-type]
    p._shutdown()
    assert consumer.closed
    with pytest.raises(RuntimeError, match="closed"):
        p.producer.poll(0)
