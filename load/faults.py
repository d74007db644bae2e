"""The network between a replica and its broker fails: what is lost, and how long it takes.

A Tansu broker advertises a fault proxy (`load.netproxy`) in front of it, so every
connection of every client goes through the proxy: the pipeline (``kp-pipeline run`` in
its own process, the tiny topology, at least once), a paced producer of requests and a
reader of results. Under that steady traffic the proxy adds latency, closes every
connection, resets every connection with TCP RSTs, black-holes all traffic (connections
stay open, nothing moves), and then does 50 quick closes and resets in a row. Measured
per fault: when ``/readyz`` turned 503 and when it came back, and the recovery time (from
the fault's end until every request sent before it has its result). At the end: requests
lost (sent, acknowledged by the broker, never answered), duplicates, and the pipeline
process's threads and RSS before and after the 50 faults, and its peak.

    python -m load.faults                       # the full run (~2 min), a table and JSON
    python -m load.faults --blackhole 20 --rate 200 --out load/results/faults.json

The e2e test (tests/e2e/test_network_faults_pipe.py) runs `run_faults` and checks the
guarantees; this module prints the figures for the README.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from load.bench import topic_env
from load.netproxy import KafkaProxy
from pipeline.kafka.broker import EmbeddedBroker, free_port
from pipeline.tools.traffic import tensor_request
from schemas.codec import AvroCodec

__all__ = ["FaultConfig", "FaultReport", "main", "run_faults"]

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGY = ROOT / "load" / "topologies" / "tiny-mlp.yaml"


@dataclass(frozen=True)
class FaultConfig:
    """The traffic and the faults (``blackhole_s`` must outlast socket.timeout.ms)."""

    rate: float = 100.0  # requests per second, steady, through the faults
    latency_s: float = 5.0  # how long 250 ms of latency is added
    blackhole_s: float = 20.0  # longer than socket.timeout.ms (15 s): readiness must flip
    quick_faults: int = 50  # closes and resets in a row, for leaks
    quick_every_s: float = 0.4
    settle_s: float = 5.0  # after each fault, before the next
    drain_timeout_s: float = 120.0


@dataclass
class FaultResult:
    name: str
    duration_s: float
    not_ready_after_s: float | None  # from the fault's start to the first 503
    ready_again_after_s: float | None  # from the fault's end to the next 200 after a 503
    recovery_s: float | None  # from the fault's end to the last result of requests sent before it


@dataclass
class FaultReport:
    """Per-fault readiness and recovery; losses, duplicates, threads and memory."""

    config: FaultConfig
    faults: list[FaultResult]
    sent: int
    answered: int
    lost: int
    duplicates: int
    threads_before: int
    threads_after: int
    rss_before_mb: float
    rss_after_mb: float
    rss_peak_mb: float
    pipeline_exit: int | None
    notes: list[str] = field(default_factory=list)


class _Traffic(threading.Thread):
    """Sends one tiny request every 1/rate s through the proxy; never waits for results."""

    def __init__(self, bootstrap: str, topic: str, rate: float) -> None:
        super().__init__(name="faults-traffic", daemon=True)
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "enable.idempotence": True,
                "message.timeout.ms": 600_000,  # through every fault: late, never dropped
                "linger.ms": 5,
                "log_level": 3,  # the faults' disconnects are expected: errors only
            }
        )
        self._topic, self._every = topic, 1.0 / rate
        self._codec = AvroCodec()
        self._x = np.ones(64, np.float32)
        self.sent_at: list[float] = []  # by request number
        self.failed: set[int] = set()
        self._halt = threading.Event()

    def run(self) -> None:
        due = time.monotonic()
        while not self._halt.is_set():
            i = len(self.sent_at)
            value = self._codec.encode_request(tensor_request(f"f{i}", "tiny-mlp", {"x": self._x}))
            self._producer.produce(
                self._topic, value, f"f{i}".encode(), on_delivery=self._delivered(i)
            )
            self.sent_at.append(time.monotonic())
            self._producer.poll(0)
            due += self._every
            self._halt.wait(max(0.0, due - time.monotonic()))
        self._producer.flush(600)

    def _delivered(self, i: int) -> Callable[[Any, Any], None]:
        def done(err: Any, _msg: Any) -> None:
            if err is not None:
                self.failed.add(i)

        return done

    def stop(self) -> None:
        self._halt.set()
        self.join(620)


class _Reader(threading.Thread):
    """Reads every result from the start of the output topic; first arrival per request."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__(name="faults-reader", daemon=True)
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": "faults-reader",
                "fetch.wait.max.ms": 10,
                "log_level": 3,
            }
        )
        meta = self._consumer.list_topics(topic, timeout=15).topics[topic]
        self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        self._codec = AvroCodec()
        self.arrived: dict[int, float] = {}
        self.duplicates = 0
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                for m in self._consumer.consume(1000, 0.1):
                    value = m.value()
                    if m.error() is not None or value is None:
                        continue
                    i = int(self._codec.decode_result(value).id[1:])
                    if i in self.arrived:
                        self.duplicates += 1
                    else:
                        self.arrived[i] = time.monotonic()
        finally:
            self._consumer.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(30)


