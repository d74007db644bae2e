"""Side-by-side benchmark of kp-pipeline against its alternatives and limits.

The naive consumer, the model alone, preprocessing plus model back to back, and a Kafka
pass-through, all on one broker, one machine, in one run.

    python -m load.bench --scenario all

Prints a table per scenario with ratios and the targets, and writes
load/results/latest.{json,md}. Figures vary by 1.5x on shared machines: compare only
figures from the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka.admin import AdminClient

from load import variants
from pipeline.app import OpenTopology, open_topology
from pipeline.broker import EmbeddedBroker
from pipeline.client import image_request, produce_requests, tensor_request
from pipeline.kafka import ensure_topics
from pipeline.messages import Request
from pipeline.samples import sample_jpegs
from schemas.codec import AvroCodec

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Row:
    """One contender's figure."""

    variant: str
    requests: int
    seconds: float

    @property
    def rate(self) -> float:
        """Requests per second."""
        return self.requests / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Scenario:
    """A model, its requests, and what kp-pipeline must reach."""

    name: str
    topology: Path
    make: Callable[[int], list[Request]]
    n: int
    naive_n: int
    rows: list[Row] = field(default_factory=list)
    checks: list[tuple[str, float, float]] = field(default_factory=list)


def tiny_requests(n: int) -> list[Request]:
    x = np.random.default_rng(20261124).standard_normal((n, 64)).astype(np.float32)
    return [tensor_request(f"t-{i}", "tiny-mlp", {"x": x[i]}) for i in range(n)]


def image_requests(n: int) -> list[Request]:
    photos = list(sample_jpegs().values())
    return [
        image_request(f"i-{i}", "efficientnet-lite0", photos[i % len(photos)]) for i in range(n)
    ]


def _with_topics(opened: OpenTopology, topic: str, out: str, group: str) -> OpenTopology:
    t = opened.topology
    topology = t.model_copy(
        update={
            "topics": t.topics.model_copy(
                update={
                    "input": [topic],
                    "output": out,
                    "dead_letter": out + ".dlq",
                    "create": True,
                }
            ),
            "kafka": t.kafka.model_copy(update={"group_id": group}),
        }
    )
    return dataclasses.replace(opened, topology=topology)


def run_scenario(sc: Scenario, broker: EmbeddedBroker) -> None:
    bootstrap = broker.bootstrap_servers
    stamp = int(time.time())
    topic = f"bench.{sc.name}.{stamp}"
    ensure_topics(AdminClient({"bootstrap.servers": bootstrap}), [topic], 4, 1)
    codec = AvroCodec()
    requests = sc.make(sc.n)
    produce_requests(bootstrap, topic, ((r.id.encode(), codec.encode_request(r)) for r in requests))
    opened = open_topology(sc.topology)
    graph = variants.load_graph(opened)
    size = opened.topology.models[0].batching.max_batch_size
    print(f"\n== {sc.name}: {sc.n} requests on {topic}, max_batch_size {size}", flush=True)

    def add(variant: str, timing: tuple[int, float]) -> Row:
        row = Row(variant, *timing)
        sc.rows.append(row)
        print(f"   {variant:<34} {row.rate:>10.1f} req/s", flush=True)
        return row

    kp = add(
        "kp-pipeline",
        variants.kp_pipeline(
            _with_topics(opened, topic, f"{topic}.kp", f"{topic}.kp"), bootstrap, sc.n
        ),
    )
    naive = add(
        "naive consumer",
        variants.naive(
            opened.topology, graph, bootstrap, topic, f"{topic}.naive", f"{topic}.naive", sc.naive_n
        ),
    )
    passthrough = add(
        "Kafka pass-through (no inference)",
        variants.passthrough(bootstrap, topic, f"{topic}.pass", f"{topic}.pass", sc.n),
    )

    sample = requests[:size]
    from pipeline.model_runtime import _run_stages
    from stages.base import Batch

    batch = _run_stages(
        graph.preprocess,
        Batch(
            list(range(len(sample))),
            {k: np.stack([r.inputs[k] for r in sample]) for k in graph.inputs},
        ),
    )
    feeds = {k: np.asarray(batch.columns[k]) for k in graph.info.inputs}
    add(f"model alone, batch {size}", variants.model_alone(graph, feeds, sc.n))

    sc.checks.append(
        ("kp-pipeline / naive", kp.rate / naive.rate, 10.0 if sc.name == "tiny" else 1.0)
    )
    if sc.name == "tiny":
        sc.checks.append(("kp-pipeline / pass-through", kp.rate / passthrough.rate, 0.5))
    else:
        best = max(
            (
                add(
                    f"preprocess + model, batch {b}",
                    variants.preprocess_and_model(graph, requests, b, min(sc.n, 300)),
                )
                for b in (1, 4, 8, 16)
            ),
            key=lambda r: r.rate,
        )
        sc.checks.append(
            (
                f"kp-pipeline / best preprocess+model ({best.variant.split(', ')[1]})",
                kp.rate / best.rate,
                1.0,
            )
        )
    for backend in graph.instances:
        backend.unload()


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    pkgs = ["confluent-kafka", "onnxruntime", "fastavro", "numpy", "pillow"]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "broker": "Tansu 0.6 (memory storage), loopback",
        "packages": {p: version(p) for p in pkgs},
    }


