"""`Replica._accept` on fuzzed consumed batches: each record one dead letter or batch row.

Real confluent `Message` objects carry hypothesis' bytes (random, valid requests, valid
requests mutated, empty values, tombstones) into a Replica over a real graph (the tiny
MLP and the MiniLM text model, whose router tokenizes to pick a bucket), with the Kafka
clients replaced by doubles. Nothing may raise; every record must be held by the offset
tracker and end as exactly one dead letter or one batch row, as an independent decode and
route of the same bytes says. A longer run then serves a fixed fuzzed corpus to the end:
models, producer, commits.
"""

from __future__ import annotations

import functools
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME, KafkaError, KafkaException, Message, Producer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline.config.loader import parse_topology
from pipeline.engine.loop import Replica
from pipeline.serving.graph import ServedModel, build_graph
from pipeline.tools.traffic import tensor_request, text_request
from schemas.codec import AvroCodec, load_schema
from schemas.errors import RequestError
from schemas.messages import Envelope
from schemas.wire import frame

ROOT = Path(__file__).resolve().parents[3]
TOPIC = "in"
TOPOLOGY = """
topics: {input: [in], output: out, dead_letter: dlq}
flow: {max_in_flight: 100000}
models:
  - name: tiny-mlp
    version: "1"
    backend: onnxruntime
    artifact: models/tiny_mlp.onnx
    options: {intra_op_threads: 1}
    inputs: [{name: x, datatype: FP32, shape: [64]}]
    batching: {max_batch_size: 4, max_delay_ms: 5}
    postprocess:
      - {stage: softmax, input: logits, output: probs}
      - {stage: topk, input: probs, k: 3}
  - name: minilm-l6
    backend: onnxruntime
    artifact: models/minilm_l6_int8.onnx
    options: {intra_op_threads: 1}
    inputs: [{name: text, datatype: BYTES, shape: [1]}]
    batching: {max_batch_size: 4, max_delay_ms: 5}
    preprocess:
      - {stage: tokenize, input: text, tokenizer: models/minilm_tokenizer.json,
         buckets: [16, 32, 64, 128]}
    postprocess:
      - {stage: mean_pool, input: last_hidden_state, mask: attention_mask, output: embedding}
      - {stage: l2_normalize, input: embedding}
"""


def fuzz(examples: int) -> settings:
    """Same examples every run, no deadline (pytest-timeout catches a hang)."""
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


class StubRegistry:
    """Schema id 1 is our request schema; any other id is unknown."""

    def schema_by_id(self, schema_id: int) -> dict[str, Any]:
        if schema_id != 1:
            raise LookupError(f"no schema {schema_id}")
        return load_schema("request")


PLAIN = AvroCodec()
REGISTRY = AvroCodec(StubRegistry(), request_schema_id=1)


@functools.cache
def graph() -> list[ServedModel]:
    for artifact in ("tiny_mlp.onnx", "minilm_l6_int8.onnx", "minilm_tokenizer.json"):
        if not (ROOT / "models" / artifact).exists():
            pytest.skip(f"models/{artifact} missing: run `make models`")
    return build_graph(parse_topology(TOPOLOGY, "fuzz.yaml", {}), "fuzz.yaml", ROOT)


class FakeProducer:
    """Acks on poll(), reporting nothing (``delivery.report.only.error``); ``len`` is what
    it holds unacknowledged; refuses what librdkafka refuses at produce() time.

    A message whose key and value exceed ``limit`` (message.max.bytes, 1,000,000 by
    default) raises MSG_SIZE_TOO_LARGE; a topic name with a NUL raises ValueError, as
    confluent_kafka does (`test_the_real_client_refuses_what_the_fake_refuses`).
    """

    def __init__(self, limit: int = 1_000_000) -> None:
        self.limit = limit
        self.sent: list[tuple[str, bytes | None, bytes]] = []
        self._acks: list[Any] = []

    def produce(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        headers: Any = None,
        on_delivery: Any = None,
    ) -> None:
        if "\x00" in topic:
            raise ValueError("embedded null character")
        if len(value) + len(key or b"") > self.limit:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "too large"))
        self.sent.append((topic, key, value))
        self._acks.append(on_delivery)

    def poll(self, _: float = 0) -> int:
        self._acks = []  # all delivered: no report for a success
        return 0

    def flush(self, _: float = 0) -> int:
        self.poll()
        return 0

    def __len__(self) -> int:
        return len(self._acks)


