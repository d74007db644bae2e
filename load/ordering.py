"""What publishing in offset order costs: the tiny model with ``ordering`` none, partition, key.

One embedded broker; for each run a backlog of tiny-model requests over 4 partitions and
1,000 record keys is produced, then served by kp-pipeline in this process as the
benchmark serves it (`pipeline.tools.demo.BackgroundPipeline`), timed from the first
record consumed to the last outcome acknowledged. The three settings take turns, twice
each, in one run, so the machine's drift falls on all of them alike; printed are each
run's rate and each setting's best. On one instance batches finish in order, so nothing
waits in the reorder buffer: this is the bookkeeping's cost, the throughput the setting
gives up; what ordering costs in latency when instances finish out of order is
``kp_reorder_wait_seconds``.

    python -m load.ordering [--requests 200000]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

from confluent_kafka.admin import AdminClient

from load.bench import PARTITIONS, ROOT, Plan, open_for_bench, tiny_requests
from pipeline.app import OpenTopology
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.kafka.clients import ensure_topics
from pipeline.tools.demo import BackgroundPipeline
from pipeline.tools.traffic import produce_requests
from schemas.codec import AvroCodec

__all__ = ["main", "serve"]

KEYS = 1000
MODES = ("none", "key", "partition")


def serve(broker: EmbeddedBroker, name: str, ordering: str, n: int) -> float:
    """Requests per second of one backlog of ``n`` served with ``ordering``."""
    bootstrap = broker.bootstrap_servers
    plan = Plan(name, "Tiny", ROOT / "load/topologies/tiny-mlp.yaml", tiny_requests, n, 0)
    opened = open_for_bench(plan, bootstrap)
    model = opened.topology.models[0].model_copy(update={"ordering": ordering})
    topology = opened.topology.model_copy(update={"models": [model]})
    topic = topology.topics.input[0]
    ensure_topics(AdminClient({"bootstrap.servers": bootstrap}), [topic], PARTITIONS, 1)
    codec = AvroCodec()
    produce_requests(
        topology.kafka,
        bootstrap,
        topic,
        ((f"k{i % KEYS}".encode(), codec.encode_request(r)) for i, r in enumerate(
            tiny_requests(model, n)
        )),
    )  # fmt: skip
    served = BackgroundPipeline(OpenTopology(topology, opened.source, opened.base_dir), bootstrap)
    served.start(120)
    assert served.pipeline is not None
    stats = served.pipeline.stats
    deadline = time.monotonic() + 600
    while stats.results + stats.dead_letters < n and time.monotonic() < deadline:
        time.sleep(0.01)
    served.stop()
    assert stats.results == n, (stats.results, stats.dead_letters)
    assert stats.first_consumed is not None
    assert stats.last_delivered is not None
    return n / (stats.last_delivered - stats.first_consumed)


def main(argv: list[str] | None = None) -> int:
    """Serve the backlog with each setting, twice, in turns; print the rates."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=200_000)
    args = p.parse_args(argv)
    rates: defaultdict[str, list[float]] = defaultdict(list)
    with EmbeddedBroker() as broker:
        for rep in range(2):
            for mode in MODES:
                rate = serve(broker, f"ordering.{mode}.{rep}", mode, args.requests)
                rates[mode].append(rate)
                print(f"ordering: {mode:9s} run {rep + 1}: {rate:,.0f} requests/s", flush=True)
    best = {mode: max(r) for mode, r in rates.items()}
    for mode in MODES:
        print(
            f"ordering: {mode:9s} best {best[mode]:,.0f} requests/s "
            f"({best[mode] / best['none']:.2f}x of none)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