class _Watch(threading.Thread):
    """Polls /readyz and the process's threads and RSS every 0.25 s."""

    def __init__(self, port: int, pid: int) -> None:
        super().__init__(name="faults-watch", daemon=True)
        self._url, self._pid = f"http://127.0.0.1:{port}/readyz", pid
        self.ready: list[tuple[float, bool]] = []
        self.proc: list[tuple[float, int, float]] = []  # t, threads, RSS MB
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.ready.append((time.monotonic(), _ready(self._url)))
            sample = _threads_rss(self._pid)
            if sample is not None:
                self.proc.append((time.monotonic(), *sample))
            self._halt.wait(0.25)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _threads_rss(pid: int) -> tuple[int, float] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return int(fields["Threads"]), int(fields["VmRSS"].split()[0]) / 1024


def _outcome(
    name: str, start: float, end: float, watch: _Watch, traffic: _Traffic, reader: _Reader,
    deadline_s: float,
) -> FaultResult:  # fmt: skip
    """Readiness and recovery around one fault, once its requests are answered (or not)."""
    before = [i for i, t in enumerate(list(traffic.sent_at)) if t < end]

    def readiness() -> tuple[float | None, float | None]:
        ready = list(watch.ready)
        down = next((t for t, ok in ready if t >= start and not ok), None)
        if down is None:
            return None, None
        return down, next((t for t, ok in ready if t >= max(end, down) and ok), None)

    wait_until = time.monotonic() + deadline_s
    while time.monotonic() < wait_until:  # every request answered, and ready again
        down, back = readiness()
        if all(i in reader.arrived for i in before) and (down is None or back is not None):
            break
        time.sleep(0.1)
    down, back = readiness()
    pending = [i for i in before if i not in reader.arrived]
    last = max((reader.arrived[i] for i in before if i in reader.arrived), default=end)
    return FaultResult(
        name,
        round(end - start, 2),
        None if down is None else round(down - start, 2),
        None if back is None else round(back - end, 2),
        None if pending else round(max(last - end, 0.0), 2),
    )


def run_faults(config: FaultConfig, log: Path | None = None) -> FaultReport:
    """The whole scenario on a broker and pipeline of its own; the figures."""
    proxy_port = free_port()
    env = topic_env(f"faults.{os.getpid()}.{time.monotonic_ns()}", f"127.0.0.1:{proxy_port}")
    with (
        EmbeddedBroker(advertised=f"127.0.0.1:{proxy_port}") as broker,
        KafkaProxy(broker.bootstrap_servers, port=proxy_port) as proxy,
    ):
        port = free_port()
        out = (log or Path(os.devnull)).open("ab")
        run = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "run", str(TOPOLOGY),
             "--bootstrap", proxy.address, "--metrics-port", str(port)],
            env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
        watch = _Watch(port, run.pid)
        watch.start()
        try:
            return _scenario(config, proxy, env, run, watch)
        finally:
            if run.poll() is None:
                run.send_signal(signal.SIGTERM)
                run.wait(60)
            watch.stop()
            out.close()


