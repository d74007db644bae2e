"""What each test broker does, proven with confluent-kafka: the suite relies on these.

Three brokers: ``noida`` (noida-db), ``tansu`` (the embedded Tansu, memory engine: the
``broker`` fixture) and ``tansu_s3`` (Tansu on a moto S3 server). A property a broker
lacks is a strict xfail on that broker, with the measured reason (`GAPS`): if the broker
gains it, the test says so.
"""

from __future__ import annotations

import collections
import itertools
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from e2e.brokers import NoidaBroker, TansuS3Broker

from pipeline.config.topology import KafkaSettings
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.kafka.clients import ensure_topics
from pipeline.tools.traffic import read_topic

BROKERS = ("noida", "tansu", "tansu_s3")
FIXTURES = {"noida": "noida", "tansu": "broker", "tansu_s3": "tansu_s3"}

_TANSU_ABORTED = "Tansu 0.6 serves records of aborted transactions to read_committed readers"
_TANSU_FENCING = (
    "Tansu 0.6 detects the older epoch (its log: Storage(Api(ProducerFenced))) but closes "
    "the connection instead of answering: the zombie's commit_transaction only times out "
    "(retriable _TIMED_OUT), and what it wrote stays visible"
)
# Measured on 2026-11-25 with confluent-kafka 2.16.1, noida-db 0.2.3, Tansu 0.6.0.
GAPS: dict[tuple[str, str], str] = {
    ("read_committed", "tansu"): _TANSU_ABORTED,
    ("read_committed", "tansu_s3"): _TANSU_ABORTED,
    ("fencing", "tansu"): _TANSU_FENCING,
    ("fencing", "tansu_s3"): _TANSU_FENCING,
    ("committed_after_abort", "noida"): (
        "noida-db 0.2.3 with librdkafka 2.16: once a transactional producer has an aborted "
        "transaction in a partition, a read_committed fetch that starts past its abort "
        "marker skips every later committed record of that producer (a reader following "
        "the partition, or one starting there: 0 of 3 later commits seen from the offset "
        "after the marker, all 3 by a reader starting at offset 0 after they were written)"
    ),
    ("instant_revoke", "noida"): (
        "noida-db 0.2.3 answered the joining member's JoinGroup ~12 ms after the "
        "leader's; a leader whose revoke callback returns within ~15 ms rejoins before "
        "that, the joining member's JoinGroup is never answered, and the group stalls "
        "until the rebalance timeout (max.poll.interval.ms, 300 s by default). A revoke "
        "that takes 30 ms or more never stalled (18 of 18 rounds)"
    ),
    ("short_fetch_wait", "tansu_s3"): (
        "Tansu 0.6 on s3 lists a partition's batch objects within the fetch's max wait and "
        "stops listing when it has passed: once listing takes longer (moto here: 15 ms for "
        "50 batches, 40 ms for 200), a fetch with fetch.wait.max.ms 10 returns nothing, "
        "every time (0 of 200 records in 30 s; all with 500 ms). Topologies on it need "
        "kafka.consumer fetch.wait.max.ms: 500"
    ),
}
_MEMORY_LOST = "the memory engine loses everything with the process"
_NOIDA_LOST = (
    "noida-db 0.2.3 acknowledges writes from memory and snapshots its whole state to a "
    "JSON file (~4x the record bytes) about a second later: a SIGKILL before the snapshot "
    "loses acknowledged records (and topics)"
)
for _prop in ("survives_kill", "acked_mid_write", "idempotent_mid_write"):
    GAPS[(_prop, "tansu")] = _MEMORY_LOST
    GAPS[(_prop, "noida")] = _NOIDA_LOST
GAPS[("idempotent_mid_write", "tansu_s3")] = (
    "Tansu 0.6 on s3 keeps an idempotent producer's sequence number for a batch in flight "
    "at the SIGKILL but not the batch: the retry after the restart is answered "
    "DUPLICATE_SEQUENCE_NUMBER, which librdkafka reports as delivered, and the batch is "
    "gone: acknowledged records lost in ~60% of kills mid-write (none without idempotence)"
)

# Tansu joins a group in session.timeout.ms / 2; noida rebalances on heartbeats.
GROUP_SETTINGS: dict[str, Any] = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 250}
_names = itertools.count()


