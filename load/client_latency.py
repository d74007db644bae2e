"""The service client's round trip at a steady rate: `Client.submit` to its result.

    python -m load.client_latency [--rate 500] [--seconds 10]

One embedded broker; `kp-pipeline run` serves the tiny topology in its own process (as in
production); this process is the service: a `Client` sends requests at a constant rate
(open loop: each at its due time, whatever the answers do) and records, per request, the
time from `submit` to its future resolving (the result read from the client's reply
topic and decoded). Prints p50/p90/p99/max and how many answered; compare only figures
from one run.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from concurrent.futures import Future

import numpy as np
from confluent_kafka.admin import AdminClient

from load.bench import ROOT, run_process, topic_env
from pipeline.client import Client
from pipeline.config.loader import load_topology
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.kafka.clients import ensure_topics
from schemas.messages import Result


def measure(rate: float, seconds: float) -> dict[str, float]:
    """Round trips in ms at ``rate`` requests/s for ``seconds``."""
    with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap_servers
        env = topic_env("client-latency", bootstrap)
        path = ROOT / "load/topologies/tiny-mlp.yaml"
        t = load_topology(path, env=env).topics
        admin = AdminClient({"bootstrap.servers": bootstrap})
        ensure_topics(admin, [*t.input, t.output, t.dead_letter], 4, 1)
        with run_process(path, bootstrap, env):
            return _run(Client(bootstrap, t.input[0], t.dead_letter), rate, seconds)


def _run(client: Client, rate: float, seconds: float) -> dict[str, float]:
    x = np.random.default_rng(7).standard_normal(64).astype(np.float32)
    with client:
        client.infer("tiny-mlp", {"x": x}, timeout=60)  # warm: the group has joined
        times: list[float] = []
        lock = threading.Lock()

        def done(sent: float) -> object:
            def record(_: Future[Result]) -> None:
                with lock:
                    times.append((time.perf_counter() - sent) * 1000.0)

            return record

        n = int(rate * seconds)
        futures = []
        start = time.perf_counter()
        for i in range(n):
            pause = start + i / rate - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            future = client.submit("tiny-mlp", {"x": x})
            future.add_done_callback(done(time.perf_counter()))  # type: ignore[arg-type]
            futures.append(future)
        deadline = time.monotonic() + 30
        while client.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
    p = np.percentile(np.asarray(times or [float("nan")]), [50, 90, 99, 100])
    return {"sent": n, "answered": len(times), "p50": p[0], "p90": p[1], "p99": p[2], "max": p[3]}


def main(argv: list[str] | None = None) -> int:
    """Measure and print the round trip at one rate."""
    ap = argparse.ArgumentParser(prog="python -m load.client_latency", description=__doc__)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args(argv)
    r = measure(args.rate, args.seconds)
    print(
        f"client round trip at {args.rate:g} requests/s for {args.seconds:g} s "
        f"({r['answered']:,.0f} of {r['sent']:,.0f} answered): p50 {r['p50']:.1f} ms, "
        f"p90 {r['p90']:.1f} ms, p99 {r['p99']:.1f} ms, max {r['max']:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