def _scenario(
    config: FaultConfig,
    proxy: KafkaProxy,
    env: dict[str, str],
    run: subprocess.Popen[bytes],
    watch: _Watch,
) -> FaultReport:
    deadline = time.monotonic() + 120
    while not (watch.ready and watch.ready[-1][1]):
        if time.monotonic() > deadline or run.poll() is not None:
            raise RuntimeError("the pipeline did not become ready through the proxy")
        time.sleep(0.2)
    traffic = _Traffic(proxy.address, env["KP_INPUT"], config.rate)
    traffic.start()
    reader = _Reader(proxy.address, env["KP_OUTPUT"])
    reader.start()
    time.sleep(3.0)  # steady state
    faults: list[FaultResult] = []

    def fault(name: str, begin: Callable[[], Any], seconds: float, end: Callable[[], Any]) -> None:
        start = time.monotonic()
        begin()
        time.sleep(seconds)
        end()
        stop = time.monotonic()
        faults.append(_outcome(name, start, stop, watch, traffic, reader, config.drain_timeout_s))
        time.sleep(config.settle_s)

    fault("latency 250 ms", lambda: proxy.set_latency(0.25), config.latency_s,
          lambda: proxy.set_latency(0.0))  # fmt: skip
    fault("close every connection", lambda: proxy.drop(reset=False), 0.0, lambda: None)
    fault("reset every connection (RST)", lambda: proxy.drop(reset=True), 0.0, lambda: None)
    fault(f"black hole {config.blackhole_s:g} s", lambda: proxy.blackhole(True),
          config.blackhole_s, lambda: proxy.blackhole(False))  # fmt: skip
    before = _threads_rss(run.pid) or (0, 0.0)
    start = time.monotonic()
    for k in range(config.quick_faults):
        proxy.drop(reset=k % 2 == 1)
        time.sleep(config.quick_every_s)
    stop = time.monotonic()
    faults.append(
        _outcome(
            f"{config.quick_faults} closes and resets",
            start,
            stop,
            watch,
            traffic,
            reader,
            config.drain_timeout_s,
        )
    )
    time.sleep(config.settle_s)
    after = _threads_rss(run.pid) or (0, 0.0)
    peak = max((rss for t, _, rss in watch.proc if t >= start), default=0.0)
    traffic.stop()
    sent = [i for i in range(len(traffic.sent_at)) if i not in traffic.failed]
    wait_until = time.monotonic() + config.drain_timeout_s
    while time.monotonic() < wait_until and any(i not in reader.arrived for i in sent):
        time.sleep(0.2)
    reader.stop()
    lost = sum(1 for i in sent if i not in reader.arrived)
    return FaultReport(
        config, faults, len(sent), len(reader.arrived), lost, reader.duplicates,
        before[0], after[0], round(before[1], 1), round(after[1], 1), round(peak, 1),
        run.poll(),
    )  # fmt: skip


def _table(report: FaultReport) -> str:
    lines = [
        "| fault | /readyz 503 after | ready again after its end | recovery |",
        "|---|---:|---:|---:|",
    ]

    def s(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f} s"

    for f in report.faults:
        lines.append(f"| {f.name} | {s(f.not_ready_after_s)} | {s(f.ready_again_after_s)} | "
                     f"{s(f.recovery_s)} |")  # fmt: skip
    lines.append(
        f"\n{report.sent} requests sent at {report.config.rate:g}/s, {report.answered} answered, "
        f"{report.lost} lost, {report.duplicates} duplicates. Pipeline process across the "
        f"{report.config.quick_faults} quick faults: threads {report.threads_before} → "
        f"{report.threads_after}, RSS {report.rss_before_mb:.0f} → {report.rss_after_mb:.0f} MB "
        f"(peak {report.rss_peak_mb:.0f} MB)."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m load.faults", description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=FaultConfig.rate)
    ap.add_argument("--blackhole", type=float, default=FaultConfig.blackhole_s)
    ap.add_argument("--quick", type=int, default=FaultConfig.quick_faults)
    ap.add_argument("--out", type=Path, help="write the report as JSON here")
    ap.add_argument("--log", type=Path, help="the pipeline's output")
    args = ap.parse_args(argv)
    config = FaultConfig(rate=args.rate, blackhole_s=args.blackhole, quick_faults=args.quick)
    report = run_faults(config, args.log)
    print(_table(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0 if report.lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
