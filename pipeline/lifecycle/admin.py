"""``kp-pipeline versions``: see and change which version serves, on every replica at once.

    kp-pipeline versions status   topology.yaml
    kp-pipeline versions promote  topology.yaml --model tiny --version 2
    kp-pipeline versions canary   topology.yaml --model tiny --version 3 --share 0.1
    kp-pipeline versions shadow   topology.yaml --model tiny --version 3 --share 1
    kp-pipeline versions rollback topology.yaml --model tiny
    kp-pipeline versions load     topology.yaml --model tiny --version 3 --artifact v3.onnx
    kp-pipeline versions unload   topology.yaml --model tiny --version 1

Each change is one record on the group's control topic (`pipeline.lifecycle.commands`),
written with the topology's own Kafka settings, so it is authenticated and authorised as
every other client of the cluster is (an ACL on the control topic decides who may send
commands). Every replica applies it within about a fifth of a second
(`pipeline.lifecycle.follower`). A command naming a version the group does not serve,
or a rollback with nothing to go back to, is refused before anything is written.

``load`` serves one more version from an artifact, with the settings of one of the
topology's versions (``--settings-of``, by default the current default): every replica
loads and warms it beside the live versions (`pipeline.lifecycle.hotload`), then a
``promote`` moves traffic to it at a batch boundary and ``unload`` retires the old one
(drained, then unloaded). ``unload`` of a version a split still sends requests to is
refused. A replica that cannot load the artifact keeps serving and says why on /readyz.

Two commands at once: each reads the model's latest record, writes its own over it, and
reads the topic back. If another command's record landed between the two, the later
command re-asserts the earlier one's split (a new record, so the group and compaction
both end on it) and fails, saying which command won: the group never ends on a split
nobody was told about.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from pipeline.config.topology import Topology
from pipeline.kafka.clients import admin_config, producer_config, reader_config
from pipeline.lifecycle.commands import (
    STATUS_PREFIX,
    ControlRecord,
    Load,
    Served,
    Split,
    checked_served,
    checked_split,
    control_topic,
    initial_splits,
    served_versions,
)
from pipeline.lifecycle.follower import create_control_topic
from schemas.errors import ConfigError, KpError

__all__ = [
    "ControlLog",
    "add_parser",
    "canary",
    "load",
    "promote",
    "rollback",
    "send",
    "shadow",
    "unload",
]


class ConflictError(KpError):
    """Another command changed the model between this one's read and its write."""


@dataclass
class ControlLog:
    """The control topic as read now: each model's latest record and its offset.

    ``replicas``: each live replica's own state record (`pipeline.lifecycle.follower`).
    """

    records: dict[str, tuple[int, ControlRecord]]
    replicas: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def read(cls, topology: Topology, bootstrap: str, timeout: float = 30.0) -> ControlLog:
        """Read the whole topic (to the end the broker reports) from its beginning."""
        replicas: dict[str, dict[str, Any]] = {}
        return cls(_read(topology, bootstrap, timeout, replicas=replicas), replicas)

    @staticmethod
    def exists(topology: Topology, bootstrap: str) -> bool:
        """Whether the cluster has the control topic."""
        topic = control_topic(topology)
        admin = AdminClient(admin_config(topology.kafka, bootstrap))
        return topic in admin.list_topics(timeout=15).topics

    def current(self, topology: Topology, model: str) -> ControlRecord:
        """The model's split now: its latest record, else the topology's own."""
        if model in self.records:
            return self.records[model][1]
        start = initial_splits(topology)
        if model not in start:
            names = ", ".join(sorted(start))
            raise ConfigError(f"--model: no model {model!r} in this topology (serving {names})")
        return start[model]


