"""The device scheduler's settings: ``scheduling`` and each model's ``scheduling``.

Its own module because the scheduler's rules (weights, tenants, per-device limits) are
its own; `pipeline.config.topology` re-exports both names. What they do:
`pipeline.serving.scheduler`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.devices import DEVICE_FORMS, parse_device
from schemas.errors import BackendError

__all__ = ["ModelScheduling", "SchedulingSettings"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ModelScheduling(_Strict):
    """How the device scheduler treats one model's batches (with ``scheduling.enabled``)."""

    priority: int = Field(
        0, ge=0, le=1000, description="Higher goes first when batches wait for a device."
    )
    weight: float = Field(
        1.0,
        gt=0,
        le=1_000_000,
        description="Share of the device among models of equal priority, by rows served.",
    )
    max_concurrent: int | None = Field(
        None, ge=1, le=1024, description="At most this many of its batches admitted at once."
    )


class SchedulingSettings(_Strict):
    """The device scheduler: which waiting batch a device takes next (scheduler.py)."""

    enabled: bool = Field(
        False, description="Off: each model sends its batches to its instances as they come."
    )
    concurrency: int = Field(
        2, ge=1, le=1024, description="Batches admitted to each device at once (preparing or "
        "running): 2 lets one be preprocessed while one runs.",
    )  # fmt: skip
    devices: dict[str, int] = Field(
        default_factory=dict, description="Concurrency of named devices (cpu, cuda:N)."
    )
    fair_share: Literal["model", "tenant"] = Field(
        "model",
        description="Who shares a device by weight among equal priorities: models (their "
        "weight) or tenants (a request's kp.tenant header or tenant parameter).",
    )
    tenants: dict[str, float] = Field(
        default_factory=dict, description="Tenants' weights, with fair_share: tenant."
    )
    default_tenant_weight: float = Field(
        1.0, gt=0, le=1_000_000, description="Weight of a tenant not listed, or of none."
    )

    @field_validator("tenants")
    @classmethod
    def _tenant_weights(cls, v: dict[str, float]) -> dict[str, float]:
        for tenant, weight in v.items():
            if not 0 < weight <= 1_000_000:
                raise ValueError(f"{tenant}: weight {weight} is not above 0 and at most 1000000")
        return v

    @model_validator(mode="after")
    def _tenants_need_tenant_shares(self) -> SchedulingSettings:
        if self.tenants and self.fair_share != "tenant":
            raise ValueError("tenants are weighed only with fair_share: tenant")
        return self

    @field_validator("devices")
    @classmethod
    def _device_limits(cls, v: dict[str, int]) -> dict[str, int]:
        for device, limit in v.items():
            try:
                parse_device(device)
            except BackendError:
                raise ValueError(f"{device!r} is not a device: {DEVICE_FORMS}") from None
            if not 1 <= limit <= 1024:
                raise ValueError(f"{device}: concurrency {limit} is not between 1 and 1024")
        return v

    def concurrency_of(self, device: str) -> int:
        """Batches a device admits at once."""
        return self.devices.get(device, self.concurrency)
