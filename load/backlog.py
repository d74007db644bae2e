"""Backlogs: peak memory against backlog size, and the lag control loop on and off.

Two measurements, side by side in one run on one broker:

1. Memory. For each backlog size, the tiny model's requests are produced *before*
   ``kp-pipeline run`` starts (its own process, as deployed); the run drains them while
   its ``/metrics`` is scraped every 0.05 s (lag measured every 100 ms). Peak RSS is the
   kernel's high-water mark (``VmHWM``) read just before SIGTERM. The promise: it does
   not grow with the backlog, because what is not in flight stays in Kafka.
2. The control loop. The tiny model with latency-first batching (8 requests, 2 ms), with
   ``batching.lag_control`` on and then off: (a) a backlog drained from a standing start
   (throughput), (b) an open-loop steady load well under saturation (p99 latency, where
   the loop should not engage). Latency is each result's ``end_to_end_ms`` (record
   timestamp to result encoded).

    python -m load.backlog                      # writes load/results/backlog.md
    python -m load.backlog --sizes 50000,200000,1000000
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from prometheus_client.parser import text_string_to_metric_families

from load import report
from pipeline.app import open_topology
from pipeline.kafka.broker import EmbeddedBroker, free_port
from pipeline.kafka.clients import ensure_topics
from pipeline.tools.demo import BackgroundPipeline
from pipeline.tools.traffic import read_topic, tensor_request
from schemas.codec import AvroCodec

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "load" / "topologies" / "tiny-mlp.yaml"
RESULTS = ROOT / "load" / "results"
PARTITIONS = 4


@dataclass
class MemoryRow:
    """One backlog drained by a `kp-pipeline run` process."""

    backlog: int
    seconds: float
    peak_rss_mib: float
    pauses: int
    max_lag: int
    max_lag_s: float
    resumes: int = 0
    results: int = 0
    dead_letters: int = 0
    final_lag: int = -1  # lag once drained (measured each lag interval, 100 ms here)


@dataclass
class ControlRow:
    """One mode of the control loop."""

    mode: str
    drain_rate: float
    max_batch: int
    steady_rate: int
    steady_p50_ms: float
    steady_p99_ms: float


def scrape(url: str) -> dict[str, float]:
    """Samples of a metrics page, keyed ``name{label=value,...}`` (labels sorted)."""
    text = urllib.request.urlopen(url, timeout=3).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def total(samples: dict[str, float], name: str) -> float:
    """Sum of every series of ``name``."""
    return sum(v for k, v in samples.items() if k.split("{", 1)[0] == name)


def produce_tiny(bootstrap: str, topic: str, n: int, prefix: str) -> None:
    """``n`` distinct tiny-model requests (64 floats each)."""
    codec = AvroCodec()
    vectors = np.random.default_rng(3).standard_normal((256, 64)).astype(np.float32)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    for i in range(n):
        rid = f"{prefix}-{i}"
        value = codec.encode_request(tensor_request(rid, "tiny-mlp", {"x": vectors[i % 256]}))
        while True:
            try:
                producer.produce(topic, value, rid.encode())
                break
            except BufferError:
                producer.poll(0.05)
        if i % 5000 == 0:
            producer.poll(0)
    if producer.flush(120):
        raise RuntimeError("backlog not acknowledged")


def topology_for(tmp: Path, name: str, changes: dict[str, Any]) -> Path:
    """The tiny topology with ``changes``: its model's batching, flow, and delivery."""
    doc = yaml.safe_load(TINY.read_text())
    if "delivery" in changes:
        doc["delivery"] = changes["delivery"]
    doc["models"][0]["artifact"] = str(ROOT / "models" / "tiny_mlp.onnx")
    doc["models"][0]["batching"].update(changes.get("batching", {}))
    doc["flow"].update(changes.get("flow", {}))
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def memory_run(bootstrap: str, size: int, tmp: Path, tag: str) -> MemoryRow:
    """Drain a backlog of ``size`` in a `kp-pipeline run` process; peak RSS and lag."""
    topics = {f"KP_{k}": f"{tag}-{k.lower()}-{size}" for k in ("INPUT", "OUTPUT", "DLQ")}
    admin = AdminClient({"bootstrap.servers": bootstrap})
    ensure_topics(admin, list(topics.values()), PARTITIONS, 1)
    produce_tiny(bootstrap, topics["KP_INPUT"], size, f"m{size}")
    port = free_port()
    env = {**os.environ, **topics, "KP_GROUP": f"{tag}-g-{size}"}
    # Lag read every 100 ms: the batch-first host path drains 50,000 tiny requests in under
    # a second, between two readings at the default interval (1 s).
    topology = topology_for(
        tmp, f"mem-{size}", {"flow": {"max_in_flight": 2048, "lag_interval_ms": 100}}
    )
    log = (tmp / f"mem-{size}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", str(topology), "--bootstrap", bootstrap,
         "--metrics-port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/metrics"
    max_lag, max_lag_s, started, results = 0, 0.0, None, 0.0
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            time.sleep(0.05)
            try:
                s = scrape(url)
            except OSError:
                continue
            max_lag = max(max_lag, int(total(s, "kp_consumer_lag_messages")))
            lag_s = [v for k, v in s.items() if k.startswith("kp_consumer_lag_seconds{")]
            max_lag_s = max([max_lag_s, *lag_s])
            if started is None and total(s, "kp_consumed_records_total") > 0:
                started = time.monotonic()
            results = total(s, "kp_results_total")
            if results >= size:
                break
        else:
            raise RuntimeError(f"backlog {size}: only {results:.0f} results in 300 s")
        seconds = time.monotonic() - (started or time.monotonic())
        peak = _vm_kib(proc.pid, "VmHWM") / 1024.0
        for _ in range(20):  # lag is measured each lag interval: wait for the next reading
            final = scrape(url)
            if total(final, "kp_consumer_lag_messages") == 0:
                break
            time.sleep(0.25)
        row = MemoryRow(
            size,
            seconds,
            peak,
            int(total(final, "kp_pauses_total")),
            max_lag,
            max_lag_s,
            int(total(final, "kp_resumes_total")),
            int(total(final, "kp_results_total")),
            int(total(final, "kp_dead_letters_total")),
            int(total(final, "kp_consumer_lag_messages")),
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        log.close()
    if code != 0:
        raise RuntimeError(f"kp-pipeline run exited {code}; see {log.name}")
    return row


def _vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


def control_run(
    bootstrap: str, mode: str, backlog: int, rate: int, seconds: float, tmp: Path, tag: str
) -> ControlRow:
    """Drain a backlog, then serve an open-loop steady load, with the loop on or off."""
    names = {k: f"{tag}-{mode}-{k}" for k in ("in", "out", "dlq")}
    ensure_topics(
        AdminClient({"bootstrap.servers": bootstrap}), list(names.values()), PARTITIONS, 1
    )
    changes = {
        "batching": {
            "max_batch_size": 8,
            "max_delay_ms": 2,
            "lag_control": {"enabled": mode == "on", "lag_seconds": 0.5, "max_batch_size": 256},
        },
        "flow": {"lag_interval_ms": 250},
    }
    path = topology_for(tmp, f"control-{mode}", changes)
    os.environ.update(
        {"KP_INPUT": names["in"], "KP_OUTPUT": names["out"], "KP_DLQ": names["dlq"],
         "KP_GROUP": f"{tag}-{mode}"}
    )  # fmt: skip
    produce_tiny(bootstrap, names["in"], backlog, "b")
    opened = open_topology(path)
    served = BackgroundPipeline(opened, bootstrap).start()
    try:
        assert served.pipeline is not None
        stats = served.pipeline.stats
        wait_until(lambda: stats.results >= backlog, 300, "the backlog")
        first, last = stats.first_consumed, stats.last_delivered
        drain_rate = backlog / ((last or 0) - (first or 0))
        url = served.pipeline.metrics_url
        assert url is not None
        max_batch = int(max(v for k, v in scrape(url).items() if k.startswith("kp_batch_max_size")))
        time.sleep(2.0)  # the loop steps back down once the lag is gone
        steady = int(rate * seconds)
        open_loop(bootstrap, names["in"], rate, steady)
        wait_until(lambda: stats.results >= backlog + steady, 120, "the steady load")
    finally:
        served.stop()
    steady_ms = np.asarray(
        [
            r.timings.end_to_end_ms
            for r in (
                AvroCodec().decode_result(m.value())
                for m in read_topic(
                    opened.topology.kafka, bootstrap, names["out"], backlog + steady, 120
                )
            )
            if r.id.startswith("s-")
        ]
    )
    return ControlRow(
        mode,
        drain_rate,
        max_batch,
        rate,
        float(np.percentile(steady_ms, 50)),
        float(np.percentile(steady_ms, 99)),
    )


def open_loop(bootstrap: str, topic: str, rate: int, n: int) -> dict[str, float]:
    """Produce ``n`` requests at ``rate`` per second on a fixed schedule (open loop).

    Returns each request id's send time (``time.monotonic()``).
    """
    codec = AvroCodec()
    vector = np.ones(64, np.float32)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 1})
    sent: dict[str, float] = {}
    start = time.monotonic()
    for i in range(n):
        due = start + i / rate
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        rid = f"s-{i}"
        producer.produce(
            topic,
            codec.encode_request(tensor_request(rid, "tiny-mlp", {"x": vector})),
            rid.encode(),
        )
        sent[rid] = time.monotonic()
        producer.poll(0)
    producer.flush(30)
    return sent


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def markdown(memory: list[MemoryRow], control: list[ControlRow], m: dict[str, Any]) -> str:
    """The report: memory against backlog, then the control loop on and off."""
    lines = [
        "### Peak memory against backlog (tiny model, `kp-pipeline run`, max_in_flight 2048)",
        "",
        "| backlog | drained in s | requests/s | peak RSS MiB | pauses | max lag seen "
        "| max lag s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in memory:
        lines.append(
            f"| {r.backlog:,} | {r.seconds:.1f} | {r.backlog / r.seconds:,.0f} | "
            f"{r.peak_rss_mib:.0f} | {r.pauses} | {r.max_lag:,} | {r.max_lag_s:.1f} |"
        )
    if len(memory) > 1:
        growth = memory[-1].peak_rss_mib / memory[0].peak_rss_mib
        lines += [
            "",
            f"Peak RSS at {memory[-1].backlog:,} ÷ at {memory[0].backlog:,}: {growth:.2f}x "
            f"for {memory[-1].backlog / memory[0].backlog:.0f}x the backlog.",
        ]
    lines += [
        "",
        "### Lag control loop on and off (tiny model, batches of 8 / 2 ms configured)",
        "",
        "| lag_control | backlog drain requests/s | largest batch limit | steady load req/s "
        "| steady p50 ms | steady p99 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in control:
        lines.append(
            f"| {c.mode} | {c.drain_rate:,.0f} | {c.max_batch} | {c.steady_rate:,} | "
            f"{c.steady_p50_ms:.1f} | {c.steady_p99_ms:.1f} |"
        )
    by = {c.mode: c for c in control}
    if "on" in by and "off" in by:
        lines += [
            "",
            f"Drain throughput on ÷ off: {by['on'].drain_rate / by['off'].drain_rate:.2f}x; "
            f"steady p99 on ÷ off: {by['on'].steady_p99_ms / by['off'].steady_p99_ms:.2f}x.",
        ]
    lines += ["", report.machine_line(m), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run both measurements and write load/results/backlog.md."""
    ap = argparse.ArgumentParser(prog="python -m load.backlog", description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="50000,200000", help="backlog sizes, comma-separated")
    ap.add_argument("--control-backlog", type=int, default=100_000)
    ap.add_argument("--steady-rate", type=int, default=2000, help="requests/s of the steady load")
    ap.add_argument("--steady-seconds", type=float, default=10.0)
    ap.add_argument("--skip-control", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "backlog.md")
    args = ap.parse_args(argv)
    if not (ROOT / "models" / "tiny_mlp.onnx").exists():
        print("models/tiny_mlp.onnx missing: run `make models`", file=sys.stderr)
        return 2
    tag = f"bl{os.getpid()}"
    memory: list[MemoryRow] = []
    control: list[ControlRow] = []
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        bootstrap = broker.bootstrap_servers
        for size in (int(x) for x in args.sizes.split(",")):
            row = memory_run(bootstrap, size, Path(tmp), tag)
            memory.append(row)
            rate = row.backlog / row.seconds
            print(
                f"backlog {size:>9,}: peak RSS {row.peak_rss_mib:.0f} MiB, {rate:,.0f} req/s, "
                f"{row.pauses} pauses",
                flush=True,
            )
        if not args.skip_control:
            for mode in ("on", "off"):
                c = control_run(
                    bootstrap, mode, args.control_backlog, args.steady_rate,
                    args.steady_seconds, Path(tmp), tag,
                )  # fmt: skip
                control.append(c)
                print(
                    f"lag_control {mode}: drain {c.drain_rate:,.0f} req/s (batch limit up "
                    f"to {c.max_batch}), steady p99 {c.steady_p99_ms:.1f} ms",
                    flush=True,
                )
    text = markdown(memory, control, report.machine())
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
