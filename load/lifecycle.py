"""A promotion under load: latency before, during and after it, at half of saturation.

    python -m load.lifecycle [--backlog 100000] [--seconds 30] [--promote-at 10] [--swap]

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

``--swap``: the topology serves version 1 only, and the command is a whole swap: ``versions
load`` of version 2 from an artifact the pipeline has never seen (loaded and warmed beside
version 1), ``promote 2`` once ``/metrics`` counts it loaded, then ``unload 1`` (drained,
unloaded); "during" is from the load command until version 1 is unloaded.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
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
from pipeline.lifecycle.admin import load, promote, send, unload

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "load" / "topologies" / "tiny-mlp.yaml"
PARTITIONS = 4


def two_versions(
    folder: Path, bootstrap: str, tag: str, port: int, shadow: bool = False, versions: int = 2
) -> Path:
    """The tiny topology with a second version of the model, version 1 the default.

    ``shadow``: version 2 shadows version 1 for every key. ``versions=1``: version 1 only.
    """
    text = TINY.read_text().replace("../../models/", f"{ROOT}/models/")
    model = text[text.index("  - name: tiny-mlp") :]
    split = '{default: "1", shadow: {version: "2"}}' if shadow else '{default: "1"}'
    if versions == 2:
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


def windows(
    sent_wall: np.ndarray[Any, Any],
    latency: np.ndarray[Any, Any],
    at: float,
    until: float | None = None,
) -> list[Any]:
    """(name, count, p50, p99, missing) for the requests sent before, during, after.

    During: from ``at`` to ``until`` (by default two seconds).
    """
    rows = []
    end = at + 2.0 if until is None else until
    during = f"during ({end - at:.1f} s from the command)"
    for name, lo, hi in (("before", -np.inf, at), (during, at, end), ("after", end, np.inf)):
        mask = (sent_wall >= lo) & (sent_wall < hi)
        got = latency[mask & ~np.isnan(latency)]
        missing = int(mask.sum() - len(got))
        p50, p99 = np.percentile(got, [50, 99]) if len(got) else (np.nan, np.nan)
        rows.append((name, int(mask.sum()), float(p50), float(p99), missing))
    return rows


def _loads(url: str, result: str) -> float:
    """``kp_version_loads_total{result}`` of the pipeline at ``url``, summed."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    prefix, total = "kp_version_loads_total{", 0.0
    for line in text.splitlines():
        if line.startswith(prefix) and f'result="{result}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def swap(opened: Any, address: str, url: str, artifact: Path, moment: list[float]) -> None:
    """Load version 2 from ``artifact``, promote it once loaded, unload version 1.

    ``moment`` gets the command's start and the moment version 1 was gone.
    """
    topology = opened.topology
    moment.append(time.time())
    send(topology, address, "tiny-mlp", load(topology, "2", str(artifact)), "load 2")
    _until(lambda: _loads(url, "loaded") >= 1, "version 2 loaded")
    send(topology, address, "tiny-mlp", promote("2"), "promote 2")
    time.sleep(0.5)  # every replica applies a record within about 0.2 s
    send(topology, address, "tiny-mlp", unload(topology, "1"), "unload 1")
    _until(lambda: _loads(url, "unloaded") >= 1, "version 1 unloaded")
    moment.append(time.time())


def _until(done: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not within {timeout:g} s")
        time.sleep(0.05)


def _table(runs: dict[str, Any], at: float, seconds: float) -> None:
    """The runs' latency windows as a Markdown table."""
    print(f"\nat {at:g} s into each run of {seconds:g} s:\n")
    print("| run | requests sent | count | p50 (ms) | p99 (ms) | missing |")
    print("|---|---|---:|---:|---:|---:|")
    swapped = [m for _, m in runs.values() if len(m) > 1]
    for name, (report, moment) in runs.items():
        s = report.samples
        assert s is not None
        until = None  # the control: as long as the swap took
        if swapped:
            until = moment[0] + (swapped[0][1] - swapped[0][0])
        for window, count, p50, p99, missing in windows(
            s.sent_wall, s.latency_ms, moment[0], until
        ):
            print(f"| {name} | {window} | {count:,} | {p50:.1f} | {p99:.1f} | {missing} |")
        print(
            f"| {name} | all, at {report.achieved_rate:,.0f}/s | {report.counts['sent']:,} "
            f"| | | {report.missing} |"
        )


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
    p.add_argument("--swap", action="store_true", help="load, promote, unload a new artifact")
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
        path = two_versions(Path(tmp), address, tag, port, versions=1 if args.swap else 2)
        artifact = Path(shutil.copy(ROOT / "models" / "tiny_mlp.onnx", Path(tmp) / "v2.onnx"))
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
            what = "swap v1 → v2 (load, promote, unload)" if args.swap else "promotion v1 → v2"
            for name, command in ((what, True), ("control: no command", False)):
                moment: list[float] = []

                def at_the_moment(moment: list[float] = moment, command: bool = command) -> None:
                    if command and args.swap:
                        swap(opened, address, url, artifact, moment)
                    elif command:
                        moment.append(time.time())
                        send(opened.topology, address, "tiny-mlp", promote("2"), "promote 2")
                    else:
                        moment.append(time.time())

                config = LoadConfig(path, rate=rate, duration=args.seconds, bootstrap=address)
                events = [(args.promote_at, at_the_moment)]
                runs[name] = (measure(config, opened, address, f"{url}/metrics", events), moment)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    _table(runs, args.promote_at, args.seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
