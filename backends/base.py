"""The backend contract: load a model on a device, run a batch, unload.

Every native runtime (ONNX Runtime, PyTorch, TensorFlow, TensorRT) is one class with the
same three methods. ``load`` returns the model's signature (`ModelInfo`) so the graph is
checked against it before anything is consumed.

Tensors cross keyed by the model's own input and output names, batch first:

- inputs are NumPy arrays on the CPU path, or device arrays that speak DLPack
  (``__dlpack__``: CuPy, PyTorch CUDA tensors) when preprocessing ran on the GPU; a
  backend takes either, without a host round trip for the second;
- outputs are host NumPy arrays (results go to Kafka from the host). An output may be a
  view of a buffer the instance reuses: it is valid until the instance's next ``infer``,
  which is after the runtime has postprocessed and encoded it. A GPU backend may also
  offer ``submit(batch)``, returning a ``collect()`` that gives the outputs: the runtime
  then queues the next batch before collecting this one (`backends.streams`), and an
  output stays valid until the batch after the next is submitted.

An instance is used by one thread at a time; the model runtime runs one thread per
instance. A backend class may also offer ``probe()`` (a classmethod returning `Probe`)
so ``kp-pipeline backends`` can say whether it is usable on this machine, and why not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from schemas.tensors import TensorSpec

__all__ = ["Backend", "ModelInfo", "ModelSpec", "Probe", "TensorBatch"]

TensorBatch = Mapping[str, Any]
"""Input name → batch-first array: NumPy on the host, or a DLPack-capable device array."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What to load: the model's name, its file, and the backend's own options."""

    name: str
    artifact: Path
    options: Mapping[str, Any] = field(default_factory=dict)
    # The topology trusts the file to run code while it loads (pickles): see trust_artifact.
    trust_artifact: bool = False


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A loaded model's signature; shapes are per row (the batch dimension removed).

    ``max_batch_size`` is the largest batch the model accepts, or ``None`` when the batch
    dimension is free. ``device`` is where the instance actually runs ('cpu', 'cuda:0').
    ``profiles`` holds, for engines built with optimization profiles (TensorRT), each
    profile's (min, opt, max) shape per input, batch dimension included.
    """

    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    max_batch_size: int | None = None
    device: str = "cpu"
    profiles: tuple[dict[str, tuple[tuple[int, ...], ...]], ...] = ()
    # A tabular model's feature names, in its own order (`backends.tabular`); empty else.
    feature_names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Probe:
    """Whether a backend can run on this machine: ``detail`` says with what, or why not."""

    usable: bool
    detail: str


@runtime_checkable
class Backend(Protocol):
    """A native runtime serving one model instance.

    A backend on a GPU may also expose ``preprocess_stream`` and ``gpu`` (a
    `backends.streams.GpuPipeline`; `backends.devices.StreamOwner` gives both): the graph
    sets up this instance's preprocessing stages on that stream, the runtime records each
    batch's ``ready`` event there and hands it to ``gpu`` before ``infer``, whose
    inference stream waits on it. A backend with only ``stream`` (a plugin) has its
    preprocessing queued on that one stream, in order, without overlap.
    """

    def load(self, spec: ModelSpec, device: str) -> ModelInfo:
        """Load the model on ``device`` ('cpu', 'cuda:N', 'auto'); raise `BackendError`."""
        ...

    def infer(self, batch: TensorBatch) -> dict[str, np.ndarray[Any, Any]]:
        """Run one batch; every output has the batch's first dimension."""
        ...

    def unload(self) -> None:
        """Free the session and its device memory."""
        ...
