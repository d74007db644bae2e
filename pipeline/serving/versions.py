"""Which version of a model a request meets: asked for, the default, or a canary by key.

A model served in several versions (`pipeline.config.versions`) is several served models
inside the pipeline, each with its own batchers, instances and metrics, under the key
``name@version`` (`version_key`); a model served in one version keeps its plain name, so
nothing changes for topologies that never list a second version.

A request naming ``model_version`` meets that version. One naming none meets a canary
for the share of keys the canary's weight gives it, else the default. The share is taken
by hashing the record key (salted with the model's name, so two models' canaries do not
pick the same keys): every replica, restart and retry sends one key to the same version,
which a canary must do to be judged per user or per account. A record without a key is
split by its request id instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.config.versions import VersionTraffic, default_version

__all__ = ["Traffic", "describe_versions", "split_point", "traffic_of", "version_key"]

_SCALE = float(2**64)


def version_key(name: str, version: str, versions_served: int) -> str:
    """The key the pipeline serves a model version under: its name when it is the only one."""
    return name if versions_served == 1 else f"{name}@{version}"


def split_point(model: str, key: bytes) -> float:
    """Where ``key`` falls in [0, 1) for ``model``'s split: the same on every replica."""
    digest = hashlib.blake2b(key, digest_size=8, salt=model.encode()[:16]).digest()
    return int.from_bytes(digest, "big") / _SCALE


@dataclass(frozen=True)
class Traffic:
    """One model's versions and how requests naming none are shared between them."""

    name: str
    keys: Mapping[str, str]  # version -> the served key
    default: str
    canary: tuple[tuple[str, float], ...] = ()  # (version, share), in the topology's order
    shadow: tuple[str, float] | None = None  # (version, share of keys) seeing the default's

    def shadows(self, key: bytes) -> str | None:
        """The shadow's served key when a request of ``key`` meeting the default is copied.

        Salted apart from the canary split, so the shadowed keys are not the canary's.
        """
        if self.shadow is None:
            return None
        version, share = self.shadow
        if share < 1.0 and split_point(f"{self.name}#shadow", key) >= share:
            return None
        return self.keys[version]

    def pick(self, key: bytes) -> str:
        """The version a request naming none meets, by its record key (or request id)."""
        if self.canary:
            point = split_point(self.name, key)
            edge = 0.0
            for version, share in self.canary:
                edge += share
                if point < edge:
                    return version
        return self.default

    def shares(self) -> dict[str, float]:
        """Each version's share of the requests that name none (0 for the others)."""
        out = dict.fromkeys(self.keys, 0.0)
        for version, share in self.canary:
            out[version] = share
        out[self.default] = max(0.0, 1.0 - sum(s for _, s in self.canary))
        return out


def traffic_of(
    served: Sequence[tuple[str, str]], versions: Mapping[str, VersionTraffic]
) -> dict[str, Traffic]:
    """Per model name, its `Traffic`, from the served ``(name, version)`` pairs."""
    by_name: dict[str, list[str]] = {}
    for name, version in served:
        by_name.setdefault(name, []).append(version)
    out = {}
    for name, listed in by_name.items():
        wanted = versions.get(name)
        keys = {v: version_key(name, v, len(listed)) for v in listed}
        canary = tuple(wanted.canary.items()) if wanted is not None else ()
        shadow = None
        if wanted is not None and wanted.shadow is not None:
            shadow = (wanted.shadow.version, wanted.shadow.share)
        out[name] = Traffic(name, keys, default_version(name, listed, wanted), canary, shadow)
    return out


def describe_versions(models: Sequence[Any], versions: Mapping[str, VersionTraffic]) -> list[str]:
    """For people (``validate``): each model served in several versions, and its split."""
    out = []
    for name, traffic in traffic_of([(m.name, m.version) for m in models], versions).items():
        if len(traffic.keys) > 1:
            shares = ", ".join(
                f"v{v} {share:.0%}{' (default)' if v == traffic.default else ''}"
                for v, share in traffic.shares().items()
            )
            out.append(f"versions of {name}, for requests naming none (by record key): {shares}")
            if traffic.shadow is not None:
                v, share = traffic.shadow
                out.append(f"  shadow: v{v} sees {share:.0%} of the default's keys, compared")
    return out