def on(prop: str, kinds: tuple[str, ...] = BROKERS) -> pytest.MarkDecorator:
    """Parametrize a test over brokers; a broker that lacks ``prop`` is a strict xfail."""
    return pytest.mark.parametrize(
        "kind",
        [
            pytest.param(
                k,
                id=k,
                marks=[pytest.mark.xfail(strict=True, reason=GAPS[(prop, k)])]
                if (prop, k) in GAPS
                else [],
            )
            for k in kinds
        ],
    )


@dataclass
class Kafka:
    """One broker under test, and the clients a test makes for it."""

    bootstrap: str
    settings: dict[str, Any]  # every client of this broker needs these
    _clients: list[Any] = field(default_factory=list)

    def topic(self, partitions: int = 1) -> str:
        name = f"bp-{next(_names)}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        admin = AdminClient({"bootstrap.servers": self.bootstrap, **self.settings})
        ensure_topics(admin, [name], partitions=partitions, replication=1)
        return name

    def producer(self, **conf: Any) -> Producer:
        return Producer({"bootstrap.servers": self.bootstrap, **self.settings, **conf})

    def consumer(self, group: str | None = None, **conf: Any) -> Consumer:
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": group or f"g-{uuid.uuid4().hex[:8]}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                **self.settings,
                **GROUP_SETTINGS,  # these tests time group rounds: their heartbeats win
                **conf,
            }
        )
        self._clients.append(consumer)
        return consumer

    def values(self, topic: str, isolation: str, count: int | None = None) -> list[bytes]:
        """Every value in ``topic`` as a reader with this isolation level sees it."""
        reader = KafkaSettings(consumer={**self.settings, "isolation.level": isolation})
        return [
            m.value()
            for m in read_topic(reader, self.bootstrap, topic, count=count, timeout=20, idle=1.5)
        ]

    def close(self) -> None:
        for c in self._clients:
            c.close()


@pytest.fixture
def kafka(kind: str, request: pytest.FixtureRequest) -> Iterator[Kafka]:
    broker = request.getfixturevalue(FIXTURES[kind])
    k = Kafka(broker.bootstrap_servers, dict(getattr(broker, "client_settings", {})))
    yield k
    k.close()


def _consume(consumer: Consumer, n: int, timeout: float = 30) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got.extend(m for m in consumer.consume(n - len(got), 0.2) if m.error() is None)
    assert len(got) == n, f"consumed {len(got)} of {n}"
    return got


def _committed(consumer: Consumer, topic: str) -> int:
    [tp] = consumer.committed([TopicPartition(topic, 0)], timeout=10)
    return int(tp.offset)


# -- transactions -------------------------------------------------------------------------


@pytest.mark.timeout(90)
@on("transactions")
def test_transactions_commit_records_with_offsets_and_abort_both(kafka: Kafka) -> None:
    """Consume-process-produce: send_offsets_to_transaction commits with the records."""
    source, sink = kafka.topic(), kafka.topic()
    plain = kafka.producer()
    for i in range(10):
        plain.produce(source, value=b"v%d" % i)
    assert plain.flush(10) == 0
    group = f"eos-{uuid.uuid4().hex[:8]}"
    consumer = kafka.consumer(group, **{"isolation.level": "read_committed"})
    consumer.subscribe([source])
    requests = _consume(consumer, 10)

    txn = kafka.producer(**{"transactional.id": f"tx-{uuid.uuid4().hex[:8]}"})
    txn.init_transactions(15)
    txn.begin_transaction()
    for m in requests[:5]:
        txn.produce(sink, value=b"ok-" + m.value())
    txn.send_offsets_to_transaction(
        [TopicPartition(source, 0, requests[4].offset() + 1)], consumer.consumer_group_metadata()
    )
    txn.commit_transaction(15)
    assert _committed(consumer, source) == 5

    txn.begin_transaction()
    for m in requests[5:]:
        txn.produce(sink, value=b"aborted-" + m.value())
    assert txn.flush(10) == 0  # on the broker, so the abort has something to abort
    txn.send_offsets_to_transaction(
        [TopicPartition(source, 0, 10)], consumer.consumer_group_metadata()
    )
    txn.abort_transaction(15)
    assert _committed(consumer, source) == 5, "an aborted transaction committed its offsets"

    txn.begin_transaction()
    txn.produce(sink, value=b"last")
    txn.commit_transaction(15)
    # A read_uncommitted reader sees everything written, aborted or not.
    assert kafka.values(sink, "read_uncommitted", count=11) == [
        *(b"ok-v%d" % i for i in range(5)),
        *(b"aborted-v%d" % i for i in range(5, 10)),
        b"last",
    ]