def _read(
    topology: Topology,
    bootstrap: str,
    timeout: float,
    until: int | None = None,
    replicas: dict[str, dict[str, Any]] | None = None,
) -> dict[str, tuple[int, ControlRecord]]:
    topic = control_topic(topology)
    conf = reader_config(topology.kafka, bootstrap, group_id=f"{topic}.admin", partition_eof=True)
    consumer = Consumer(conf)
    latest: dict[str, tuple[int, ControlRecord]] = {}
    try:
        found = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if found is None or found.error is not None:
            return latest
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in found.partitions])
        ended: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(ended) < len(found.partitions):
            if time.monotonic() > deadline:
                raise ConfigError(f"control topic {topic}: not read to its end in {timeout:.0f} s")
            for msg in consumer.consume(500, 0.2):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        ended.add(msg.partition() or 0)
                    continue
                if until is not None and (msg.offset() or 0) > until:
                    continue
                key = msg.key() or b""
                if key.startswith(STATUS_PREFIX):
                    if replicas is not None:
                        _replica_state(replicas, key, msg.value())
                    continue
                try:
                    record = ControlRecord.decode(msg.value() or b"")
                except ValueError:
                    continue  # the replicas skip it too
                latest[record.model] = (msg.offset() or 0, record)
    finally:
        consumer.close()
    return latest


def _replica_state(replicas: dict[str, dict[str, Any]], key: bytes, value: bytes | None) -> None:
    name = key[len(STATUS_PREFIX) :].decode(errors="replace")
    if value is None:  # the replica stopped cleanly
        replicas.pop(name, None)
        return
    try:
        replicas[name] = json.loads(value)
    except ValueError:
        replicas.pop(name, None)


def _write(topology: Topology, bootstrap: str, record: ControlRecord) -> int:
    """Produce ``record`` and return its offset once the cluster has it."""
    producer = Producer(producer_config(topology.kafka, bootstrap))
    placed: list[Any] = []
    producer.produce(
        control_topic(topology),
        record.encode(),
        record.model.encode(),
        on_delivery=lambda err, msg: placed.append((err, msg)),
    )
    producer.flush(30)
    if not placed or placed[0][0] is not None:
        why = placed[0][0] if placed else "no acknowledgement within 30 s"
        raise ConfigError(f"control topic {control_topic(topology)}: not written ({why})")
    return int(placed[0][1].offset())


def send(
    topology: Topology,
    bootstrap: str,
    model: str,
    change: Callable[[ControlRecord], Split | Served],
    command: str,
) -> ControlRecord:
    """Write ``change``'s split (or served versions) over the model's current one.

    `ConflictError` if another command landed in between.
    """
    topic = control_topic(topology)
    if topology.topics.create:
        create_control_topic(topology, bootstrap)
    elif not ControlLog.exists(topology, bootstrap):
        raise ConfigError(
            f"control topic {topic} does not exist and topics.create is false: create it "
            "(cleanup.policy=compact, 1 partition) or set topics.control to one that does"
        )
    log = ControlLog.read(topology, bootstrap)
    current = log.current(topology, model)
    seen = log.records.get(model, (-1, current))[0]
    changed, where = change(current), f"versions {command}"
    if isinstance(changed, Split):
        split = checked_split(topology, model, changed, where, current.served)
        record = ControlRecord.made(model, split, current, command)
    else:
        served = checked_served(topology, model, changed, current.split, where)
        record = ControlRecord.made(model, current.split, current, command, served)
    offset = _write(topology, bootstrap, record)
    before = _read(topology, bootstrap, 30.0, until=offset - 1).get(model)
    if before is not None and before[0] != seen:  # another command landed in between
        winner = before[1]
        restore = ControlRecord.made(model, winner.split, record, f"restore {winner.command!r}")
        _write(topology, bootstrap, restore)
        raise ConflictError(
            f"versions {command}: another command ({winner.command!r} by {winner.by}) changed "
            f"model {model!r} at the same time and landed first; its split "
            f"{winner.split.describe()} stays, this command was withdrawn: check and rerun"
        )
    return record


