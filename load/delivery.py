"""Exactly-once against at-least-once: what Kafka transactions cost, side by side.

The tiny model drains a backlog of requests produced beforehand, once per delivery mode,
in alternating order over several rounds on the same broker, in one process run (the
machine is shared and noisy: only the ratio within a run means anything). Throughput is
the backlog over the time from the first record consumed to the last outcome readers can
see: its acknowledgement at-least-once, its transaction's commit exactly-once.

Also per mode: a steady open-loop load well under saturation, with each request's latency
from its produce to its outcome seen by a ``read_committed`` reader. Exactly-once makes
an outcome visible only when its transaction commits, so its latency grows by about half
of ``flow.commit_interval_ms``: the price of the guarantee, shown at two intervals.

    python -m load.delivery                       # writes load/results/delivery.md
    python -m load.delivery --backlog 500000 --rounds 3

Target (issue 5): exactly-once costs at most 10% of at-least-once's throughput.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from load import report
from load.backlog import PARTITIONS, ROOT, open_loop, produce_tiny, topology_for, wait_until
from pipeline.app import open_topology
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.kafka.clients import ensure_topics
from pipeline.tools.demo import BackgroundPipeline
from schemas.codec import AvroCodec

RESULTS = ROOT / "load" / "results"
MODES = ("at_least_once", "exactly_once")
TARGET_COST = 0.10


@dataclass
class Drain:
    """One backlog drained in one mode."""

    mode: str
    round: int
    requests: int
    seconds: float
    transactions: int

    @property
    def rate(self) -> float:
        """Requests per second."""
        return self.requests / self.seconds


@dataclass
class Steady:
    """Produce-to-visible latency under an open-loop load, in one mode."""

    mode: str
    commit_interval_ms: int
    rate: int
    p50_ms: float
    p99_ms: float


def _topics(bootstrap: str, tag: str) -> dict[str, str]:
    names = {"KP_INPUT": f"{tag}-in", "KP_OUTPUT": f"{tag}-out", "KP_DLQ": f"{tag}-dlq"}
    ensure_topics(AdminClient({"bootstrap.servers": bootstrap}), list(names.values()), 4, 1)
    return names


def _serve(
    bootstrap: str, tmp: Path, tag: str, mode: str, names: dict[str, str], commit_ms: int
) -> BackgroundPipeline:
    changes = {"delivery": mode, "flow": {"commit_interval_ms": commit_ms}}
    path = topology_for(tmp, tag, changes)
    os.environ.update({**names, "KP_GROUP": f"{tag}-g"})
    return BackgroundPipeline(open_topology(path), bootstrap).start()


def drain(bootstrap: str, tmp: Path, mode: str, rnd: int, backlog: int, commit_ms: int) -> Drain:
    """Drain ``backlog`` requests produced before the pipeline starts."""
    tag = f"dl{os.getpid()}-{mode}-{rnd}"
    names = _topics(bootstrap, tag)
    produce_tiny(bootstrap, names["KP_INPUT"], backlog, tag)
    served = _serve(bootstrap, tmp, tag, mode, names, commit_ms)
    try:
        assert served.pipeline is not None
        p = served.pipeline
        wait_until(lambda: p.stats.results >= backlog, 300, f"{mode}: the backlog")
        seconds = (p.stats.last_delivered or 0.0) - (p.stats.first_consumed or 0.0)
        transactions = getattr(p.delivery, "transactions", {}).get("committed", 0)
    finally:
        served.stop()
    return Drain(mode, rnd, backlog, seconds, transactions)


def steady(
    bootstrap: str, tmp: Path, mode: str, rate: int, seconds: float, commit_ms: int
) -> Steady:
    """Open-loop load at ``rate``; latency from produce to the outcome a reader can see."""
    tag = f"st{os.getpid()}-{mode}-{commit_ms}"
    names = _topics(bootstrap, tag)
    served = _serve(bootstrap, tmp, tag, mode, names, commit_ms)
    seen: dict[str, float] = {}
    stop = threading.Event()
    reader = threading.Thread(
        target=_read_visible, args=(bootstrap, names["KP_OUTPUT"], seen, stop), daemon=True
    )
    reader.start()
    try:
        assert served.pipeline is not None
        wait_until(served.pipeline.assigned.is_set, 60, "the assignment")
        sent = open_loop(bootstrap, names["KP_INPUT"], rate, int(rate * seconds))
        wait_until(lambda: len(seen) >= len(sent), 120, f"{mode}: the steady load")
    finally:
        stop.set()
        reader.join(10)
        served.stop()
    ms = np.asarray([(seen[rid] - t) * 1000.0 for rid, t in sent.items()])
    return Steady(mode, commit_ms, rate, float(np.percentile(ms, 50)), float(np.percentile(ms, 99)))


def _read_visible(
    bootstrap: str, topic: str, seen: dict[str, float], stop: threading.Event
) -> None:
    codec = AvroCodec()
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "latency-reader",
            "isolation.level": "read_committed",
            "fetch.wait.max.ms": 10,
        }
    )
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
    while not stop.is_set():
        for msg in consumer.consume(1000, 0.05):
            value = msg.value()
            if msg.error() is None and value is not None:
                seen.setdefault(codec.decode_result(value).id, time.monotonic())
    consumer.close()


def markdown(drains: list[Drain], latency: list[Steady], m: dict[str, Any]) -> str:
    """The report: throughput per round and mode, the cost, then latency."""
    by_mode = {mode: [d.rate for d in drains if d.mode == mode] for mode in MODES}
    lines = [
        "### Exactly-once against at-least-once (tiny model, backlog drained, Tansu)",
        "",
        "| round | delivery | requests | seconds | requests/s | transactions |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for d in drains:
        lines.append(
            f"| {d.round} | {d.mode} | {d.requests:,} | {d.seconds:.2f} | {d.rate:,.0f} | "
            f"{d.transactions or '—'} |"
        )
    alos, eos = (statistics.median(by_mode[mode]) for mode in MODES)
    cost = 1.0 - eos / alos
    verdict = "MET" if cost <= TARGET_COST else "MISSED"
    lines += [
        "",
        f"Median requests/s: at-least-once {alos:,.0f}, exactly-once {eos:,.0f}: exactly-once "
        f"costs {cost:.1%} (target ≤ {TARGET_COST:.0%}: {verdict}).",
    ]
    if latency:
        lines += [
            "",
            "### Produce → visible to a read_committed reader, open-loop steady load",
            "",
            "| delivery | commit_interval_ms | requests/s | p50 ms | p99 ms |",
            "|---|---:|---:|---:|---:|",
        ]
        for s in latency:
            lines.append(
                f"| {s.mode} | {s.commit_interval_ms} | {s.rate:,} | {s.p50_ms:.1f} | "
                f"{s.p99_ms:.1f} |"
            )
    lines += ["", report.machine_line(m), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the rounds and the latency runs; write load/results/delivery.md."""
    ap = argparse.ArgumentParser(prog="python -m load.delivery", description=__doc__.split("\n")[0])
    ap.add_argument("--backlog", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--commit-interval-ms", type=int, default=500)
    ap.add_argument("--steady-rate", type=int, default=1000)
    ap.add_argument("--steady-seconds", type=float, default=8.0)
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "delivery.md")
    args = ap.parse_args(argv)
    if not (ROOT / "models" / "tiny_mlp.onnx").exists():
        print("models/tiny_mlp.onnx missing: run `make models`", file=sys.stderr)
        return 2
    drains: list[Drain] = []
    latency: list[Steady] = []
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        bootstrap = broker.bootstrap_servers
        for rnd in range(1, args.rounds + 1):
            # Alternate which mode goes first, so drift on the machine hits both alike.
            for mode in MODES if rnd % 2 else MODES[::-1]:
                d = drain(bootstrap, Path(tmp), mode, rnd, args.backlog, args.commit_interval_ms)
                drains.append(d)
                print(f"round {rnd} {mode:>13}: {d.rate:,.0f} req/s", flush=True)
        if not args.skip_latency:
            for mode, commit_ms in (
                ("at_least_once", args.commit_interval_ms),
                ("exactly_once", args.commit_interval_ms),
                ("exactly_once", 100),
            ):
                s = steady(bootstrap, Path(tmp), mode, args.steady_rate, args.steady_seconds,
                           commit_ms)  # fmt: skip
                latency.append(s)
                print(
                    f"steady {mode} ({commit_ms} ms commits): p50 {s.p50_ms:.1f} ms, "
                    f"p99 {s.p99_ms:.1f} ms",
                    flush=True,
                )
    text = markdown(drains, latency, report.machine())
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
