"""`kp-pipeline run` on a real broker, fed fuzzed records among valid requests.

500 valid requests for the tiny MLP are interleaved with 500 fuzzed records: mutations of
valid requests (bit flips, truncations, insertions, deletions, overwrites, splices of two
requests, repeated chunks, forged lengths and counts), random bytes, an empty value, a
tombstone and a 1 MiB garbage value, all from a fixed seed. The process must stay up; each
record must end as exactly one outcome, counted by its source partition and offset: a
result for every valid request, a dead letter for every fuzzed record, or a result where
a mutation happened to leave a valid request (an independent decode and route says
which); the committed offsets must reach the end; SIGTERM must exit 0.
"""

from __future__ import annotations

import random
import signal
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from e2e.kit import (
    Topics,
    committed_offsets,
    end_offsets,
    spawn_run,
    tiny_vectors,
    wait_for,
    write_tiny_topology,
)

from pipeline.config.loader import load_topology
from pipeline.config.topology import KafkaSettings
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.serving.routing import ModelRoute, Router
from pipeline.tools.traffic import produce_requests, read_topic, tensor_request
from schemas.binary import decode_long, encode_long
from schemas.codec import AvroCodec
from schemas.errors import RequestError

N = 500
SEED = 20_250_611
GARBAGE_SIZE = 1 << 20
CODEC = AvroCodec()
Record = tuple[bytes, bytes | None]  # key, value


def varint_spans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of every varint of a well-formed plain request: lengths, counts, longs."""
    spans: list[tuple[int, int]] = []
    pos = 0

    def long() -> int:
        nonlocal pos
        start = pos
        value, pos = decode_long(data, pos)
        spans.append((start, pos))
        return value

    def blob() -> None:
        nonlocal pos
        size = long()
        pos += size

    def array(item: Callable[[], object]) -> None:
        while (count := long()) != 0:
            if count < 0:
                count = -count
                long()  # the block's byte size
            for _ in range(count):
                item()

    def tensor() -> None:
        blob()
        blob()
        array(long)
        blob()

    blob()  # id
    blob()  # model
    if long() == 1:
        blob()
    array(tensor)
    array(lambda: (blob(), blob()))
    if long() == 1:
        long()
    if long() == 1:
        blob()
    return spans


def mutate(rng: random.Random, data: bytes, other: bytes) -> bytes:
    """One mutation of a valid request, chosen and placed by ``rng``."""
    n = len(data)
    at = rng.randrange(n + 1)
    op = rng.choice(
        ["flip", "truncate", "insert", "delete", "overwrite", "splice", "repeat", "forge"]
    )
    if op == "flip":
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(n)] ^= 1 << rng.randrange(8)
        return bytes(out)
    if op == "truncate":
        return data[:at]
    if op == "insert":
        return data[:at] + rng.randbytes(rng.randint(1, 32)) + data[at:]
    if op == "delete":
        return data[:at] + data[at + rng.randint(1, 32) :]
    if op == "overwrite":
        noise = rng.randbytes(rng.randint(1, 32))
        return data[:at] + noise + data[at + len(noise) :]
    if op == "splice":
        return data[:at] + other[rng.randrange(len(other) + 1) :]
    if op == "repeat":
        return data[:at] + data[at : at + rng.randint(1, 16)] * rng.randint(2, 64) + data[at:]
    start, end = rng.choice(varint_spans(data))  # forge a length, count or long
    claim = rng.choice([2**31, 2**40, 2**62, 2**63 - 1, -1, -(2**63), rng.getrandbits(63)])
    return data[:start] + encode_long(claim) + data[end:]


def corpus(router: Router) -> tuple[list[Record], set[bytes]]:
    """Valid and fuzzed records interleaved, and the keys of the fuzzed ones."""
    rng = random.Random(SEED)
    valid = [
        CODEC.encode_request(tensor_request(f"v-{i}", "tiny-mlp", {"x": x}))
        for i, x in enumerate(tiny_vectors(N, seed=SEED % 1000))
    ]
    fuzzed: list[bytes | None] = [b"", None, rng.randbytes(GARBAGE_SIZE)]
    while len(fuzzed) < N:
        if rng.random() < 0.1:
            fuzzed.append(rng.randbytes(rng.randint(1, 400)))
            continue
        value = mutate(rng, rng.choice(valid), rng.choice(valid))
        if outcome(router, value) == "batched" and CODEC.decode_request(value).reply_topic:
            continue  # its result would go to a topic of its own choosing
        fuzzed.append(value)
    rng.shuffle(fuzzed)
    records: list[Record] = []
    for i in range(N):
        records.append((f"v-{i}".encode(), valid[i]))
        records.append((f"f-{i}".encode(), fuzzed[i]))
    return records, {f"f-{i}".encode() for i in range(N)}


def outcome(router: Router, value: bytes | None) -> str:
    """What the pipeline should make of a value: "batched" or a dead letter's reason."""
    if value is None:
        return "bad_request"
    try:
        request = CODEC.decode_request(value)
        router.route(request).batch_key(request)
    except RequestError as e:
        return e.reason
    return "batched"