def _commit_abort_commit(kafka: Kafka, aborted: int = 5) -> tuple[str, Producer]:
    """A topic holding, from one transactional producer: "first" committed, ``aborted``
    records aborted (on the broker before the abort), "second" committed."""
    sink = kafka.topic()
    txn = kafka.producer(**{"transactional.id": f"tx-{uuid.uuid4().hex[:8]}"})
    txn.init_transactions(15)
    txn.begin_transaction()
    txn.produce(sink, value=b"first")
    txn.commit_transaction(15)
    txn.begin_transaction()
    for i in range(aborted):
        txn.produce(sink, value=b"aborted-%d" % i)
    assert txn.flush(10) == 0
    txn.abort_transaction(15)
    txn.begin_transaction()
    txn.produce(sink, value=b"second")
    txn.commit_transaction(15)
    return sink, txn


@pytest.mark.timeout(90)
@on("read_committed")
def test_read_committed_readers_never_see_aborted_records(kafka: Kafka) -> None:
    sink, _ = _commit_abort_commit(kafka)

    everything = kafka.values(sink, "read_uncommitted", count=7)
    assert everything == [b"first", *(b"aborted-%d" % i for i in range(5)), b"second"]
    assert kafka.values(sink, "read_committed") == [b"first", b"second"]


