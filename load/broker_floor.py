"""How a broker's round trip grows with a partition's history: Tansu beside noida-db.

``python -m load.broker_floor [--rate 5000] [--seconds 5 10 20 30]``: for each broker, on
a fresh topic per run, one hop (produce → an assigned consumer reads it,
`load.variants.kafka_round_trip`) at ``rate`` records/s for each duration, and prints
p50/p90/p99/p99.9 ms side by side.

Why it exists: Tansu 0.6's fetch lists every stored batch of the partition before it
picks the ones at the fetch offset (its ``dynostore`` engine, memory:// included, lists
the partition's ``records/`` prefix on each fetch), so the cost of a fetch grows with
the number of batches the partition holds, and with producers that linger 5 ms a
partition at 1,250 records/s gains ~200 batches a second. A latency measured over a
longer live run on the embedded broker then measures that growth as much as the client
or the pipeline: the bench's latency checks measure their floors over the same seconds
as the pipeline's run (`load.bench.latency_check`), and docs/benchmarks.md shows what
this prints. noida-db answers from an index, and stays flat.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from load import variants
from load.brokers import NoidaBroker, noida_binary
from pipeline.kafka.broker import EmbeddedBroker
from schemas.errors import BrokerError

__all__ = ["main", "measure"]

Row = tuple[str, float, tuple[float, float, float, float]]


def _brokers(folder: Path) -> list[tuple[str, Callable[[], AbstractContextManager[Any]]]]:
    brokers: list[tuple[str, Callable[[], AbstractContextManager[Any]]]] = [
        ("Tansu 0.6 (memory)", EmbeddedBroker)
    ]
    try:
        noida_binary()
    except BrokerError as e:
        print(f"noida-db left out: {e}")
    else:
        brokers.append(("noida-db 0.2.3", lambda: NoidaBroker(folder / "noida")))
    return brokers


def measure(rate: float, durations: Sequence[float], folder: Path) -> list[Row]:
    """One hop's percentiles per broker and duration, each run on a topic of its own."""
    rows: list[Row] = []
    for name, start in _brokers(folder):
        with start() as broker:
            for i, seconds in enumerate(durations):
                topic = f"floor.{i}"
                p = variants.kafka_round_trip(broker.bootstrap_servers, topic, rate, seconds)
                rows.append((name, seconds, p))
                print(f"  {name}, {seconds:g} s: p50 {p[0]:.1f} ms, p99 {p[2]:.1f} ms", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Measure, then print the table."""
    p = argparse.ArgumentParser(
        prog="python -m load.broker_floor", description=__doc__.split("\n")[0]
    )
    p.add_argument("--rate", type=float, default=5000.0, help="records/s (300 bytes each)")
    p.add_argument("--seconds", type=float, nargs="+", default=[5.0, 10.0, 20.0, 30.0])
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kp-floor-") as folder:
        rows = measure(args.rate, args.seconds, Path(folder))
    print(f"\nOne hop at {args.rate:,.0f} records/s, a fresh topic of 4 partitions per run:\n")
    print("| broker | run | p50 ms | p90 ms | p99 ms | p99.9 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, seconds, q in rows:
        print(f"| {name} | {seconds:g} s | " + " | ".join(f"{v:.1f}" for v in q) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