def pipeline(
    codec: AvroCodec, producer: FakeProducer | None = None
) -> tuple[Replica, list[Envelope]]:
    """A Replica over the real graph; what its runtimes were handed is returned.

    Always with a fake producer: a real one per hypothesis example costs ~0.1 s to destroy.
    """
    topology = parse_topology(TOPOLOGY, "fuzz.yaml", {})
    p = Replica(
        topology,
        graph(),
        "unused:9092",
        codec=codec,
        consumer=object(),  # type: ignore[arg-type]
        producer=FakeProducer() if producer is None else producer,  # type: ignore[arg-type]
    )
    submitted: list[Envelope] = []

    def submit(rows: list[Envelope], *_: Any) -> None:  # emit, the requests' class
        submitted.extend(rows)

    for runtime in p.runtimes.values():
        runtime.submit = submit  # type: ignore[method-assign]
    for partition in (0, 1, 2):
        p.tracker.assign((TOPIC, partition))
    return p, submitted


def message(partition: int, offset: int, value: bytes | None, key: bytes | None) -> Message:
    stamp = (TIMESTAMP_CREATE_TIME, 1_700_000_000_000 + offset) if offset % 3 else (0, -1)
    return Message(
        topic=TOPIC, partition=partition, offset=offset, key=key, value=value, timestamp=stamp
    )


def oracle(codec: AvroCodec, p: Replica, value: bytes | None) -> str:
    """What should become of a value, decoded and routed on its own."""
    if value is None:
        return "bad_request"
    try:
        request = codec.decode_request(value)
        p.intake.router.route(request).batch_key(request)
    except RequestError as e:
        return e.reason
    return "batched"


# -- the records ----------------------------------------------------------------------------

floats64 = hnp.arrays(np.float32, 64, elements=st.floats(width=32))
valid = st.one_of(
    st.builds(
        lambda rid, x: PLAIN.encode_request(tensor_request(rid, "tiny-mlp", {"x": x})),
        st.text(max_size=6),
        floats64,
    ),
    st.builds(
        lambda rid, text: PLAIN.encode_request(text_request(rid, "minilm-l6", text)),
        st.text(max_size=6),
        st.text(max_size=120),
    ),
)


def mutate(data: bytes, at: int, noise: bytes, op: str) -> bytes:
    """One blind mutation of a valid request."""
    i = at % (len(data) + 1)
    if op == "flip" and i < len(data):
        return data[:i] + bytes([data[i] ^ (noise[0] if noise else 1)]) + data[i + 1 :]
    if op == "truncate":
        return data[:i]
    if op == "insert":
        return data[:i] + noise + data[i:]
    return data[:i] + noise + data[i + len(noise) :]  # overwrite


mutated = st.builds(
    mutate,
    valid,
    st.integers(0, 2**16),
    st.binary(max_size=8),
    st.sampled_from(["flip", "truncate", "insert", "overwrite"]),
)
values = st.one_of(
    st.none(),  # a tombstone
    st.just(b""),
    st.binary(max_size=300),
    valid,
    mutated,
    mutated,
)
# (partition, value, key, delivered twice?)
records = st.lists(
    st.tuples(
        st.integers(0, 2),
        values,
        st.none() | st.binary(max_size=8),
        st.integers(0, 9).map(lambda n: n == 0),
    ),
    max_size=40,
)


# -- every record: one dead letter or one batch row -------------------------------------------


