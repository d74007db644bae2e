"""Shared replays on the real broker: ``replay --workers 2`` and two ``--shared`` replicas.

Either way the replicas split the range's partitions through the replay's group, and
every request of the range reaches the replay output exactly once, nothing outside it.
The range ends inside the recorded traffic (``--to-offset``), so stopping at its end is
tested too, and the live group's offsets stay untouched. A replica SIGKILLed mid-range
leaves its partitions to the other, which serves them from the group's commits: every
request of the range still reaches the output, at least once.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from e2e.kit import (
    ROOT,
    Topics,
    committed_offsets,
    produce_tiny,
    tiny_vectors,
    wait_for,
    write_tiny_topology,
)

from load.backlog import free_port, scrape, total
from pipeline.config.topology import KafkaSettings
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.tools.traffic import read_topic
from schemas.codec import AvroCodec

N = 6000
FROM, TO = 100, 1200  # per partition: [100, 1200) of ~1500
CODEC = AvroCodec()


@pytest.fixture
def shared_topology(tmp_path: Path, topics: Topics, tiny_topology: Path) -> Path:
    """The tiny topology, with the session timeout that makes a join on Tansu quick.

    A replay's consumer is not given the embedded broker's client defaults (it reads a
    cluster named by --bootstrap), and Tansu holds a join for half the session timeout:
    22.5 s at librdkafka's default 45 s.
    """
    return write_tiny_topology(
        tmp_path / "shared.yaml", topics, consumer={"session.timeout.ms": 6000}
    )


def _replay(topology: Path, broker: EmbeddedBroker, out: str, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "pipeline.cli", "replay", str(topology),
        "--bootstrap", broker.bootstrap_servers, "--no-progress", "--output", out,
        "--from-offset", str(FROM), "--to-offset", str(TO), *args,
    ]  # fmt: skip


def _expected(broker: EmbeddedBroker, topic: str) -> list[str]:
    records = read_topic(KafkaSettings(), broker.bootstrap_servers, topic, timeout=60, idle=2)
    return sorted(
        CODEC.decode_request(m.value()).id for m in records if FROM <= (m.offset() or 0) < TO
    )


def _served(broker: EmbeddedBroker, topic: str) -> list[str]:
    records = read_topic(KafkaSettings(), broker.bootstrap_servers, topic, timeout=60, idle=3)
    return sorted(CODEC.decode_result(m.value()).id for m in records)


def _replayed(text: str) -> int:
    return sum(int(n.replace(",", "")) for n in re.findall(r"replayed ([\d,]+) requests", text))


def test_replay_with_two_workers_serves_the_range_exactly_once(
    broker: EmbeddedBroker, topics: Topics, shared_topology: Path
) -> None:
    produce_tiny(broker, topics.input, tiny_vectors(N))
    expected = _expected(broker, topics.input)
    assert len(expected) > 3000
    out = f"{topics.output}-replay"
    done = subprocess.run(
        [*_replay(shared_topology, broker, out), "--workers", "2"],
        capture_output=True, text=True, cwd=ROOT, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "with 2 workers" in done.stdout
    assert len(re.findall("replayed ", done.stdout)) == 2  # each worker's share
    assert _replayed(done.stdout) == len(expected), done.stdout
    assert _served(broker, out) == expected  # each request of the range, once
    assert "worker 0 finished" in done.stderr
    assert "worker 1 finished" in done.stderr
    group = f"{topics.group}.replay.{out}"
    assert set(committed_offsets(broker, group, topics.input).values()) == {TO}
    assert set(committed_offsets(broker, topics.group, topics.input).values()) == {-1001}


def test_two_shared_replicas_started_separately_serve_the_range_exactly_once(
    broker: EmbeddedBroker, topics: Topics, shared_topology: Path, tmp_path: Path
) -> None:
    produce_tiny(broker, topics.input, tiny_vectors(N))
    expected = _expected(broker, topics.input)
    out = f"{topics.output}-replay"
    logs = [tmp_path / f"replica-{i}.log" for i in range(2)]
    command = _replay(shared_topology, broker, out, "--shared")
    replicas = [
        subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
        for log in logs
    ]
    try:
        for replica, log in zip(replicas, logs, strict=True):
            assert replica.wait(240) == 0, log.read_text()[-3000:]
    finally:
        for replica in replicas:
            if replica.poll() is None:
                replica.kill()
    texts = [log.read_text() for log in logs]
    assert sum(_replayed(t) for t in texts) == len(expected), texts
    assert _served(broker, out) == expected


def test_shared_needs_a_fixed_end(
    broker: EmbeddedBroker, topics: Topics, shared_topology: Path
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "replay", str(shared_topology), "--bootstrap",
         broker.bootstrap_servers, "--output", "x", "--from-offset", "0", "--shared"],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--shared: give the range a fixed end" in done.stderr


def test_a_shared_replica_killed_mid_range_leaves_its_partitions_to_the_other(
    broker: EmbeddedBroker, topics: Topics, tmp_path: Path
) -> None:
    # A window of 8 requests makes each replica wait for a commit point every batch or
    # two (a few hundred requests a second), so the kill lands mid-range.
    topology = write_tiny_topology(
        tmp_path / "slow.yaml",
        topics,
        batch=4,
        max_in_flight=8,
        commit_interval_ms=50,
        consumer={"session.timeout.ms": 6000},
    )
    produce_tiny(broker, topics.input, tiny_vectors(N))
    expected = _expected(broker, topics.input)
    out = f"{topics.output}-replay"
    ports = [free_port(), free_port()]
    logs = [tmp_path / f"replica-{i}.log" for i in range(2)]
    replicas = [
        subprocess.Popen(
            [*_replay(topology, broker, out, "--shared"), "--metrics-port", str(port)],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        for port, log in zip(ports, logs, strict=True)
    ]

    def results(port: int) -> float:
        try:
            return total(scrape(f"http://127.0.0.1:{port}/metrics"), "kp_results_total")
        except OSError:
            return 0.0

    try:
        wait_for(lambda: all(results(p) >= 50 for p in ports), 120, "both replicas to serve")
        killed_at = results(ports[0])
        replicas[0].send_signal(signal.SIGKILL)
        replicas[0].wait(30)
        survivor = replicas[1].wait(240)
    finally:
        for replica in replicas:
            if replica.poll() is None:
                replica.kill()
    text = logs[1].read_text()
    assert survivor == 0, text[-3000:]
    assert killed_at < len(expected) / 2, "the kill came after the replica's share was done"
    served = _served(broker, out)
    assert sorted(set(served)) == expected  # the whole range, nothing outside it
    duplicates = len(served) - len(set(served))
    # Repeated: only what the killed replica produced after its group's last commit.
    assert duplicates <= killed_at + 200, duplicates
    group = f"{topics.group}.replay.{out}"
    assert set(committed_offsets(broker, group, topics.input).values()) == {TO}
    assert set(committed_offsets(broker, topics.group, topics.input).values()) == {-1001}
    print(
        f"\nkilled one replica after {killed_at:.0f} results; the other finished the range: "
        f"{len(set(served))} requests, {duplicates} served twice"
    )
