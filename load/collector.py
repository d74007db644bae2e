"""The hot path's allocations under CPython's default collector and the serving policy.

    python -m load.collector [--batches 200]

Decodes the tiny scenario's requests a consumed batch (2,000) at a time and wraps each in
its `Envelope`, as the Kafka loop does, while the previous ``--in-flight`` requests stay
alive (the in-flight window), with the collector as CPython sets it and inside
`pipeline.engine.collector.serving_collector`, alternating, and prints CPU per request
and how many collections ran. What `pipeline/engine/collector.py` is measured by.
"""

from __future__ import annotations

import argparse
import collections
import gc
import time

from load.bench import ROOT, tiny_requests
from pipeline.config.loader import load_topology
from pipeline.engine.collector import serving_collector
from schemas.codec import AvroCodec
from schemas.messages import Envelope

BATCH = 2000


def run(values: list[bytes], batches: int, in_flight: int) -> tuple[float, int]:
    """CPU seconds per request, and collections run, for ``batches`` consumed batches."""
    codec = AvroCodec()
    alive: collections.deque[list[Envelope]] = collections.deque()
    keep = max(1, in_flight // BATCH)
    before = sum(s["collections"] for s in gc.get_stats())
    start = time.process_time()
    for b in range(batches):
        rows = [
            Envelope("in", 0, b * BATCH + i, None, v, 0, 0.0, 1, r)  # type: ignore[arg-type]
            for i, (v, r) in enumerate(zip(values, codec.decode_requests(values), strict=True))
        ]
        alive.append(rows)
        if len(alive) > keep:
            alive.popleft()
    cpu = time.process_time() - start
    return cpu / (batches * BATCH), sum(s["collections"] for s in gc.get_stats()) - before


def main(argv: list[str] | None = None) -> int:
    """Alternate the two policies, twice each; print the figures."""
    p = argparse.ArgumentParser(
        prog="python -m load.collector", description=__doc__.splitlines()[0]
    )
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--in-flight", type=int, default=20_000)
    args = p.parse_args(argv)
    topology = load_topology(ROOT / "load/topologies/tiny-mlp.yaml")
    codec = AvroCodec()
    values = [codec.encode_request(r) for r in tiny_requests(topology.models[0], BATCH)]
    print(f"{args.batches} batches of {BATCH}, {args.in_flight:,} requests kept alive")
    print("| collector | µs per request | collections |")
    print("|---|---:|---:|")
    for _ in range(2):
        us, n = run(values, args.batches, args.in_flight)
        print(f"| CPython's default {gc.get_threshold()} | {us * 1e6:.2f} | {n} |")
        with serving_collector():
            us, n = run(values, args.batches, args.in_flight)
            print(f"| serving policy {gc.get_threshold()}, frozen | {us * 1e6:.2f} | {n} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