def check_accept(
    codec: AvroCodec, recs: list[tuple[int, bytes | None, bytes | None, bool]]
) -> None:
    p, submitted = pipeline(codec)
    ends = {0: 0, 1: 0, 2: 0}
    served: dict[tuple[int, int], bytes | None] = {}
    now = time.monotonic()
    consumed: list[Message] = []
    for partition, value, key, twice in recs:
        offset = ends[partition]
        ends[partition] += 1
        msg = message(partition, offset, value, key)
        consumed.append(msg)
        if twice:  # re-delivered by the client: already served, ignored
            consumed.append(msg)
        served[(partition, offset)] = value
    for start in range(0, len(consumed), 7):  # consumed batches; a repeat may cross one
        p._accept(consumed[start : start + 7], now)

    batched = submitted + [
        env for b in p.batchers.values() for flushed in b.drain() for env in flushed.items
    ]
    letters = [(out, PLAIN.decode_dead_letter(out.value)) for out in p._pending]
    assert all(out.topic == "dlq" for out, _ in letters)
    where = Counter((env.partition, env.offset) for env in batched)
    where.update((letter.partition, letter.offset) for _, letter in letters)
    assert where == Counter(served.keys())  # each record exactly once

    for out, letter in letters:
        value = served[(letter.partition, letter.offset)]
        assert letter.topic == TOPIC
        assert letter.payload == (value or b"")
        assert letter.reason == out.reason == oracle(codec, p, value) != "batched"
        assert letter.error
        assert out.headers is not None
        assert dict(out.headers)["kp.reason"] == letter.reason.encode()
    for env in batched:
        assert env.request is not None
        assert oracle(codec, p, served[(env.partition, env.offset)]) == "batched"

    assert p.stats.consumed == len(served)
    assert p.tracker.in_flight == len(served)
    assert p.tracker.in_flight_bytes == sum(len(v or b"") for v in served.values())
    for partition, offset in served:
        generation = p.tracker.generation((TOPIC, partition))
        assert generation is not None
        p.tracker.done((TOPIC, partition), offset, generation)
    assert p.tracker.committable() == {(TOPIC, part): end for part, end in ends.items() if end}
    assert p.tracker.in_flight == 0


@given(records)
@fuzz(200)
def test_every_plain_record_is_one_dead_letter_or_one_batch_row(
    recs: list[tuple[int, bytes | None, bytes | None, bool]],
) -> None:
    check_accept(PLAIN, recs)


@given(records)
@fuzz(150)
def test_every_wire_format_record_is_one_dead_letter_or_one_batch_row(
    recs: list[tuple[int, bytes | None, bytes | None, bool]],
) -> None:
    framed = [(p, frame(1, v) if v and i % 4 else v, k, t) for i, (p, v, k, t) in enumerate(recs)]
    check_accept(REGISTRY, framed)


# -- a fixed fuzzed corpus served to the end ----------------------------------------------------


def corpus(n: int, seed: int) -> list[bytes | None]:
    """Valid requests and random.Random mutations of them, a tombstone, an empty value."""
    rng = random.Random(seed)
    vectors = np.random.default_rng(seed).standard_normal((n, 64)).astype(np.float32)
    out: list[bytes | None] = [None, b""]
    for i in range(n):
        if i % 3 == 0:
            good = PLAIN.encode_request(text_request(f"t{i}", "minilm-l6", f"text number {i} é"))
        else:
            good = PLAIN.encode_request(tensor_request(f"v{i}", "tiny-mlp", {"x": vectors[i]}))
        out.append(good)
        noise = rng.randbytes(rng.randint(1, 8))
        op = rng.choice(["flip", "truncate", "insert", "overwrite"])
        out.append(mutate(good, rng.randrange(len(good) + 1), noise, op))
        out.append(rng.randbytes(rng.randint(0, 200)))
    return out


