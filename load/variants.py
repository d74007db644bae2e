"""The contenders of the side-by-side benchmark; each returns a `Timing`.

Every Kafka variant reads the same input topic with its own consumer group and writes its
own output topic on the same broker, and is timed from its first consumed record to its
last output acknowledged by the broker: the group join (``session.timeout.ms / 2`` on
Tansu) happens before the clock starts, so it is not counted.

The reference variants (naive, model alone, preprocess + model) run the topology's own
stages and model through `pipeline.serving.graph.build_model`, so the work per request is the
same as in kp-pipeline; only the way it is scheduled differs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import numpy as np
from confluent_kafka import Consumer, KafkaError, Message, Producer

from pipeline.app import OpenTopology
from pipeline.serving.graph import ServedModel, build_model
from pipeline.serving.outcomes import OutcomeEncoder
from pipeline.serving.steps import complete, prepare
from pipeline.tools.demo import BackgroundPipeline
from schemas.codec import AvroCodec
from schemas.messages import Envelope, Request
from stages.base import Batch

__all__ = [
    "BenchError",
    "Source",
    "Timing",
    "faust_agent",
    "kafka_round_trip",
    "kp_pipeline",
    "model_alone",
    "naive",
    "passthrough",
    "preprocess_and_model",
    "reference_graph",
]

Feeds = dict[str, np.ndarray[Any, Any]]


class BenchError(RuntimeError):
    """A variant did not finish, or lost records: its figure would be meaningless."""


class Timing(NamedTuple):
    """Requests served and the seconds they took; ``note`` flags anything odd."""

    requests: int
    seconds: float
    note: str = ""


# -- Kafka variants ---------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """The shared input topic and what every hand-written Kafka variant is given."""

    bootstrap: str
    topic: str
    producer_conf: dict[str, Any]  # the pipeline's own producer settings
    timeout: float
    # consume(n, wait) returns only when n records are there or the wait is over, so a
    # long wait would start the clock after a whole batch had been fetched: wait as long
    # as kp-pipeline does (flow.poll_timeout_ms).
    consume_wait_s: float

    def out(self, variant: str) -> str:
        """The variant's own output topic."""
        return f"{self.topic}.{variant}"

    def consumer(self, variant: str) -> Consumer:
        """A plain consumer in the variant's own group, manual commits.

        The short session makes Tansu group joins quick (they take half of it).
        """
        c = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"{self.topic}.{variant}",
                "client.id": f"bench-{variant}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "enable.partition.eof": False,
                "session.timeout.ms": 6000,
            }
        )
        c.subscribe([self.topic])
        return c


def kp_pipeline(
    opened: OpenTopology,
    bootstrap: str,
    n: int,
    timeout: float,
    on_started: Callable[[], None] | None = None,
    before_stop: Callable[[], None] | None = None,
) -> Timing:
    """The pipeline as users run it, on a thread; timed by its own RunStats clocks.

    ``on_started`` runs once partitions are assigned, ``before_stop`` once every request
    is delivered while the pipeline's threads still exist (the backend benchmark reads
    their CPU time between the two).
    """
    served = BackgroundPipeline(opened, bootstrap).start(timeout)
    if on_started is not None:
        on_started()
    assert served.pipeline is not None
    stats = served.pipeline.stats
    deadline = time.monotonic() + timeout
    try:
        while stats.results + stats.dead_letters < n:
            if served.error is not None or time.monotonic() > deadline:
                raise BenchError(
                    f"kp-pipeline delivered {stats.results} results and {stats.dead_letters} "
                    f"dead letters of {n} requests (error: {served.error!r})"
                )
            time.sleep(0.01)
        if before_stop is not None:
            before_stop()
    finally:
        served.stop()
    assert stats.first_consumed is not None
    assert stats.last_delivered is not None
    note = f"{stats.dead_letters} dead letters" if stats.dead_letters else ""
    return Timing(n, stats.last_delivered - stats.first_consumed, note)


