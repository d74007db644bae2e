"""Where a tiny-model request's CPU goes: every thread of kp-pipeline under cProfile.

    python -m load.profile_tiny [--requests 100000]

One embedded broker; the tiny scenario's requests are produced once, then kp-pipeline
(`pipeline.tools.demo.BackgroundPipeline`, as the benchmark runs it) serves them with a
cProfile profiler in each of its threads (the Kafka loop, the model's dispatch,
preprocess and infer threads). Prints the wall-clock rate (lower than the benchmark's:
cProfile adds to every Python call), then own time per request by where the code lives
(kp-pipeline's own modules, librdkafka calls, fastavro, NumPy, ONNX Runtime, the rest)
and the functions that cost the most. Read the split, not the absolute figures: the
profiler inflates code with many small calls the most.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import threading
import time
from collections import defaultdict
from typing import Any

from confluent_kafka.admin import AdminClient

from load.bench import PARTITIONS, ROOT, Plan, open_for_bench, tiny_requests
from pipeline.app import OpenTopology
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.kafka.clients import ensure_topics
from pipeline.tools.demo import BackgroundPipeline
from pipeline.tools.traffic import produce_requests
from schemas.codec import AvroCodec

_WAITING = ("SimpleQueue' objects>", "_thread.lock' objects>", "select.poll", "sleep")


def _where(path: str, name: str) -> str:
    """The bucket a profiled function's own time goes to."""
    if any(w in name for w in _WAITING):
        return "waiting (threads blocked, no CPU)"
    if "cimpl.Consumer" in name and "consume" in name:
        return "librdkafka consume (fetch, and waiting for it)"
    if "cimpl" in name or "confluent_kafka" in path:
        return "librdkafka (other client calls)"
    if "fastavro" in path or "fastavro" in name:
        return "fastavro"
    if "onnxruntime" in path or "onnxruntime" in name:
        return "ONNX Runtime"
    if "numpy" in path or "numpy" in name:
        return "NumPy"
    for part in ("schemas", "pipeline", "stages", "backends"):
        if f"/{part}/" in path and ".venv" not in path:
            return f"kp-pipeline {part}/"
    if path == "~":
        return "builtins (called from the above)"
    return "Python stdlib and other"


def produce(plan: Plan, bootstrap: str, n: int) -> OpenTopology:
    """The tiny scenario's topology on this broker, with ``n`` requests produced to it."""
    opened = open_for_bench(plan, bootstrap)
    topology = opened.topology
    topic = topology.topics.input[0]
    codec = AvroCodec()
    ensure_topics(AdminClient({"bootstrap.servers": bootstrap}), [topic], PARTITIONS, 1)
    requests = tiny_requests(topology.models[0], n)
    produce_requests(
        topology.kafka,
        bootstrap,
        topic,
        ((r.id.encode(), codec.encode_request(r)) for r in requests),
    )
    return opened


def serve(
    opened: OpenTopology, bootstrap: str, n: int, profile: bool
) -> tuple[float, float, list[cProfile.Profile]]:
    """Serve ``n`` requests; their wall time, process CPU time and the threads' profiles."""
    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()

    def start_profiling(*_: Any) -> None:
        sys.setprofile(None)
        prof = cProfile.Profile()
        with lock:
            profiles.append(prof)
        prof.enable()

    if profile:
        threading.setprofile(start_profiling)
    served = BackgroundPipeline(opened, bootstrap).start(120)
    threading.setprofile(None)
    assert served.pipeline is not None
    stats = served.pipeline.stats
    cpu0 = time.process_time()  # from the group join on: serving only
    while stats.results + stats.dead_letters < n:
        time.sleep(0.01)
    cpu = time.process_time() - cpu0
    served.stop()
    assert stats.first_consumed is not None
    assert stats.last_delivered is not None
    return stats.last_delivered - stats.first_consumed, cpu, profiles


def report(profiles: list[cProfile.Profile], n: int, top: int) -> None:
    """Own time per request by bucket, and the costliest functions."""
    merged = pstats.Stats(profiles[0])
    for prof in profiles[1:]:
        merged.add(prof)
    raw: dict[Any, Any] = merged.stats  # type: ignore[attr-defined]
    buckets: defaultdict[str, float] = defaultdict(float)
    rows, ours = [], []
    for (path, line, name), (_, calls, tottime, _, _) in raw.items():
        where = _where(path, name)
        buckets[where] += tottime
        short = path.rsplit("/", 2)[-1] if "/" in path else path
        rows.append((tottime, calls, f"{short}:{line} {name}"))
        if where == "kp-pipeline pipeline/":
            ours.append(rows[-1])
    print("\nown time per request, every profiled thread:")
    for where, t in sorted(buckets.items(), key=lambda kv: -kv[1]):
        print(f"  {t / n * 1e6:8.2f} µs  {where}")
    print(f"\nthe {top} functions with the most own time (µs per request, calls per request)")
    for tottime, calls, where in sorted(rows, reverse=True)[:top]:
        print(f"  {tottime / n * 1e6:8.2f} µs  {calls / n:6.2f}  {where}")
    print("\nkp-pipeline's engine (pipeline/), by function:")
    for tottime, calls, where in sorted(ours, reverse=True)[:top]:
        print(f"  {tottime / n * 1e6:8.2f} µs  {calls / n:6.2f}  {where}")


def main(argv: list[str] | None = None) -> int:
    """Produce, serve once plain and once under the profiler, print the split."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    n = args.requests
    plan = Plan("tiny", "Tiny model", ROOT / "load/topologies/tiny-mlp.yaml", tiny_requests, n, 0)
    with EmbeddedBroker() as broker:
        opened = produce(plan, broker.bootstrap_servers, n)
        seconds, cpu, _ = serve(opened, broker.bootstrap_servers, n, profile=False)
        print(f"plain: {n / seconds:,.0f} requests/s, process CPU {cpu / n * 1e6:.1f} µs/request")
        plan2 = Plan("tiny2", "Tiny model", plan.topology, tiny_requests, n, 0)
        opened = produce(plan2, broker.bootstrap_servers, n)
        seconds, cpu, profiles = serve(opened, broker.bootstrap_servers, n, profile=True)
        print(
            f"profiled: {n / seconds:,.0f} requests/s, process CPU {cpu / n * 1e6:.1f} µs/request"
        )
    report(profiles, n, args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