@pytest.mark.timeout(60)
def test_a_fuzzed_corpus_is_served_to_the_end() -> None:
    """Models, producer and tracker: every record ends as one outcome, all offsets commit."""
    producer = FakeProducer()
    p, _ = pipeline(PLAIN, producer)
    del p.runtimes["tiny-mlp"].submit, p.runtimes["minilm-l6"].submit  # the real ones
    values = corpus(60, seed=11)
    expected = Counter(oracle(PLAIN, p, v) for v in values)
    for runtime in p.runtimes.values():
        runtime.start()
    try:
        now = time.monotonic()
        msgs = [message(o % 3, o // 3, value, None) for o, value in enumerate(values)]
        for start in range(0, len(msgs), 50):
            p._accept(msgs[start : start + 50], now)
        for name, batcher in p.batchers.items():
            for flushed in batcher.drain():
                p.submit(name, flushed)
        deadline = time.monotonic() + 30
        while p.tracker.in_flight and time.monotonic() < deadline:
            p._publish()
            producer.poll()
            p.delivery.confirm(force=False)
            time.sleep(0.01)
    finally:
        for runtime in p.runtimes.values():
            runtime.stop(timeout=10)
    assert p._failure() is None
    assert p.tracker.in_flight == 0
    ends = Counter(offset % 3 for offset in range(len(values)))
    assert p.tracker.committable() == {(TOPIC, part): n for part, n in ends.items()}

    results = [PLAIN.decode_result(v) for t, _, v in producer.sent if t == "out"]
    letters = [PLAIN.decode_dead_letter(v) for t, _, v in producer.sent if t == "dlq"]
    sources = Counter((r.partition, r.offset) for r in results)
    sources.update((d.partition, d.offset) for d in letters)
    assert sources == Counter((o % 3, o // 3) for o in range(len(values)))  # one outcome each
    assert len(results) == expected["batched"]
    assert Counter(d.reason for d in letters) == {
        k: n for k, n in expected.items() if k != "batched"
    }
    assert {r.status.value for r in results} == {"OK"}


# -- findings ---------------------------------------------------------------------------------


def test_the_real_client_refuses_what_the_fake_refuses() -> None:
    real = Producer({"bootstrap.servers": "127.0.0.1:1", "log_level": 0})
    try:
        with pytest.raises(ValueError, match="embedded null"):
            real.produce("replies\x00", b"v")
        with pytest.raises(KafkaException, match="MSG_SIZE_TOO_LARGE"):
            real.produce("ok", b"x" * 999_000, b"k" * 2_000)
    finally:
        real.purge()
        real.flush(0)


def test_a_reply_topic_kafka_cannot_name_is_a_dead_letter_not_a_crash() -> None:
    producer = FakeProducer()
    p, submitted = pipeline(PLAIN, producer)
    request = tensor_request("r", "tiny-mlp", {"x": np.zeros(64, np.float32)})
    request.reply_topic = "replies\x00"
    p._accept([message(0, 0, PLAIN.encode_request(request), b"r")], time.monotonic())
    rows = submitted + [e for b in p.batchers.values() for f in b.drain() for e in f.items]
    if rows:  # routed: the model answers, and the result goes to the reply topic
        columns = {"classes": np.zeros((1, 3), np.int64), "scores": np.zeros((1, 3), np.float32)}
        p._pending.extend(
            p.encoder.results(rows, "tiny-mlp", "1", columns, time.monotonic(), (0, 0, 0), 1)
        )
    for _ in range(3):
        p._publish()
        producer.poll()
        p.delivery.confirm(force=False)
    assert [t for t, _, _ in producer.sent] == ["dlq"]
    assert p.tracker.committable() == {(TOPIC, 0): 1}


def test_a_dead_letter_too_large_even_without_the_payload_is_trimmed_further() -> None:
    producer = FakeProducer(limit=1_000_000)
    p, _ = pipeline(PLAIN, producer)
    request = tensor_request("i" * 1_040_000, "no-such-model", {"x": np.zeros(64, np.float32)})
    value = PLAIN.encode_request(request)
    assert 1_000_000 < len(value) < 1_048_588  # a broker with default settings takes it
    p._accept([message(0, 0, value, None)], time.monotonic())
    for _ in range(3):
        p._publish()
        producer.poll()
        p.delivery.confirm(force=False)
    assert p._failure() is None
    assert [t for t, _, _ in producer.sent] == ["dlq"]
    assert p.tracker.committable() == {(TOPIC, 0): 1}