# -- the command line ------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``versions status|promote|canary|rollback``."""
    versions = subparsers.add_parser(
        "versions", help="see or change which model version serves, on every replica"
    )
    sub = versions.add_subparsers(dest="versions_command", required=True)
    status = sub.add_parser("status", help="each model's split and the command that set it")
    promote = sub.add_parser("promote", help="make a version the default")
    canary = sub.add_parser("canary", help="send a share of keys to a version (0 ends it)")
    shade = sub.add_parser(
        "shadow", help="copy a share of the default's requests to a version, compared (0 ends)"
    )
    rollback = sub.add_parser("rollback", help="go back to the split before the last change")
    loads = sub.add_parser("load", help="serve one more version, loaded into every replica")
    unloads = sub.add_parser("unload", help="retire a version no split sends requests to")
    changes = (promote, canary, shade, rollback, loads, unloads)
    for p in (status, *changes):
        p.add_argument("topology", nargs="?", default="topology.yaml")
        p.add_argument("--bootstrap", help="the cluster (default: the topology's)")
    for p in changes:
        p.add_argument("--model", required=True)
    for p in (promote, canary, shade, loads, unloads):
        p.add_argument("--version", required=True)
    loads.add_argument(
        "--artifact",
        help="the new version's file, as the replicas see it (relative: to their topology "
        "file's folder); leave it out to bring back a topology version that was unloaded",
    )
    loads.add_argument("--sha256", help="refuse the artifact unless it has this SHA-256")
    loads.add_argument(
        "--settings-of",
        help="the topology version whose stages, batching and devices it is served with "
        "(default: the model's current default, if the topology lists it)",
    )
    for p in (canary, shade):
        p.add_argument("--share", type=float, required=True, help="0 < share <= 1; 0 removes")
    status.set_defaults(func=run_status)
    for p in changes:
        p.set_defaults(func=run_change)


def _open(args: argparse.Namespace) -> tuple[Topology, str]:
    from pipeline.app import open_topology
    from pipeline.kafka.preflight import check_access

    topology = open_topology(args.topology).topology
    if not args.bootstrap and topology.kafka.embedded:
        raise ConfigError(
            "--bootstrap: the topology's broker is embedded in `kp-pipeline run`; name the "
            "cluster its replicas use"
        )
    bootstrap = args.bootstrap or topology.kafka.bootstrap_servers
    check_access(topology.kafka, bootstrap, str(args.topology))
    return topology, bootstrap


def run_status(args: argparse.Namespace) -> int:
    """Print each model's split and served versions, and what each replica does."""
    topology, bootstrap = _open(args)
    for line in status_lines(topology, ControlLog.read(topology, bootstrap)):
        print(line)
    return 0


def status_lines(topology: Topology, log: ControlLog) -> list[str]:
    """What ``versions status`` prints: the group's state, then each replica's."""
    out = [f"control topic {control_topic(topology)}"]
    for model in sorted(initial_splits(topology)):
        record = log.current(topology, model)
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(record.at_ms / 1000))
        source = (
            "the topology's own"
            if record.seq == 0
            else f"#{record.seq} {record.command} by {record.by} at {when} UTC"
        )
        out.append(f"{model}: {record.split.describe()}  ({source})")
        if record.served.loads or record.served.unloaded:
            versions = ", ".join(served_versions(topology, model, record.served))
            out.append(f"  serving versions {versions}: {record.served.describe()}")
        for name, state in sorted(log.replicas.items()):
            mine = state.get("models", {}).get(model)
            if mine is None:
                continue
            when = time.strftime("%H:%M:%S", time.gmtime(state.get("at_ms", 0) / 1000))
            line = (
                f"  replica {name} ({when} UTC): serving {', '.join(mine['serving'])}; "
                f"{mine['split']} (record #{mine['record']})"
            )
            out.append(line)
            for version in mine.get("loading", []):
                out.append(f"    loading v{version}")
            for version, why in mine.get("refused", {}).items():
                out.append(f"    refused v{version}: {why}")
            if mine.get("behind"):
                out.append(f"    not ready: {mine['behind']}")
    return out


def promote(version: str) -> Callable[[ControlRecord], Split]:
    """The change that makes ``version`` the default (and ends its canary or shadow)."""

    def change(now: ControlRecord) -> Split:
        kept = now.split.shadow if now.split.shadow and now.split.shadow[0] != version else None
        return Split(version, {v: s for v, s in now.split.canary.items() if v != version}, kept)

    return change


