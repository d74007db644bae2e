"""A promotion under load: latency before, during and after it, at half of saturation.

    python -m load.lifecycle [--backlog 100000] [--seconds 30] [--promote-at 10]

One embedded Tansu broker; ``kp-pipeline run`` in its own process serving the tiny model
in two versions (`load/topologies/tiny-mlp.yaml` with a second ``version``; version 1 the
default). First its saturation: a backlog of ``--backlog`` requests served from the
moment ``/readyz`` is 200 to the last outcome (from its ``/metrics``). Then the open-loop
load generator (`load.generator`) at ``--load`` of that rate (half by default) for
``--seconds``, and at
``--promote-at`` seconds ``kp-pipeline versions promote`` (`pipeline.lifecycle.admin`)
moves the default to version 2. Latency is the client's (outcome read − ``produce()``),
by send time: before the command, during (its two seconds), after. Printed as a table,
with every request's outcome counted; then the same run with no command at that moment
(the control: what the latency does anyway over a run).

``--shadow-cost``: instead, the saturation of the same pipeline without a shadow and with
version 2 shadowing every request (each on its own backlog), side by side.

What this measures is a promotion between two loaded versions (the control topic, every
replica's router swap); loading a new artifact into running replicas is not built yet.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka.admin import AdminClient

from load.backlog import produce_tiny
from load.generator import LoadConfig, measure
from load.workers import saturation
from pipeline.app import open_topology
from pipeline.kafka.broker import EmbeddedBroker, free_port
from pipeline.kafka.clients import ensure_topics
from pipeline.lifecycle.admin import promote, send

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "load" / "topologies" / "tiny-mlp.yaml"
PARTITIONS = 4


def two_versions(folder: Path, bootstrap: str, tag: str, port: int, shadow: bool = False) -> Path:
    """The tiny topology with a second version of the model, version 1 the default.

    ``shadow``: version 2 shadows version 1 for every key.
    """
    text = TINY.read_text().replace("../../models/", f"{ROOT}/models/")
    model = text[text.index("  - name: tiny-mlp") :]
    split = '{default: "1", shadow: {version: "2"}}' if shadow else '{default: "1"}'
    text = text.replace("models:", f"versions: {{tiny-mlp: {split}}}\nmodels:", 1)
    text += model.replace("name: tiny-mlp", "name: tiny-mlp\n    version: '2'", 1)
    text = (
        text.replace("${KP_BOOTSTRAP:-embedded}", bootstrap)
        .replace("${KP_GROUP:-kp-tiny}", f"{tag}.group")
        .replace('"${KP_INPUT:-tiny.requests}"', f"{tag}.requests")
        .replace("${KP_OUTPUT:-tiny.results}", f"{tag}.results")
        .replace("${KP_DLQ:-tiny.dead-letters}", f"{tag}.dead-letters")
    )
    text += f"\nmetrics: {{port: {port}, host: 127.0.0.1}}\n"
    path = folder / f"tiny-two-versions{'-shadowed' if shadow else ''}.yaml"
    path.write_text(text)
    return path


def _run(path: Path) -> subprocess.Popen[bytes]:
    """``kp-pipeline run`` of ``path`` in its own process (not this one's GIL)."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )


def shadow_cost(address: str, folder: Path, n: int) -> dict[str, float]:
    """Saturation without a shadow and with a 100% one, each on its own backlog of ``n``."""
    out = {}
    for shadow in (False, True):
        tag, port = f"bench.shadow.{int(shadow)}.{time.time_ns()}", free_port()
        path = two_versions(folder, address, tag, port, shadow)
        t = open_topology(path).topology.topics
        ensure_topics(
            AdminClient({"bootstrap.servers": address}),
            [*t.input, t.output, t.dead_letter],
            PARTITIONS,
            1,
        )
        produce_tiny(address, t.input[0], n, "backlog")
        proc = _run(path)
        try:
            name = "100% shadow" if shadow else "no shadow"
            out[name] = saturation(f"http://127.0.0.1:{port}", proc, n, name)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    return out


def windows(sent_wall: np.ndarray[Any, Any], latency: np.ndarray[Any, Any], at: float) -> list[Any]:
    """(name, count, p50, p99, missing) for the requests sent before, during, after ``at``."""
    rows = []
    for name, lo, hi in (
        ("before", -np.inf, at),
        ("during (2 s from the command)", at, at + 2.0),
        ("after", at + 2.0, np.inf),
    ):
        mask = (sent_wall >= lo) & (sent_wall < hi)
        got = latency[mask & ~np.isnan(latency)]
        missing = int(mask.sum() - len(got))
        p50, p99 = np.percentile(got, [50, 99]) if len(got) else (np.nan, np.nan)
        rows.append((name, int(mask.sum()), float(p50), float(p99), missing))
    return rows


def main(argv: list[str] | None = None) -> int:
    """Saturation, then the paced run with a promotion in it; a table of the figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backlog", type=int, default=100_000)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--promote-at", type=float, default=10.0)
    p.add_argument("--load", type=float, default=0.5, help="the rate, as a share of saturation")
    p.add_argument(
        "--shadow-cost", action="store_true", help="only: saturation without and with a shadow"
    )
    args = p.parse_args(argv)
    if args.shadow_cost:
        with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
            cost = shadow_cost(broker.bootstrap_servers, Path(tmp), args.backlog)
        base = cost["no shadow"]
        for name, rate in cost.items():
            print(f"| {name} | {rate:,.0f} requests/s | {rate / base:.2f}x |")
        return 0
    tag = f"bench.lifecycle.{time.time_ns()}"
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        address, port = broker.bootstrap_servers, free_port()
        path = two_versions(Path(tmp), address, tag, port)
        opened = open_topology(path)
        t = opened.topology.topics
        admin = AdminClient({"bootstrap.servers": address})
        ensure_topics(admin, [*t.input, t.output, t.dead_letter], PARTITIONS, 1)
        produce_tiny(address, t.input[0], args.backlog, "backlog")
        url = f"http://127.0.0.1:{port}"
        proc = _run(path)
        try:
            sat = saturation(url, proc, args.backlog, "the pipeline")
            rate = sat * args.load
            print(f"saturation {sat:,.0f} requests/s; load at {args.load:g}: {rate:,.0f}/s")
            runs = {}
            for name, command in (("promotion v1 → v2", True), ("control: no command", False)):
                moment: list[float] = []

                def at_the_moment(moment: list[float] = moment, command: bool = command) -> None:
                    moment.append(time.time())
                    if command:
                        send(opened.topology, address, "tiny-mlp", promote("2"), "promote 2")

                config = LoadConfig(path, rate=rate, duration=args.seconds, bootstrap=address)
                events = [(args.promote_at, at_the_moment)]
                runs[name] = (measure(config, opened, address, f"{url}/metrics", events), moment)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    print(f"\nat {args.promote_at:g} s into each run of {args.seconds:g} s:\n")
    print("| run | requests sent | count | p50 (ms) | p99 (ms) | missing |")
    print("|---|---|---:|---:|---:|---:|")
    for name, (report, moment) in runs.items():
        s = report.samples
        assert s is not None
        for window, count, p50, p99, missing in windows(s.sent_wall, s.latency_ms, moment[0]):
            print(f"| {name} | {window} | {count:,} | {p50:.1f} | {p99:.1f} | {missing} |")
        print(
            f"| {name} | all, at {report.achieved_rate:,.0f}/s | {report.counts['sent']:,} "
            f"| | | {report.missing} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