def report(scenarios: list[Scenario], out: Path) -> str:
    lines = []
    for sc in scenarios:
        kp = sc.rows[0].rate
        lines += [
            f"### {sc.name}",
            "",
            "| variant | requests | seconds | requests/s | kp-pipeline ÷ this |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in sc.rows:
            lines.append(
                f"| {r.variant} | {r.requests} | {r.seconds:.2f} | {r.rate:,.1f} | "
                f"{kp / r.rate:.2f}x |"
            )
        lines += ["", "| target | measured | wanted | |", "|---|---:|---:|---|"]
        for name, got, want in sc.checks:
            lines.append(
                f"| {name} | {got:.2f}x | ≥ {want:g}x | {'PASS' if got >= want else 'MISS'} |"
            )
        lines.append("")
    m = machine()
    lines += [
        f"Machine: {m['cpus']} × {m['cpu']}, {m['memory_gib']} GiB, Python {m['python']}, "
        f"{m['broker']}; {', '.join(f'{k} {v}' for k, v in m['packages'].items())}; {m['date']}."
    ]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.md").write_text(text)
    (out / "latest.json").write_text(
        json.dumps(
            {
                "machine": m,
                "scenarios": [
                    {
                        "name": sc.name,
                        "rows": [dict(dataclasses.asdict(r), rate=r.rate) for r in sc.rows],
                        "checks": [
                            {"name": c[0], "measured": c[1], "wanted": c[2]} for c in sc.checks
                        ],
                    }
                    for sc in scenarios
                ],
            },
            indent=2,
        )
    )
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", choices=["tiny", "image", "all"], default="all")
    p.add_argument("--tiny-requests", type=int, default=100_000)
    p.add_argument("--naive-tiny-requests", type=int, default=3_000)
    p.add_argument("--image-requests", type=int, default=600)
    p.add_argument("--out", type=Path, default=ROOT / "load" / "results")
    args = p.parse_args()
    scenarios = []
    if args.scenario in ("tiny", "all"):
        scenarios.append(
            Scenario(
                "tiny",
                ROOT / "load/topologies/tiny-mlp.yaml",
                tiny_requests,
                args.tiny_requests,
                args.naive_tiny_requests,
            )
        )
    if args.scenario in ("image", "all"):
        scenarios.append(
            Scenario(
                "image",
                ROOT / "topology.yaml",
                image_requests,
                args.image_requests,
                min(args.image_requests, 300),
            )
        )
    with EmbeddedBroker() as broker:
        for sc in scenarios:
            run_scenario(sc, broker)
    print("\n" + report(scenarios, args.out))


if __name__ == "__main__":
    main()