def faust_agent(opened: OpenTopology, bootstrap: str, n: int, timeout: float) -> Timing:
    """The same job as a faust-streaming agent, through `pipeline.integrations.faust`.

    What a Faust user would write: `load.faust_app.make_app` (Faust's defaults, plus the
    6 s session Tansu's group joins need) and the adapter's agent, which takes batches
    of the topology's size and delay (``noack_take``), runs them through the same
    stages and model, and acks each batch once its outcomes are acknowledged. It reads
    the topology's input in its own group and writes its own output and dead-letter
    topics. Timed by the adapter's clocks: from the first record Faust consumed to the
    last outcome the broker acknowledged.
    """
    import tempfile
    from pathlib import Path

    from confluent_kafka.admin import AdminClient

    from load.faust_app import FaustWorkerThread, make_app
    from pipeline.integrations.faust import KpFaustModel, attach
    from pipeline.kafka.clients import ensure_topics

    topics = opened.topology.topics
    source = topics.input[0]
    out = f"{source}.faust"
    mine = topics.model_copy(update={"output": out, "dead_letter": f"{out}.dlq"})
    ensure_topics(
        AdminClient({"bootstrap.servers": bootstrap}), [mine.output, mine.dead_letter], 4, 1
    )
    topology = opened.topology.model_copy(update={"topics": mine})
    with (
        KpFaustModel.from_opened(OpenTopology(topology, opened.source, opened.base_dir)) as model,
        tempfile.TemporaryDirectory() as datadir,
    ):
        app = make_app(f"{source}.faust", bootstrap, Path(datadir))
        attach(app, model)
        worker = FaustWorkerThread(app).start(timeout)
        stats = model.stats
        deadline = time.monotonic() + timeout
        try:
            while stats.results + stats.dead_letters < n:
                if worker.crashed or worker.error is not None or time.monotonic() > deadline:
                    raise BenchError(
                        f"faust agent delivered {stats.results} results and "
                        f"{stats.dead_letters} dead letters of {n} requests "
                        f"(error: {worker.error!r})"
                    )
                time.sleep(0.01)
        finally:
            worker.stop()
    assert stats.first_consumed is not None
    assert stats.last_delivered is not None
    note = f"{stats.dead_letters} dead letters" if stats.dead_letters else ""
    return Timing(n, stats.last_delivered - stats.first_consumed, note)


def naive(graph: ServedModel, src: Source, n: int) -> Timing:
    """One message, one inference, one produce (flushed), one synchronous commit.

    The loop most first consumers are: correct and simple, and it pays a broker round
    trip for the produce and another for the commit on every request.
    """
    out = src.out("naive")
    codec = AvroCodec()
    encoder = OutcomeEncoder(codec, out, f"{out}.dlq")
    backend = graph.instances[0]
    consumer = src.consumer("naive")
    producer = Producer({**src.producer_conf, "linger.ms": 0, "client.id": "bench-naive"})
    failures = _Failures()
    done, start = 0, 0.0
    deadline = time.monotonic() + src.timeout
    try:
        while done < n:
            _check_deadline("naive consumer", done, n, deadline)
            msg = consumer.poll(0.5)
            if msg is None or msg.error() is not None:
                continue
            now = time.monotonic()
            if done == 0:
                start = now
            env = _envelope(msg, now, codec.decode_request(msg.value() or b""))
            item = prepare(graph, encoder, [env])
            for outcome in item.dead_letters + complete(graph, encoder, backend, item):
                producer.produce(outcome.topic, outcome.value, msg.key(), on_delivery=failures)
            producer.flush()
            consumer.commit(message=msg, asynchronous=False)
            done += 1
        elapsed = time.monotonic() - start
    finally:
        consumer.close()
    if failures.errors:
        raise BenchError(f"naive consumer: produce failed: {failures.errors[:3]}")
    return Timing(done, elapsed)


def passthrough(src: Source, n: int) -> Timing:
    """Kafka's ceiling for this payload: consume batches, produce each value unchanged.

    Uses the pipeline's producer settings, so the gap to kp-pipeline is the pipeline's own
    cost (decoding, batching, inference, encoding, offset tracking), not client tuning.
    """
    out = src.out("pass")
    consumer = src.consumer("pass")
    producer = Producer({**src.producer_conf, "client.id": "bench-pass"})
    failures = _Failures()
    done, start = 0, 0.0
    deadline = time.monotonic() + src.timeout
    try:
        while done < n:
            _check_deadline("pass-through", done, n, deadline)
            msgs = consumer.consume(500, src.consume_wait_s)
            if not msgs:
                continue
            if done == 0:
                start = time.monotonic()
            for m in msgs:
                if m.error() is not None:
                    continue
                while True:
                    try:
                        producer.produce(out, m.value(), m.key(), on_delivery=failures)
                        break
                    except BufferError:
                        producer.poll(0.05)
                done += 1
            producer.poll(0)
            consumer.commit(asynchronous=True)
        left = producer.flush(src.timeout)
        elapsed = time.monotonic() - start
    finally:
        consumer.close()
    if left or failures.errors:
        raise BenchError(f"pass-through: {left} unacknowledged, failed: {failures.errors[:3]}")
    return Timing(done, elapsed)


# -- references without Kafka ------------------------------------------------------------


def model_alone(graph: ServedModel, requests: Sequence[Request], batch_size: int, n: int) -> Timing:
    """backend.infer on one preprocessed batch, repeated: the model's own ceiling."""
    backend = graph.instances[0]
    encoder = OutcomeEncoder(AvroCodec(), "out", "dlq")
    feeds = _feeds(graph, prepare(graph, encoder, _rows(requests[:batch_size])).batch)
    backend.infer(feeds)  # warm-up: the first call at a new shape allocates
    done, start = 0, time.monotonic()
    while done < n:
        backend.infer(feeds)
        done += batch_size
    return Timing(done, time.monotonic() - start)