def _values_until(consumer: Consumer, wanted: bytes, timeout: float = 10) -> list[bytes]:
    """What ``consumer`` reads until ``wanted`` arrives or ``timeout`` passes."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while wanted not in got and time.monotonic() < deadline:
        got.extend(m.value() for m in consumer.consume(100, 0.2) if m.error() is None)
    return got


@pytest.mark.timeout(90)
@on("committed_after_abort")
def test_a_following_reader_sees_commits_after_the_producers_aborted_transaction(
    kafka: Kafka,
) -> None:
    """What a downstream consumer of an exactly-once pipeline does: it follows the output,
    and a replica that crashed comes back with the same transactional id, whose crashed
    transaction was aborted; its later commits must reach the reader."""
    sink, txn = _commit_abort_commit(kafka, aborted=3)
    reader = kafka.consumer(**{"isolation.level": "read_committed"})
    reader.assign([TopicPartition(sink, 0, 0)])
    assert b"second" in _values_until(reader, b"second")  # read from the start: all there

    txn.begin_transaction()
    txn.produce(sink, value=b"third")
    txn.commit_transaction(15)
    assert b"third" in _values_until(reader, b"third")  # fetched past the abort marker


@pytest.mark.timeout(90)
@on("fencing")
def test_a_second_producer_with_the_same_transactional_id_fences_the_first(
    kafka: Kafka,
) -> None:
    sink = kafka.topic()
    tid = f"tx-{uuid.uuid4().hex[:8]}"
    zombie = kafka.producer(**{"transactional.id": tid})
    zombie.init_transactions(15)
    zombie.begin_transaction()
    zombie.produce(sink, value=b"zombie")
    assert zombie.flush(10) == 0

    successor = kafka.producer(**{"transactional.id": tid})
    successor.init_transactions(15)  # bumps the epoch, aborts the zombie's transaction

    with pytest.raises(KafkaException) as caught:  # at once on noida; Tansu times out
        zombie.commit_transaction(5)
    err: KafkaError = caught.value.args[0]
    assert err.fatal(), err
    assert err.code() in (
        KafkaError._FENCED,
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
    ), err

    successor.begin_transaction()
    successor.produce(sink, value=b"successor")
    successor.commit_transaction(15)
    assert kafka.values(sink, "read_committed") == [b"successor"]


# -- consumer groups ----------------------------------------------------------------------


@dataclass
class Member:
    """A cooperative-sticky group member that records its rebalance callbacks."""

    name: str
    consumer: Consumer
    revoke_s: float
    owned: set[int] = field(default_factory=set)
    events: list[tuple[str, list[int]]] = field(default_factory=list)

    def on_assign(self, _: Consumer, parts: list[TopicPartition]) -> None:
        self.events.append(("assign", sorted(p.partition for p in parts)))
        self.owned.update(p.partition for p in parts)

    def on_revoke(self, _: Consumer, parts: list[TopicPartition]) -> None:
        time.sleep(self.revoke_s)  # the work a real revoke does (finish, commit)
        self.events.append(("revoke", sorted(p.partition for p in parts)))
        self.owned.difference_update(p.partition for p in parts)


def _member(kafka: Kafka, name: str, group: str, topic: str, revoke_s: float) -> Member:
    consumer = kafka.consumer(group, **{"partition.assignment.strategy": "cooperative-sticky"})
    member = Member(name, consumer, revoke_s)
    consumer.subscribe([topic], on_assign=member.on_assign, on_revoke=member.on_revoke)
    return member


def _poll_until(members: list[Member], done: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            owned = {m.name: sorted(m.owned) for m in members}
            raise AssertionError(f"no {what} within {timeout}s: {owned}")
        for m in members:
            m.consumer.poll(0.01)


# Group rounds on Tansu take ~11 s (each join waits session.timeout.ms / 2); noida's ~1 s.
_SETTLE_S = {"noida": 6.0, "tansu": 40.0, "tansu_s3": 40.0}


@pytest.mark.timeout(120)
@on("cooperative_sticky", ("noida", "tansu"))  # the group protocol is storage-blind
def test_cooperative_sticky_moves_only_the_partitions_that_must_move(
    kafka: Kafka, kind: str
) -> None:
    """A second member takes half the partitions; the first keeps serving the rest."""
    topic, group = kafka.topic(partitions=4), f"coop-{uuid.uuid4().hex[:8]}"
    a = _member(kafka, "a", group, topic, revoke_s=0.1)
    _poll_until([a], lambda: len(a.owned) == 4, _SETTLE_S[kind], "first assignment")
    assert a.events == [("assign", [0, 1, 2, 3])]

    b = _member(kafka, "b", group, topic, revoke_s=0.1)
    _poll_until(
        [a, b], lambda: len(a.owned) == 2 and len(b.owned) == 2, _SETTLE_S[kind], "2 + 2 split"
    )
    kept, moved = set(a.owned), set(b.owned)
    assert kept | moved == {0, 1, 2, 3}
    # Incremental: a gave up exactly what b got, and was never told to drop the rest.
    a_revoked = {p for what, parts in a.events if what == "revoke" for p in parts}
    a_assigned = [parts for what, parts in a.events[1:] if what == "assign"]
    assert a_revoked == moved, a.events
    assert all(parts == [] for parts in a_assigned), a.events

    a_seen = len(a.events)
    b.consumer.close()
    b.events.append(("closed", []))
    _poll_until([a], lambda: len(a.owned) == 4, _SETTLE_S[kind], "a taking back b's share")
    assert [e for e in a.events[a_seen:] if e[1]] == [("assign", sorted(moved))], a.events


@pytest.mark.timeout(120)
# Tansu takes instant revokes in its stride (the pipeline's rebalance test has them).
@on("instant_revoke", ("noida",))
def test_cooperative_sticky_with_a_revoke_that_returns_at_once(kafka: Kafka, kind: str) -> None:
    """The same join as above, repeated, with a leader whose revoke callback is instant."""
    topic, group = kafka.topic(partitions=4), f"coop-{uuid.uuid4().hex[:8]}"
    a = _member(kafka, "a", group, topic, revoke_s=0.0)
    _poll_until([a], lambda: len(a.owned) == 4, _SETTLE_S[kind], "first assignment")
    # noida stalled within two rounds in 6 of 6 runs; Tansu's rounds take ~15 s.
    rounds = 4 if kind == "noida" else 1
    for r in range(rounds):
        b = _member(kafka, f"b{r}", group, topic, revoke_s=0.0)

        def split(b: Member = b) -> bool:
            return len(a.owned) == 2 and len(b.owned) == 2

        _poll_until([a, b], split, _SETTLE_S[kind], f"2 + 2 split in round {r}")
        b.consumer.close()
        _poll_until([a], lambda: len(a.owned) == 4, _SETTLE_S[kind], "a taking back b's share")


@pytest.mark.timeout(60)
@on("pause_resume")
def test_paused_partitions_are_not_fetched_until_resumed(kafka: Kafka) -> None:
    topic = kafka.topic(partitions=2)
    consumer = kafka.consumer()
    consumer.assign([TopicPartition(topic, 0, 0), TopicPartition(topic, 1, 0)])
    consumer.pause([TopicPartition(topic, 0)])
    producer = kafka.producer()
    for i in range(20):
        producer.produce(topic, value=b"%d" % i, partition=0)
        producer.produce(topic, value=b"%d" % i, partition=1)
    assert producer.flush(10) == 0

    seen: collections.Counter[int] = collections.Counter()

    def consume_until(done: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:
            seen.update(
                cast(int, m.partition()) for m in consumer.consume(100, 0.2) if not m.error()
            )

    consume_until(lambda: seen[1] >= 20, 20)
    consume_until(lambda: False, 1.0)  # time enough for a fetch of the paused partition
    assert seen == {1: 20}

    consumer.resume([TopicPartition(topic, 0)])
    consume_until(lambda: seen[0] >= 20, 20)
    assert seen == {0: 20, 1: 20}


# The pipeline's consumer asks for fetch.wait.max.ms 10 (pipeline/kafka/clients.py says why).
SHORT_FETCH_WAIT_MS = 10
LONG_PARTITION_BATCHES = 500


@pytest.mark.timeout(120)
@on("short_fetch_wait")
def test_a_partition_of_many_batches_is_read_with_a_short_fetch_wait(kafka: Kafka) -> None:
    """A fetch that may wait only 10 ms still returns the records that are there."""
    topic = kafka.topic()
    producer = kafka.producer(**{"linger.ms": 0, "batch.num.messages": 1})
    for i in range(LONG_PARTITION_BATCHES):
        producer.produce(topic, value=b"%d" % i)
    assert producer.flush(60) == 0
    assert len(kafka.values(topic, "read_uncommitted")) == LONG_PARTITION_BATCHES
    consumer = kafka.consumer(**{"fetch.wait.max.ms": SHORT_FETCH_WAIT_MS})
    consumer.assign([TopicPartition(topic, 0, 0)])
    _consume(consumer, LONG_PARTITION_BATCHES, timeout=10)


# -- a broker killed and started again ------------------------------------------------------


@pytest.fixture
def restartable(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """A broker this test may kill: the session's tansu_s3, else a private one."""
    if kind == "tansu_s3":
        yield request.getfixturevalue("tansu_s3")
        return
    private: NoidaBroker | EmbeddedBroker
    private = NoidaBroker(tmp_path / "noida") if kind == "noida" else EmbeddedBroker()
    with private:
        yield private


