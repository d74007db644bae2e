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

__all__ = ["ControlRecord", "Split", "checked_split", "control_topic", "initial_splits"]


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
class ControlRecord:
    """One record of the control topic: a model's split, and where it came from."""

    model: str
    split: Split
    seq: int  # one more than the record this one was based on (0: the topology's own)
    command: str  # what was asked, for people: "promote 2", "canary 3 0.1", "rollback"
    previous: Split | None = None  # the split it replaced: what rollback goes back to
    by: str = ""
    at_ms: int = 0

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
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a control record ({type(e).__name__}: {e})") from None

    @staticmethod
    def made(model: str, split: Split, based_on: ControlRecord, command: str) -> ControlRecord:
        """The record a command writes over ``based_on``, signed with who and when."""
        by = f"{getpass.getuser()}@{socket.gethostname()}"
        return ControlRecord(
            model, split, based_on.seq + 1, command, based_on.split, by, int(time.time() * 1000)
        )


def _split(doc: Any) -> Split:
    canary = {str(v): float(s) for v, s in dict(doc.get("canary") or {}).items()}
    shadow = doc.get("shadow")
    return Split(
        str(doc["default"]), canary, (str(shadow[0]), float(shadow[1])) if shadow else None
    )


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


def checked_split(
    topology: Topology, model: str, split: Split, where: str = "the command"
) -> Split:
    """``split`` if the topology serves every version it names and its shares add up."""
    served = [m.version for m in topology.models if m.name == model]
    if not served:
        names = ", ".join(sorted({m.name for m in topology.models}))
        raise ConfigError(f"{where}: no model {model!r} in this topology (serving {names})")
    missing = sorted(split.versions() - set(served))
    if missing:
        raise ConfigError(
            f"{where}: model {model!r} version {', '.join(missing)} is not loaded by this "
            f"topology (it serves {', '.join(served)}): add it to models, roll the replicas "
            "out with it, then send the command"
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
