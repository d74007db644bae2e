"""``kp-pipeline run --workers 2`` on the real broker: a killed worker comes back, SIGTERM drains.

The supervisor is started as a user would start it; the test finds each worker's pid in
its log (``worker I started (pid P)``), so a kill hits one worker, not the group.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from e2e.kit import (
    ROOT,
    OutcomeCounter,
    PacedProducer,
    Topics,
    committed_offsets,
    end_offsets,
    produce_tiny,
    tiny_vectors,
    wait_for,
    write_tiny_topology,
)

from pipeline.kafka.broker import EmbeddedBroker, free_port

ASSIGNED = re.compile(r"\[w(\d)\] pipeline\.engine\.loop: assigned ")
STARTED = re.compile(r"worker (\d) started \(pid (\d+)\)")


def _spawn_workers(
    topology: Path, broker: EmbeddedBroker, log: Path, port: int
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "run",
            str(topology),
            "--workers",
            "2",
            "--bootstrap",
            broker.bootstrap_servers,
            "--metrics-port",
            str(port),
        ],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def _assigned(log: Path) -> set[str]:
    return set(ASSIGNED.findall(log.read_text())) if log.exists() else set()


def _pids(log: Path) -> list[tuple[str, int]]:
    return [(w, int(p)) for w, p in STARTED.findall(log.read_text())]


def test_a_sigkilled_worker_is_restarted_and_every_request_gets_an_outcome(
    broker: EmbeddedBroker, topics: Topics, tiny_topology: Path, tmp_path: Path
) -> None:
    log, port = tmp_path / "run.log", free_port()
    counter = OutcomeCounter(broker.bootstrap_servers, topics)
    producer = PacedProducer(broker, topics.input, 3000, chunk=100, every_s=0.2)
    group = _spawn_workers(tiny_topology, broker, log, port)
    try:
        wait_for(lambda: _assigned(log) == {"0", "1"}, 90, "both workers' partitions")
        wait_for(lambda: _get(port, "/readyz")[0] == 200, 30, "the group ready")
        ready = json.loads(_get(port, "/readyz")[1])
        assert set(ready["workers"]) == {"0", "1"}
        victim = dict(_pids(log))["1"]
        answered = len(counter.ids)
        subprocess.run(["kill", "-KILL", str(victim)], check=True)
        wait_for(lambda: len(_pids(log)) == 3, 30, "worker 1 started again")
        assert _pids(log)[-1][0] == "1"
        total = producer.finish()
        wait_for(lambda: len(counter.ids) >= total, 120, f"an outcome for each of {total}")
        assert counter.ids >= producer.ids
        assert len(counter.ids) > answered
        wait_for(lambda: _get(port, "/readyz")[0] == 200, 60, "the group ready again")
        status, text = _get(port, "/metrics")
        assert status == 200
        assert 'kp_worker_restarts_total{worker="1"} 1.0' in text
        assert 'kp_worker_restarts_total{worker="0"} 0.0' in text
        for w in ("0", "1"):
            assert re.search(rf'kp_ready\{{worker="{w}"\}} 1\.0', text), text[:2000]
            assert re.search(rf'kp_assigned_partitions\{{worker="{w}"\}}', text)
        group.send_signal(signal.SIGTERM)
        assert group.wait(90) == 0, log.read_text()[-3000:]
        ends = end_offsets(broker, topics.input)
        assert committed_offsets(broker, topics.group, topics.input) == ends
    finally:
        producer.finish()
        counter.stop()
        if group.poll() is None:
            group.kill()


def test_sigterm_with_two_workers_drains_both_and_exits_0(
    broker: EmbeddedBroker, topics: Topics, tiny_topology: Path, tmp_path: Path
) -> None:
    log, port = tmp_path / "run.log", free_port()
    counter = OutcomeCounter(broker.bootstrap_servers, topics)
    produce_tiny(broker, topics.input, tiny_vectors(4000))
    group = _spawn_workers(tiny_topology, broker, log, port)
    try:
        wait_for(lambda: _assigned(log) == {"0", "1"}, 90, "both workers' partitions")
        wait_for(lambda: len(counter.ids) > 0, 60, "the first outcomes")
        group.send_signal(signal.SIGTERM)
        assert group.wait(90) == 0, log.read_text()[-3000:]
        text = log.read_text()
        assert text.count("] pipeline.engine.loop: stopped: ") == 2
        assert "worker 0: exit 0" in text
        assert "worker 1: exit 0" in text
        # Drained: every record below a committed offset has its outcome.
        committed = committed_offsets(broker, topics.group, topics.input)
        wait_for(
            lambda: all(
                (p, o) in counter.sources for p, c in committed.items() for o in range(max(c, 0))
            ),
            30,
            "an outcome for every committed record",
        )
        assert sum(max(c, 0) for c in committed.values()) > 0
    finally:
        counter.stop()
        if group.poll() is None:
            group.kill()


def test_exactly_once_workers_each_have_their_own_transactional_producer(
    broker: EmbeddedBroker, topics: Topics, tmp_path: Path
) -> None:
    """Two transactional producers under one id would fence each other, and the fenced
    worker would die; distinct ids (``<replica>-w0``, ``-w1``) serve side by side."""
    topology = write_tiny_topology(tmp_path / "eos.yaml", topics, delivery="exactly_once")
    log, port = tmp_path / "run.log", free_port()
    counter = OutcomeCounter(broker.bootstrap_servers, topics)
    produce_tiny(broker, topics.input, tiny_vectors(2000))
    group = _spawn_workers(topology, broker, log, port)
    try:
        wait_for(lambda: _assigned(log) == {"0", "1"}, 90, "both workers' partitions")
        wait_for(lambda: len(counter.ids) >= 2000, 120, "an outcome for each of 2000")
        group.send_signal(signal.SIGTERM)
        assert group.wait(90) == 0, log.read_text()[-3000:]
        text = log.read_text()
        ids = set(re.findall(r"exactly-once: transactional id (\S+)", text))
        assert len(ids) == 2, ids
        assert {i[-3:] for i in ids} == {"-w0", "-w1"}
        assert "(0 restarts)" in text  # nobody was fenced and died
        assert counter.duplicates == 0
    finally:
        counter.stop()
        if group.poll() is None:
            group.kill()


def test_top_shows_the_group_as_one_pipeline(
    broker: EmbeddedBroker, topics: Topics, tiny_topology: Path, tmp_path: Path
) -> None:
    """``kp-pipeline top`` on the supervisor's port: both workers' partitions and rates."""
    log, port = tmp_path / "run.log", free_port()
    group = _spawn_workers(tiny_topology, broker, log, port)
    producer: PacedProducer | None = None
    try:
        wait_for(lambda: _assigned(log) == {"0", "1"}, 90, "both workers' partitions")
        wait_for(lambda: _get(port, "/readyz")[0] == 200, 30, "the group ready")
        producer = PacedProducer(broker, topics.input, 1000, chunk=100, every_s=0.05)
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "top", f"127.0.0.1:{port}", "--once",
             "--interval", "1.5", "--no-color"],
            capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
        )  # fmt: skip
    finally:
        if producer is not None:
            producer.finish()
        group.send_signal(signal.SIGTERM)
        group.wait(90)
    assert done.returncode == 0, done.stderr
    frame = done.stdout
    assert "READY  workers 2/2 up" in frame.splitlines()[0], frame
    rows = [line.split() for line in frame.splitlines()]
    partitions = [r for r in rows if r and r[0] == topics.input]
    assert sorted(int(r[1]) for r in partitions) == [0, 1, 2, 3], frame
    assert all(r[2] != "-" for r in partitions), frame  # each partition's lag, from its owner
    assert sum(float(r[4]) for r in partitions) > 0, frame
    model = next(r for r in rows if r and r[0] == "tiny-mlp")
    assert float(model[1]) > 0, frame  # results per second, both workers'