def _kill_and_restart(broker: Any, down_s: float = 0.0) -> None:
    if isinstance(broker, TansuS3Broker):
        broker.stop_broker(kill=True)
        time.sleep(down_s)
        broker.start_broker()
    else:
        broker.kill()
        time.sleep(down_s)
        broker.start()


@pytest.mark.timeout(90)
@on("survives_kill")
def test_records_and_committed_offsets_survive_a_broker_kill(restartable: Any) -> None:
    kafka = Kafka(restartable.bootstrap_servers, dict(getattr(restartable, "client_settings", {})))
    try:
        topic, group = kafka.topic(partitions=4), f"kept-{uuid.uuid4().hex[:8]}"
        producer = kafka.producer(**{"enable.idempotence": True, "acks": "all"})
        for i in range(1000):
            producer.produce(topic, key=b"%d" % i, value=b"v%d" % i)
        assert producer.flush(10) == 0
        before = sorted(
            (m.partition(), m.offset(), m.value())
            for m in read_topic(
                KafkaSettings(consumer=kafka.settings),
                kafka.bootstrap,
                topic,
                count=1000,
                timeout=20,
            )
        )
        assert len(before) == 1000
        committer = kafka.consumer(group)
        offsets = [TopicPartition(topic, p, 100 + 10 * p) for p in range(4)]
        committer.commit(offsets=offsets, asynchronous=False)

        _kill_and_restart(restartable)

        after = sorted(
            (m.partition(), m.offset(), m.value())
            for m in read_topic(
                KafkaSettings(consumer=kafka.settings),
                kafka.bootstrap,
                topic,
                count=1000,
                timeout=20,
                idle=3,
            )
        )
        assert after == before, f"{len(after)} of {len(before)} records after the restart"
        reader = kafka.consumer(group)
        committed = reader.committed([TopicPartition(topic, p) for p in range(4)], timeout=10)
        assert {tp.partition: tp.offset for tp in committed} == {p: 100 + 10 * p for p in range(4)}
        # New records go after the old ones, not over them.
        ends = {p: 1 + max(o for q, o, _ in before if q == p) for p in range(4)}
        producer = kafka.producer()
        producer.produce(topic, value=b"new", partition=0)
        assert producer.flush(10) == 0
        newest = [
            m
            for m in read_topic(
                KafkaSettings(consumer=kafka.settings),
                kafka.bootstrap,
                topic,
                count=1001,
                timeout=20,
                idle=3,
            )
            if m.value() == b"new"
        ]
        assert [(m.partition(), m.offset()) for m in newest] == [(0, ends[0])]
    finally:
        kafka.close()


