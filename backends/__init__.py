"""One module per native runtime; the contract is in `backends.base`."""

from __future__ import annotations

from backends.base import Backend, ModelInfo, ModelSpec, Probe, TensorBatch

__all__ = ["Backend", "ModelInfo", "ModelSpec", "Probe", "TensorBatch"]
