"""The backend contract: load a model on a device, run a batch, unload.

Tensors cross as NumPy arrays on the CPU path, keyed by the model's own input and output
names, with the batch as the first dimension. ``load`` returns the model's signature so
the graph can be checked against it before anything is consumed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from pipeline.tensors import TensorSpec

__all__ = ["Backend", "ModelInfo", "ModelSpec", "TensorBatch"]

TensorBatch = Mapping[str, np.ndarray[Any, Any]]


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What to load: the model's name, its file, and the backend's own options."""

    name: str
    artifact: Path
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A loaded model's signature; shapes are per row (the batch dimension removed).

    ``max_batch_size`` is the largest batch the model accepts, or ``None`` when the batch
    dimension is free.
    """

    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    max_batch_size: int | None = None
    device: str = "cpu"


@runtime_checkable
class Backend(Protocol):
    """A native runtime serving one model instance."""

    def load(self, spec: ModelSpec, device: str) -> ModelInfo:
        """Load the model on ``device`` ('cpu', 'cuda:N'); raise `BackendError` if it can't."""
        ...

    def infer(self, batch: TensorBatch) -> dict[str, np.ndarray[Any, Any]]:
        """Run one batch; every output has the batch's first dimension."""
        ...

    def unload(self) -> None:
        """Free the session and its device memory."""
        ...
