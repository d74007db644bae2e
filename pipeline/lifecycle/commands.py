"""Control records: a model's traffic between its versions, as the control topic holds it.

The control topic (``topics.control``, by default ``<group_id>.control``) is compacted and
keyed by model name; each record's value is the model's whole desired split (`Split`), in
JSON, with who asked for it, when, and the split it replaced. The state of a model is the
last record of its key: exactly what compaction keeps, so a replica that starts after
the topic was compacted reaches the same state as one that read every record, and every
replica of a group converges whatever happens to the writers (last writer wins).

Conflicting commands are caught by the writer, not by the readers: each record carries
``seq`` (one more than the record it was based on) and the command reads its record back;
if another record for the model landed in between, it re-asserts that one (a new record
with the other command's split) and reports the conflict, so the group ends on the
command that landed first and the loser is told. A split that names a version a replica
does not serve is not applied there (`follower`).

A record also carries the versions the group serves beyond its topology's (`Served`): a
version loaded while serving (``kp-pipeline versions load``: an artifact, served with the
settings of one of the topology's versions) and the topology's versions unloaded since
(``versions unload``). Every replica loads, warms, attaches and retires versions to
match (`pipeline.lifecycle.hotload`); a split may name any version served this way.
"""

from __future__ import annotations

import getpass
import json
import socket
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.config.topology import Topology
from pipeline.config.versions import VersionTraffic
from pipeline.serving.versions import Traffic, traffic_of
from schemas.errors import ConfigError

__all__ = [
    "STATUS_PREFIX",
    "ControlRecord",
    "Load",
    "Served",
    "Split",
    "checked_served",
    "checked_split",
    "control_topic",
    "initial_splits",
    "served_versions",
]


STATUS_PREFIX = b"replica/"
"""Keys of the replicas' own state records (`pipeline.lifecycle.follower`), not commands."""


@dataclass(frozen=True)
class Split:
    """Which version takes the requests that name none: a default and canaries by share."""

    default: str
    canary: dict[str, float] = field(default_factory=dict)
    shadow: tuple[str, float] | None = None  # (version, share of the default's keys)

    def describe(self) -> str:
        """``v2 (default), v3 10%, shadow v4 50%``."""
        canaries = "".join(f", v{v} {s:.0%}" for v, s in self.canary.items())
        shadow = f", shadow v{self.shadow[0]} {self.shadow[1]:.0%}" if self.shadow else ""
        return f"v{self.default} (default){canaries}{shadow}"

    def versions(self) -> set[str]:
        """Every version the split sends requests to."""
        return {self.default, *self.canary, *([self.shadow[0]] if self.shadow else [])}

    def traffic(self, keys: Mapping[str, str], name: str) -> Traffic:
        """The serving side's `Traffic` for this split over the served ``keys``."""
        return Traffic(name, keys, self.default, tuple(self.canary.items()), self.shadow)


@dataclass(frozen=True)
class Load:
    """A version served from an artifact the topology does not list.

    ``settings_of``: the topology's version whose settings (stages, batching, instances,
    devices) it is served with; ``artifact`` is read by each replica, relative to its
    topology file's folder, and refused unless its SHA-256 is ``sha256`` when given.
    """

    artifact: str
    settings_of: str
    sha256: str | None = None


@dataclass(frozen=True)
class Served:
    """Versions served beyond the topology's (``loads``) and topology versions retired."""

    loads: dict[str, Load] = field(default_factory=dict)
    unloaded: tuple[str, ...] = ()

    def describe(self) -> str:
        """``loaded v3 (models/v3.onnx), unloaded v1`` (empty when neither)."""
        parts = [f"loaded v{v} ({load.artifact})" for v, load in self.loads.items()]
        parts += [f"unloaded v{v}" for v in self.unloaded]
        return ", ".join(parts)