def _write_through_kills(broker: Any, idempotent: bool, kills: int) -> None:
    """A producer writes steadily while the broker is killed and restarted under it.

    Every record it was told is delivered must be there afterwards (at least once). Each
    kill gets a fresh topic and producer; the first kill that loses anything fails.
    """
    kafka = Kafka(broker.bootstrap_servers, dict(getattr(broker, "client_settings", {})))
    for kill in range(1, kills + 1):
        acked, failed, stored = _write_through_a_kill(kafka, broker, idempotent)
        assert not failed, f"kill {kill}: {failed[:3]}"
        lost = sorted(int(v) for v in acked - stored)
        assert not lost, f"kill {kill}: {len(lost)} of {len(acked)} acknowledged records lost"


def _write_through_a_kill(
    kafka: Kafka, broker: Any, idempotent: bool
) -> tuple[set[bytes], list[Any], set[bytes]]:
    topic = kafka.topic(partitions=4)
    producer = kafka.producer(**{"enable.idempotence": idempotent, "acks": "all", "linger.ms": 5})
    acked: set[bytes] = set()
    failed: list[Any] = []
    stop = threading.Event()

    def on_delivery(err: KafkaError | None, msg: Any) -> None:
        if err is None:
            acked.add(msg.value())
        else:
            failed.append(err)

    def write() -> None:
        try:
            for i in itertools.count():
                if stop.is_set() or failed:
                    break
                while True:
                    try:
                        producer.produce(topic, value=b"%d" % i, on_delivery=on_delivery)
                        break
                    except BufferError:
                        producer.poll(0.05)
                if i % 100 == 99:
                    producer.poll(0.02)
            left = producer.flush(15)
            if left:
                failed.append(f"{left} records neither delivered nor failed after 15 s")
        except KafkaException as e:  # a fatal error (idempotence lost its sequence)
            failed.append(e.args[0])

    def acks_reach(n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(acked) < n and not failed and time.monotonic() < deadline:
            time.sleep(0.02)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        acks_reach(3000, 20)
        _kill_and_restart(broker, down_s=0.5)
        acks_reach(len(acked) + 3000, 10)  # writing goes on after the restart
    finally:
        stop.set()
        writer.join(30)
    stored = {
        m.value()
        for m in read_topic(
            KafkaSettings(consumer=kafka.settings), kafka.bootstrap, topic, timeout=60, idle=2
        )
    }
    return acked, failed, stored


# Only the storage that survives a kill at all (survives_kill shows the others do not).
@pytest.mark.timeout(120)
@on("acked_mid_write", ("tansu_s3",))
def test_acknowledged_records_survive_kills_mid_write(restartable: Any) -> None:
    _write_through_kills(restartable, idempotent=False, kills=4)


@pytest.mark.timeout(150)
@on("idempotent_mid_write", ("tansu_s3",))
def test_an_idempotent_producers_acknowledged_records_survive_kills_mid_write(
    restartable: Any,
) -> None:
    # Tansu s3 lost a batch in ~60% of kills (10 kills measured): 8 kills make a pass
    # there all but impossible (0.4^8 < 0.1%), so its strict xfail is a dependable one.
    _write_through_kills(restartable, idempotent=True, kills=8)
