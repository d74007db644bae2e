"""A backend from outside kp-pipeline: ``y = factor * x``, the factor read from the artifact.

It depends on nothing from kp-pipeline at import time and only follows the contract
(load / infer / unload, plus an optional probe), which is the point of the test that
installs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ScaleBackend"]


class ScaleBackend:
    """Multiplies input ``x`` (FP32[n]) by the number written in the artifact file."""

    def __init__(self) -> None:
        self.factor: float | None = None

    @classmethod
    def probe(cls) -> Any:
        from backends.base import Probe

        return Probe(True, "kp-scale-backend 0.1.0 (test plugin)")

    def load(self, spec: Any, device: str) -> Any:
        from backends.base import ModelInfo
        from schemas.errors import BackendError
        from schemas.tensors import TensorSpec

        if device not in ("cpu", "auto"):
            raise BackendError(f"scale runs on the CPU only, not {device}")
        self.factor = float(Path(spec.artifact).read_text().strip())
        width = int(spec.options.get("width", 4))
        return ModelInfo({"x": TensorSpec("FP32", (width,))}, {"y": TensorSpec("FP32", (width,))})

    def infer(self, batch: Any) -> dict[str, np.ndarray[Any, Any]]:
        assert self.factor is not None
        return {"y": (np.asarray(batch["x"]) * self.factor).astype(np.float32)}

    def unload(self) -> None:
        self.factor = None