@dataclass(frozen=True)
class ControlRecord:
    """One record of the control topic: a model's split, and where it came from."""

    model: str
    split: Split
    seq: int  # one more than the record this one was based on (0: the topology's own)
    command: str  # what was asked, for people: "promote 2", "canary 3 0.1", "rollback"
    previous: Split | None = None  # the split it replaced: what rollback goes back to
    by: str = ""
    at_ms: int = 0
    served: Served = field(default_factory=Served)

    def encode(self) -> bytes:
        """The record's value."""
        doc = asdict(self)
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, value: bytes) -> ControlRecord:
        """A record from its value; `ValueError` naming what is wrong."""
        try:
            doc = json.loads(value)
            split = _split(doc["split"])
            previous = _split(doc["previous"]) if doc.get("previous") else None
            return cls(
                model=str(doc["model"]),
                split=split,
                seq=int(doc["seq"]),
                command=str(doc.get("command", "")),
                previous=previous,
                by=str(doc.get("by", "")),
                at_ms=int(doc.get("at_ms", 0)),
                served=_served(doc.get("served") or {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a control record ({type(e).__name__}: {e})") from None

    @staticmethod
    def made(
        model: str,
        split: Split,
        based_on: ControlRecord,
        command: str,
        served: Served | None = None,
    ) -> ControlRecord:
        """The record a command writes over ``based_on``, signed with who and when.

        ``served``: the versions served beyond the topology's; by default ``based_on``'s.
        """
        by = f"{getpass.getuser()}@{socket.gethostname()}"
        return ControlRecord(
            model,
            split,
            based_on.seq + 1,
            command,
            based_on.split,
            by,
            int(time.time() * 1000),
            based_on.served if served is None else served,
        )


def _split(doc: Any) -> Split:
    canary = {str(v): float(s) for v, s in dict(doc.get("canary") or {}).items()}
    shadow = doc.get("shadow")
    return Split(
        str(doc["default"]), canary, (str(shadow[0]), float(shadow[1])) if shadow else None
    )


def _served(doc: Any) -> Served:
    loads = {
        str(v): Load(str(x["artifact"]), str(x["settings_of"]), x.get("sha256") or None)
        for v, x in dict(doc.get("loads") or {}).items()
    }
    return Served(loads, tuple(str(v) for v in doc.get("unloaded") or ()))


def served_versions(topology: Topology, model: str, served: Served) -> list[str]:
    """The versions of ``model`` the group serves: the topology's, less unloaded, plus loads."""
    listed = [m.version for m in topology.models if m.name == model]
    kept = [v for v in listed if v not in served.unloaded]
    return kept + [v for v in served.loads if v not in kept]


def control_topic(topology: Topology) -> str:
    """The group's control topic: ``topics.control``, else ``<group_id>.control``."""
    if topology.topics.control:
        return topology.topics.control
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in topology.kafka.group_id)
    return f"{safe}.control"


def initial_splits(topology: Topology) -> dict[str, ControlRecord]:
    """The topology's own split of each model, as the state before any control record."""
    served = [(m.name, m.version) for m in topology.models]
    out = {}
    for name, traffic in traffic_of(served, topology.versions).items():
        split = Split(traffic.default, dict(traffic.canary), traffic.shadow)
        out[name] = ControlRecord(name, split, 0, "topology")
    return out


def _known(topology: Topology, model: str, where: str) -> None:
    if not any(m.name == model for m in topology.models):
        names = ", ".join(sorted({m.name for m in topology.models}))
        raise ConfigError(f"{where}: no model {model!r} in this topology (serving {names})")


def checked_split(
    topology: Topology,
    model: str,
    split: Split,
    where: str = "the command",
    served: Served | None = None,
) -> Split:
    """``split`` if the group serves every version it names and its shares add up.

    ``served``: the versions served beyond the topology's (the model's latest record's).
    """
    _known(topology, model, where)
    versions = served_versions(topology, model, served or Served())
    missing = sorted(split.versions() - set(versions))
    if missing:
        raise ConfigError(
            f"{where}: model {model!r} version {', '.join(missing)} is not loaded (the group "
            f"serves {', '.join(versions)}): load it first (kp-pipeline versions load), or add "
            "it to the topology's models and roll the replicas out with it"
        )
    try:
        VersionTraffic(default=split.default, canary=split.canary)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    if split.default in split.canary:
        raise ConfigError(f"{where}: version {split.default!r} is the default and a canary")
    if split.shadow is not None:
        version, share = split.shadow
        if version == split.default:
            raise ConfigError(f"{where}: version {version!r} is the default and its shadow")
        if not 0 < share <= 1:
            raise ConfigError(f"{where}: shadow share {share:g} is not above 0 and at most 1")
    return split


def checked_served(
    topology: Topology, model: str, served: Served, split: Split, where: str = "the command"
) -> Served:
    """``served`` if it leaves every version of ``split`` served and loads what it can.

    A load must name a topology version to take settings from; a version may not be
    both the topology's (still served) and loaded; one version at least stays.
    """
    _known(topology, model, where)
    listed = [m.version for m in topology.models if m.name == model]
    for version, load in served.loads.items():
        if load.settings_of not in listed:
            raise ConfigError(
                f"{where}: --settings-of {load.settings_of!r} is not a version of {model!r} in "
                f"this topology (it lists {', '.join(listed)})"
            )
        if version in listed and version not in served.unloaded:
            raise ConfigError(f"{where}: version {version!r} of {model!r} is served already")
    unknown = sorted(set(served.unloaded) - set(listed))
    if unknown:
        raise ConfigError(f"{where}: version {', '.join(unknown)} is not in the topology")
    versions = served_versions(topology, model, served)
    still = sorted(split.versions() - set(versions))
    if still:
        raise ConfigError(
            f"{where}: version {', '.join(still)} of {model!r} takes traffic "
            f"({split.describe()}): promote another version or end its canary or shadow first"
        )
    return served
