"""Backends that take known time: tests and benchmarks of ordering and scheduling.

Both echo ``x`` (FP32[4]) as ``y``:

- `UnevenBackend`: the first instance loaded for an artifact sleeps ``delay_ms`` (its
  options) per batch, the others answer at once. With two instances, batches that went
  to the fast one are published before an earlier batch on the slow one: the setting
  `ordering` exists for.
- `OneDeviceBackend`: every instance of every model shares one lock, held ``delay_ms``
  per batch: a device that runs one batch at a time, as a GPU runs one kernel. Models
  that share it contend for it the way they would for a real device: what the device
  scheduler arbitrates.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from backends.base import ModelInfo
from schemas.tensors import TensorSpec

_loaded: dict[str, int] = {}
_lock = threading.Lock()


class UnevenBackend:
    """Echoes FP32[4]; slow on the first instance of each artifact."""

    def __init__(self) -> None:
        self.delay_s = 0.0

    def load(self, spec: Any, device: str) -> ModelInfo:
        """The signature; the first instance of an artifact takes ``delay_ms`` per batch."""
        with _lock:
            n = _loaded[str(spec.artifact)] = _loaded.get(str(spec.artifact), 0) + 1
        if n == 1:
            self.delay_s = float(spec.options.get("delay_ms", 40)) / 1000.0
        return ModelInfo({"x": TensorSpec("FP32", (4,))}, {"y": TensorSpec("FP32", (4,))})

    def infer(self, batch: Any) -> dict[str, np.ndarray[Any, Any]]:
        """``y = x``, after this instance's delay."""
        if self.delay_s:
            time.sleep(self.delay_s)
        return {"y": np.asarray(batch["x"], dtype=np.float32).copy()}

    def unload(self) -> None:
        """Nothing to free."""


_device = threading.Lock()


class OneDeviceBackend:
    """Echoes FP32[4]; each batch holds the one shared "device" for ``delay_ms``."""

    def __init__(self) -> None:
        self.delay_s = 0.0

    def load(self, spec: Any, device: str) -> ModelInfo:
        """The signature; each batch will hold the device ``delay_ms``."""
        self.delay_s = float(spec.options.get("delay_ms", 40)) / 1000.0
        return ModelInfo({"x": TensorSpec("FP32", (4,))}, {"y": TensorSpec("FP32", (4,))})

    def infer(self, batch: Any) -> dict[str, np.ndarray[Any, Any]]:
        """``y = x``, after holding the shared device for the delay."""
        with _device:
            time.sleep(self.delay_s)
        return {"y": np.asarray(batch["x"], dtype=np.float32).copy()}

    def unload(self) -> None:
        """Nothing to free."""
