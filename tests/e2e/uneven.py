"""A backend whose instances finish batches out of order: the first one loaded is slow.

``y = x``; the first instance loaded for an artifact sleeps ``delay_ms`` (from the
backend's options) per batch, the others answer at once. With two instances, batches
that went to the fast one are published before an earlier batch on the slow one: the
setting `ordering` exists for.
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
        with _lock:
            n = _loaded[str(spec.artifact)] = _loaded.get(str(spec.artifact), 0) + 1
        if n == 1:
            self.delay_s = float(spec.options.get("delay_ms", 40)) / 1000.0
        return ModelInfo({"x": TensorSpec("FP32", (4,))}, {"y": TensorSpec("FP32", (4,))})

    def infer(self, batch: Any) -> dict[str, np.ndarray[Any, Any]]:
        if self.delay_s:
            time.sleep(self.delay_s)
        return {"y": np.asarray(batch["x"], dtype=np.float32).copy()}

    def unload(self) -> None:
        """Nothing to free."""
