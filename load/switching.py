"""The tiny model served under several GIL switch intervals, alternating, on one broker.

    python -m load.switching [--requests 300000] [--rounds 3] [--intervals 5,1,0.5]

What `pipeline.engine.interpreter.SWITCH_INTERVAL_S` is measured by. One embedded broker;
for each round and each interval (milliseconds; 5 is CPython's own), the tiny scenario's
requests are produced to a fresh topic and served by kp-pipeline as the benchmark runs
it (`pipeline.tools.demo.BackgroundPipeline`), with the serving policy's switch interval
set to that value. Prints each run (requests/s from the first record consumed to the
last outcome acknowledged, process CPU per request, consumer pauses: the in-flight
window filled because the model side fell behind) and the median per interval. The
runs alternate so that the machine's drift spreads over every interval alike; read the
medians, and only differences larger than the spread between rounds.
"""

from __future__ import annotations

import argparse
import statistics

from load.bench import ROOT, Plan, tiny_requests
from load.profile_tiny import produce, serve
from pipeline.engine import interpreter
from pipeline.kafka.broker import EmbeddedBroker

TOPOLOGY = ROOT / "load/topologies/tiny-mlp.yaml"


def main(argv: list[str] | None = None) -> int:
    """Serve the tiny scenario once per interval per round; print runs and medians."""
    p = argparse.ArgumentParser(
        prog="python -m load.switching", description=__doc__.splitlines()[0]
    )
    p.add_argument("--requests", type=int, default=300_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--intervals", default="5,1,0.5", help="milliseconds, comma-separated")
    args = p.parse_args(argv)
    intervals = [float(ms) for ms in args.intervals.split(",")]
    n = args.requests
    rates: dict[float, list[float]] = {ms: [] for ms in intervals}
    print(f"tiny model, {n:,} requests a run, {args.rounds} rounds")
    print("| round | switch interval | requests/s | process CPU µs/request | pauses |")
    print("|---:|---:|---:|---:|---:|")
    with EmbeddedBroker() as broker:
        for r in range(args.rounds):
            for ms in intervals:
                plan = Plan(f"switch{r}-{ms:g}", "Tiny model", TOPOLOGY, tiny_requests, n, 0)
                opened = produce(plan, broker.bootstrap_servers, n)
                interpreter.SWITCH_INTERVAL_S = ms / 1000.0
                seconds, cpu, _, pauses = serve(opened, broker.bootstrap_servers, n)
                rates[ms].append(n / seconds)
                print(
                    f"| {r + 1} | {ms:g} ms | {n / seconds:,.0f} | {cpu / n * 1e6:.2f} | {pauses} |"
                )
    print("\n| switch interval | median requests/s | spread (min–max) |")
    print("|---:|---:|---:|")
    for ms, got in rates.items():
        print(f"| {ms:g} ms | {statistics.median(got):,.0f} | {min(got):,.0f}–{max(got):,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