def canary(version: str, share: float) -> Callable[[ControlRecord], Split]:
    """The change that sends ``share`` of keys to ``version`` (0: ends its canary)."""

    def change(now: ControlRecord) -> Split:
        if version == now.split.default:
            raise ConfigError(f"--version: {version} is the default already")
        shares = {v: s for v, s in now.split.canary.items() if v != version}
        if share > 0:
            shares[version] = share
        return Split(now.split.default, shares, now.split.shadow)

    return change


def shadow(version: str, share: float) -> Callable[[ControlRecord], Split]:
    """The change that shadows the default with ``version`` for ``share`` of keys (0 ends)."""

    def change(now: ControlRecord) -> Split:
        return Split(now.split.default, now.split.canary, (version, share) if share else None)

    return change


def rollback(now: ControlRecord) -> Split:
    """The change back to the split the latest command replaced."""
    if now.previous is None:
        raise ConfigError(
            f"--model {now.model}: nothing to roll back to (the split is the topology's own)"
        )
    return now.previous


def load(
    topology: Topology,
    version: str,
    artifact: str | None,
    sha256: str | None = None,
    settings_of: str | None = None,
) -> Callable[[ControlRecord], Served]:
    """The change that serves ``version`` too: from ``artifact``, or the topology's own."""

    def change(now: ControlRecord) -> Served:
        served = now.served
        listed = [m.version for m in topology.models if m.name == now.model]
        if version in served_versions(topology, now.model, served):
            raise ConfigError(f"--version: {version} of {now.model!r} is served already")
        if version in listed:
            if artifact is not None:
                raise ConfigError(
                    f"--artifact: version {version} is the topology's own; leave --artifact "
                    "out to bring it back, or give the new artifact a version of its own"
                )
            kept = tuple(v for v in served.unloaded if v != version)
            return dataclasses.replace(served, unloaded=kept)
        if artifact is None:
            raise ConfigError(f"--artifact: version {version} is new: name its file")
        base = settings_of or (now.split.default if now.split.default in listed else listed[0])
        if sha256 is not None and Path(artifact).is_file():  # a typo is cheaper caught here
            from backends.artifacts import artifact_sha256

            if artifact_sha256(Path(artifact)) != sha256:
                raise ConfigError(f"--sha256: {artifact} here has another SHA-256")
        return Served({**served.loads, version: Load(artifact, base, sha256)}, served.unloaded)

    return change


def unload(topology: Topology, version: str) -> Callable[[ControlRecord], Served]:
    """The change that stops serving ``version`` (no split may send it requests)."""

    def change(now: ControlRecord) -> Served:
        served = now.served
        if version not in served_versions(topology, now.model, served):
            raise ConfigError(f"--version: {version} of {now.model!r} is not served")
        if version in served.loads:
            return Served({v: x for v, x in served.loads.items() if v != version}, served.unloaded)
        return Served(served.loads, (*served.unloaded, version))

    return change


def run_change(args: argparse.Namespace) -> int:
    """Promote, canary or roll back one model, and say what the group now serves."""
    topology, bootstrap = _open(args)
    which = args.versions_command
    change: Callable[[ControlRecord], Split | Served]
    if which == "promote":
        change, command = promote(args.version), f"promote {args.version}"
    elif which == "canary":
        change, command = canary(args.version, args.share), f"canary {args.version} {args.share:g}"
    elif which == "shadow":
        change, command = shadow(args.version, args.share), f"shadow {args.version} {args.share:g}"
    elif which == "load":
        change = load(topology, args.version, args.artifact, args.sha256, args.settings_of)
        command = f"load {args.version}" + (f" from {args.artifact}" if args.artifact else "")
    elif which == "unload":
        change, command = unload(topology, args.version), f"unload {args.version}"
    else:
        change, command = rollback, "rollback"
    record = send(topology, bootstrap, args.model, change, command)
    print(f"{args.model}: {record.split.describe()} (control record #{record.seq}: {command})")
    if which in ("load", "unload"):
        versions = ", ".join(served_versions(topology, args.model, record.served))
        print(f"  serving versions {versions}; see /readyz or kp_version_loads_total per replica")
    return 0