def preprocess_and_model(
    graph: ServedModel, requests: Sequence[Request], batch_size: int, n: int
) -> Timing:
    """Decode, preprocess, infer and postprocess back to back in one thread, no Kafka.

    Starts from the requests' tensors (the encoded JPEG bytes for images), so it does all
    the per-request work kp-pipeline does except Kafka and request decoding, through the
    same steps (`prepare`, `complete`) its model threads run; a pipeline that overlaps
    decoding with inference can beat it.
    """
    backend = graph.instances[0]
    encoder = OutcomeEncoder(AvroCodec(), "out", "dlq")
    rows = _rows(requests)

    def one(first: int) -> int:
        chunk = [rows[(first + j) % len(rows)] for j in range(batch_size)]
        complete(graph, encoder, backend, prepare(graph, encoder, chunk))
        return len(chunk)

    one(0)  # warm-up at this batch size
    done, start = 0, time.monotonic()
    while done < n:
        done += one(done)
    return Timing(done, time.monotonic() - start)


def reference_graph(opened: OpenTopology, options: dict[str, Any] | None = None) -> ServedModel:
    """The topology's first model as one instance, with the runtime's default threading.

    The reference variants run a single stream of work, for which the runtime's default
    (a thread per core) is its best setting; the topology's instances and thread counts
    are tuned for kp-pipeline's overlap of decoding and inference instead. Giving each
    reference its own best setting keeps the comparison honest. ``options`` replaces the
    backend's options (the backend benchmark asks for every core explicitly).
    """
    m = opened.topology.models[0]
    single = m.model_copy(update={"instances": 1, "options": options or {}})
    return build_model(single, f"{opened.source}: models[0]", opened.base_dir)


# -- helpers -----------------------------------------------------------------------------


class _Failures:
    """A delivery callback that keeps the errors: a lost output would flatter the rate."""

    def __init__(self) -> None:
        self.errors: list[KafkaError] = []

    def __call__(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self.errors.append(err)


def _check_deadline(name: str, done: int, n: int, deadline: float) -> None:
    if time.monotonic() > deadline:
        raise BenchError(f"{name}: only {done} of {n} records within the time limit")


def _envelope(msg: Message, now: float, request: Request) -> Envelope:
    return Envelope(
        topic=cast(str, msg.topic()),
        partition=cast(int, msg.partition()),
        offset=cast(int, msg.offset()),
        key=msg.key(),
        value=msg.value() or b"",
        timestamp_ms=msg.timestamp()[1],
        consumed_at=now,
        request=request,
    )


def _rows(requests: Sequence[Request]) -> list[Envelope]:
    """Requests as the envelopes the model runtime works on (no Kafka record behind them)."""
    now = time.monotonic()
    return [Envelope("in", 0, i, None, b"", 0, now, request=r) for i, r in enumerate(requests)]


def _feeds(graph: ServedModel, batch: Batch) -> Feeds:
    return {name: np.asarray(batch.columns[name]) for name in graph.info.inputs}


def kafka_round_trip(
    bootstrap: str,
    topic: str,
    rate: float,
    seconds: float,
    read_from: str | None = None,
    size: int = 300,
) -> tuple[float, float, float, float]:
    """p50/p90/p99/p99.9 ms from produce() to a consumer reading the record.

    The broker's own floor for the latency check: open-loop sends at ``rate`` of a
    ``size``-byte record (300: the tiny request's size) to ``topic``, read back from
    ``read_from`` (default ``topic`` itself: one hop, nothing between; an echo service's
    reply topic: a request's whole round trip, `load.echo`) by an assign()-based consumer
    with ``fetch.wait.max.ms`` 5, the same clock on both ends.
    """
    import threading

    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import AdminClient

    from pipeline.kafka.clients import ensure_topics

    read_from = read_from or topic
    ensure_topics(AdminClient({"bootstrap.servers": bootstrap}), [topic, read_from], 4, 1)
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "kp-floor", "fetch.wait.max.ms": 5,
         "enable.auto.commit": False}
    )  # fmt: skip
    consumer.assign([TopicPartition(read_from, p, -1) for p in range(4)])  # from the end
    sent: dict[bytes, float] = {}
    latencies: list[float] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            msg = consumer.poll(0.05)
            if msg is not None and msg.error() is None:
                at = sent.get(cast(bytes, msg.key()))
                if at is not None:
                    latencies.append((time.perf_counter() - at) * 1000.0)

    reader = threading.Thread(target=read, name="floor-reader")
    reader.start()
    time.sleep(1.0)  # the reader's first fetch is in place
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})  # the generator's
    rng = np.random.default_rng(7)
    start, due = time.perf_counter(), 0.0
    payload = b"x" * size
    for i in range(int(rate * seconds)):
        due += float(rng.exponential(1.0 / rate))
        pause = start + due - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        key = str(i).encode()
        sent[key] = time.perf_counter()
        producer.produce(topic, payload, key)
        producer.poll(0)
    producer.flush(30)
    deadline = time.monotonic() + 10
    while len(latencies) < len(sent) and time.monotonic() < deadline:
        time.sleep(0.05)
    done.set()
    reader.join()
    consumer.close()
    p = np.percentile(np.asarray(latencies or [0.0]), [50, 90, 99, 99.9])
    return float(p[0]), float(p[1]), float(p[2]), float(p[3])