def terminate(proc: subprocess.Popen[bytes]) -> int | None:
    """SIGTERM, and its exit status; a process that does not stop in 30 s is killed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


@pytest.mark.timeout(180)
def test_fuzzed_records_are_dead_letters_and_the_pipeline_stays_up(
    broker: EmbeddedBroker, topics: Topics, tmp_path: Path
) -> None:
    topology = write_tiny_topology(tmp_path / "tiny.yaml", topics)
    model = load_topology(topology).models[0]
    router = Router(
        {
            model.name: ModelRoute(
                model.name, model.version, {i.name: i.spec() for i in model.inputs}
            )
        }
    )
    records, fuzzed = corpus(router)
    expected = {key: outcome(router, value) for key, value in records}
    assert all(expected[key] == "batched" for key, _ in records if key not in fuzzed)
    # The 1 MiB value is over the producer's default message.max.bytes (1,000,000).
    produce_requests(
        KafkaSettings(producer={"message.max.bytes": 2 * GARBAGE_SIZE}),
        broker.bootstrap_servers,
        topics.input,
        records,  # a None value is a tombstone
    )
    by_source = {
        (m.partition(), m.offset()): m.key()
        for m in read_topic(
            KafkaSettings(), broker.bootstrap_servers, topics.input, count=len(records)
        )
    }
    assert sorted(by_source.values()) == sorted(key for key, _ in records)
    ends: dict[int, int] = {}
    for partition, offset in by_source:
        ends[partition] = max(ends.get(partition, 0), offset + 1)

    log = tmp_path / "run.log"
    proc = spawn_run(topology, broker, log)
    try:
        wait_for(
            lambda: (
                proc.poll() is not None
                or committed_offsets(broker, topics.group, topics.input) == ends
            ),
            90,
            "the committed offsets to reach the end of every partition",
        )
        assert proc.poll() is None, log.read_text()[-3000:]
    finally:
        code = terminate(proc)
    assert code == 0, log.read_text()[-3000:]

    results = [
        CODEC.decode_result(m.value())
        for m in read_topic(
            KafkaSettings(), broker.bootstrap_servers, topics.output, timeout=30, idle=1.5
        )
    ]
    letters = [
        CODEC.decode_dead_letter(m.value())
        for m in read_topic(
            KafkaSettings(), broker.bootstrap_servers, topics.dead_letter, timeout=30, idle=1.5
        )
    ]
    outcomes = Counter(by_source[(r.partition, r.offset)] for r in results)
    outcomes.update(by_source[(d.partition, d.offset)] for d in letters)
    assert outcomes == Counter(by_source.values())  # each record exactly one outcome
    assert {r.topic for r in results} == {d.topic for d in letters} == {topics.input}

    got = {by_source[(r.partition, r.offset)]: "batched" for r in results}
    got.update({by_source[(d.partition, d.offset)]: d.reason for d in letters})
    assert got == expected
    values = dict(records)
    for d in letters:
        value = values[by_source[(d.partition, d.offset)]]
        if value is not None and len(value) == GARBAGE_SIZE:  # too large to carry back
            assert d.payload == b""
            assert "bytes were dropped" in d.error
        else:
            assert d.payload == (value or b"")
    valid_ids = {r.id for r in results if by_source[(r.partition, r.offset)] not in fuzzed}
    assert valid_ids == {f"v-{i}" for i in range(N)}

    reasons = Counter(expected[k] for k in fuzzed)
    print(
        f"\n{len(fuzzed)} fuzzed records: {reasons['batched']} served as valid requests, "
        f"{len(fuzzed) - reasons['batched']} dead letters {dict(reasons)}; "
        f"statuses {dict(Counter(r.status.value for r in results))}"
    )


# -- findings: records that stop the pipeline -----------------------------------------------


def _reply_topic_with_a_nul() -> bytes:
    request = tensor_request("poison", "tiny-mlp", {"x": tiny_vectors(1)[0]})
    request.reply_topic = "replies\x00"
    return CODEC.encode_request(request)


def _an_id_of_a_megabyte() -> bytes:
    request = tensor_request("i" * 1_040_000, "no-such-model", {"x": tiny_vectors(1)[0]})
    return CODEC.encode_request(request)


POISON = [
    pytest.param(_reply_topic_with_a_nul, id="reply-topic-with-a-nul"),
    pytest.param(_an_id_of_a_megabyte, id="dead-letter-too-large-without-its-payload"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("poison", POISON)
def test_a_poison_record_is_a_dead_letter_not_a_crash(
    broker: EmbeddedBroker, topics: Topics, tmp_path: Path, poison: Callable[[], bytes]
) -> None:
    valid = [
        (f"v-{i}".encode(), CODEC.encode_request(tensor_request(f"v-{i}", "tiny-mlp", {"x": x})))
        for i, x in enumerate(tiny_vectors(40))
    ]
    records = [*valid[:20], (b"poison", poison()), *valid[20:]]
    produce_requests(
        KafkaSettings(producer={"message.max.bytes": 2 * GARBAGE_SIZE}),
        broker.bootstrap_servers,
        topics.input,
        records,
    )
    ends = end_offsets(broker, topics.input)
    topology = write_tiny_topology(tmp_path / "tiny.yaml", topics)
    # A pipeline that fails drains for drain_timeout_s (30 s) before it exits: not here.
    text = topology.read_text().replace(
        "}\nmodels:", ", drain_timeout_s: 2, revoke_timeout_s: 1}\nmodels:"
    )
    assert "drain_timeout_s" in text
    topology.write_text(text)
    log = tmp_path / "run.log"
    proc = spawn_run(topology, broker, log)
    try:
        wait_for(
            lambda: (
                proc.poll() is not None
                or committed_offsets(broker, topics.group, topics.input) == ends
            ),
            60,
            "the committed offsets to reach the end, or the process to exit",
        )
        assert proc.poll() is None, log.read_text()[-2000:]
    finally:
        code = terminate(proc)
    assert code == 0
    letters = list(
        read_topic(
            KafkaSettings(), broker.bootstrap_servers, topics.dead_letter, count=1, timeout=10
        )
    )
    assert [m.key() for m in letters] == [b"poison"]
