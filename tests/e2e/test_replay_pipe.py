"""`kp-pipeline replay` on the real broker: exact ranges, the live group untouched, resume.

Requests are produced with explicit timestamps in three phases (before, inside and after
the replayed window), so a time range has a known answer. Tansu answers every
ListOffsets-by-time with 0, so these tests also exercise the search over record times.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from e2e.kit import (
    ROOT,
    Topics,
    committed_offsets,
    read_all,
    start_background,
    tiny_vectors,
    wait_for,
)

from load.backlog import free_port, scrape, total
from pipeline.config.topology import KafkaSettings
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.tools.traffic import read_topic, tensor_request
from schemas.codec import AvroCodec

T0 = 1_795_132_800_000  # 2026-11-20T00:00Z
CODEC = AvroCodec()


def _produce(broker: EmbeddedBroker, topic: str, ids: list[str], start_ms: int) -> None:
    producer = Producer({"bootstrap.servers": broker.bootstrap_servers, "linger.ms": 5})
    vectors = tiny_vectors(len(ids))
    for i, (rid, v) in enumerate(zip(ids, vectors, strict=True)):
        value = CODEC.encode_request(tensor_request(rid, "tiny-mlp", {"x": v}))
        producer.produce(topic, value, rid.encode(), timestamp=start_ms + i)
    assert producer.flush(30) == 0


def _replay(topology: Path, broker: EmbeddedBroker, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "replay", str(topology),
         "--bootstrap", broker.bootstrap_servers, "--no-progress", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=180, check=False,
    )  # fmt: skip


def _all_ids(broker: EmbeddedBroker, topic: str) -> list[str]:
    """Every result id in ``topic`` (read until 3 s pass without a record)."""
    records = read_topic(KafkaSettings(), broker.bootstrap_servers, topic, timeout=120, idle=3)
    return [CODEC.decode_result(m.value()).id for m in records]


def test_a_time_range_replays_exactly_its_requests_and_leaves_the_live_group_alone(
    broker: EmbeddedBroker, topics: Topics, tiny_topology: Path
) -> None:
    before = [f"before-{i}" for i in range(300)]
    inside = [f"inside-{i}" for i in range(500)]
    after = [f"after-{i}" for i in range(200)]
    _produce(broker, topics.input, before, T0 - 3_600_000)  # 23:00 the day before
    _produce(broker, topics.input, inside, T0 + 3_600_000)  # 01:00
    _produce(broker, topics.input, after, T0 + 30 * 3_600_000)  # the next day
    live = start_background(tiny_topology, broker)  # the live group serves everything
    read_all(broker, topics.output, 1000)
    live.stop()
    live_offsets = committed_offsets(broker, topics.group, topics.input)

    out = f"{topics.output}-replay"
    done = _replay(
        tiny_topology, broker, "--from", "2026-11-20T00:00Z", "--to", "2026-11-21T00:00Z",
        "--output", out,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "replayed 500 requests: 500 results" in done.stdout
    ids = _all_ids(broker, out)
    assert sorted(ids) == sorted(inside)  # exactly the range, each once
    assert committed_offsets(broker, topics.group, topics.input) == live_offsets


def test_an_interrupted_replay_resumes_where_it_stopped(
    broker: EmbeddedBroker, topics: Topics, tiny_topology: Path, tmp_path: Path
) -> None:
    n = 60_000
    ids = [f"r-{i}" for i in range(n)]
    _produce(broker, topics.input, ids, T0)
    out = f"{topics.output}-replay"
    port = free_port()
    log = tmp_path / "replay.log"
    first = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "replay", str(tiny_topology), "--bootstrap",
         broker.bootstrap_servers, "--from-offset", "0", "--output", out, "--no-progress",
         "--metrics-port", str(port)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/metrics"

    def some_results() -> bool:
        try:
            return total(scrape(url), "kp_results_total") >= 2000
        except OSError:
            return False

    wait_for(some_results, 60, "the replay to start serving")
    first.send_signal(signal.SIGTERM)
    assert first.wait(60) == 0
    text = log.read_text()
    assert "interrupted: run the same command again to resume" in text, text[-2000:]

    second = _replay(tiny_topology, broker, "--from-offset", "0", "--output", out)
    assert second.returncode == 0, second.stderr[-3000:]
    served = _all_ids(broker, out)
    assert len(set(served)) == n  # every request of the range...
    assert len(served) == n  # ...once: the first run drained and committed before it stopped


def test_bad_ranges_exit_2_and_write_nothing(
    broker: EmbeddedBroker, topics: Topics, tiny_topology: Path, tmp_path: Path
) -> None:
    _produce(broker, topics.input, [f"x-{i}" for i in range(50)], T0)
    out = f"{topics.output}-never"
    cases = [
        (
            ("--from", "2026-11-21T00:00Z", "--to", "2026-11-20T00:00Z"),
            "--to: it is not after --from",
        ),
        (("--from", "2030-01-01T00:00Z"), "no records of"),
        (("--from", "not-a-time"), "is not an ISO 8601 time"),
    ]  # fmt: skip
    for args, message in cases:
        done = _replay(tiny_topology, broker, *args, "--output", out)
        assert done.returncode == 2, (args, done.stderr[-2000:])
        assert message in done.stderr
    missing = tmp_path / "missing.yaml"
    missing.write_text(tiny_topology.read_text().replace(topics.input, "no-such-topic"))
    done = _replay(missing, broker, "--from-offset", "0", "--output", out)
    assert done.returncode == 2
    assert "topic 'no-such-topic' does not exist" in done.stderr
    existing = AdminClient({"bootstrap.servers": broker.bootstrap_servers}).list_topics(timeout=10)
    assert out not in existing.topics  # nothing was written, not even the output topic
    assert f"{out}-dead-letters" not in existing.topics
