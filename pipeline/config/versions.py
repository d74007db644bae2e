"""Several versions of one model: ``versions.<model>`` says which takes which requests.

A topology may list one model name several times, each with its own ``version`` (its own
artifact, instances, devices). A request that names ``model_version`` meets that version;
one that names none meets the model's ``default``, or a ``canary`` version for the share
of record keys its weight gives it. What serving does with this: `pipeline.serving.versions`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["ShadowSettings", "VersionTraffic", "check_versions"]


class ShadowSettings(BaseModel):
    """A candidate version that sees the default's requests without answering them."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    version: str = Field(description="The candidate; its answers are compared, not published.")
    share: float = Field(
        1.0, gt=0, le=1, description="Share of record keys whose requests are shadowed."
    )


class VersionTraffic(BaseModel):
    """One model's traffic between its versions (``versions.<model>``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    default: str | None = Field(
        None,
        description="The version that takes requests naming none (required where a model "
        "is served in several versions).",
    )
    canary: dict[str, float] = Field(
        default_factory=dict,
        description="version: share of record keys (0 < share <= 1, all together at most 1) "
        "sent to it instead of the default; one key always meets the same version.",
    )
    shadow: ShadowSettings | None = Field(
        None,
        description="A version that also serves (a key-hash share of) the requests the "
        "default serves; its answers go to the comparison topic, never to the output.",
    )
    tolerance: float = Field(
        1e-4, ge=0, description="Largest absolute difference of two float outputs still 'same'."
    )

    @field_validator("canary")
    @classmethod
    def _shares(cls, v: dict[str, float]) -> dict[str, float]:
        for version, share in v.items():
            if not 0 < share <= 1:
                raise ValueError(f"{version}: share {share} is not above 0 and at most 1")
        if sum(v.values()) > 1 + 1e-9:
            raise ValueError(f"the shares add up to {sum(v.values()):g}, more than 1")
        return v


class _Served(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...


def check_versions(models: Sequence[_Served], versions: Mapping[str, VersionTraffic]) -> None:
    """Raise ``ValueError`` naming the field where models and their traffic disagree."""
    served: dict[str, list[str]] = {}
    for i, m in enumerate(models):
        listed = served.setdefault(m.name, [])
        if m.version in listed:
            raise ValueError(
                f"models[{i}]: model {m.name!r} version {m.version!r} appears twice "
                "(a name may repeat only with another version)"
            )
        listed.append(m.version)
    for name, traffic in versions.items():
        if name not in served:
            raise ValueError(f"versions.{name}: no model {name!r} is served")
        known = ", ".join(served[name])
        if traffic.default is not None and traffic.default not in served[name]:
            raise ValueError(
                f"versions.{name}.default: version {traffic.default!r} is not served "
                f"(serving {known})"
            )
        for version in traffic.canary:
            if version not in served[name]:
                raise ValueError(
                    f"versions.{name}.canary: version {version!r} is not served (serving {known})"
                )
            if version == default_version(name, served[name], traffic):
                raise ValueError(f"versions.{name}.canary: {version!r} is the default already")
        if traffic.shadow is not None:
            shadow = traffic.shadow.version
            if shadow not in served[name]:
                raise ValueError(
                    f"versions.{name}.shadow.version: version {shadow!r} is not served "
                    f"(serving {known})"
                )
            if shadow == default_version(name, served[name], traffic):
                raise ValueError(
                    f"versions.{name}.shadow.version: {shadow!r} is the default: a shadow is "
                    "compared with the default"
                )
    for name, listed in served.items():
        if len(listed) > 1 and (name not in versions or versions[name].default is None):
            raise ValueError(
                f"versions.{name}.default: model {name!r} is served in versions "
                f"{', '.join(listed)}: say which takes requests that name none"
            )


def default_version(name: str, served: Sequence[str], traffic: VersionTraffic | None) -> str:
    """The version requests naming none meet (a single version is its own default)."""
    if traffic is not None and traffic.default is not None:
        return traffic.default
    return served[0]
