"""ONNX Runtime: CPU everywhere, the CUDA execution provider where onnxruntime-gpu has it.

Options (the model's ``options`` section in topology.yaml):

- ``intra_op_threads``: threads inside one operator (0 = ONNX Runtime decides).
- ``inter_op_threads``: threads across independent operators (0 = decides).
- ``graph_optimization``: ``disable`` | ``basic`` | ``extended`` | ``all``.

On ``cuda:N`` the session asks for ``CUDAExecutionProvider`` on device N and falls back
to the CPU provider (with a warning) when the installed onnxruntime lacks it. The CUDA
provider path has not been run on this project's machines (no GPU onnxruntime there).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from backends.base import ModelInfo, ModelSpec, TensorBatch
from pipeline.errors import BackendError
from pipeline.tensors import TensorSpec

__all__ = ["OnnxRuntimeBackend", "OnnxRuntimeOptions"]

log = logging.getLogger(__name__)

_ORT_TYPES = {
    "tensor(float)": "FP32",
    "tensor(float16)": "FP16",
    "tensor(double)": "FP64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(bool)": "BOOL",
    "tensor(string)": "BYTES",
}


class OnnxRuntimeOptions(BaseModel):
    """The backend's own section of a model's settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    intra_op_threads: int = 0
    inter_op_threads: int = 0
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"


class OnnxRuntimeBackend:
    """One ``InferenceSession``: one model instance."""

    def __init__(self) -> None:
        self._session: Any = None
        self._outputs: list[str] = []

    def load(self, spec: ModelSpec, device: str) -> ModelInfo:
        """Create the session and read the signature from the graph."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError(
                "onnxruntime is not installed: pip install 'kp-pipeline[cpu]' "
                "(or 'kp-pipeline[gpu]' for onnxruntime-gpu; never both)"
            ) from None

        try:
            opts = OnnxRuntimeOptions.model_validate(dict(spec.options))
        except ValidationError as e:
            raise BackendError(f"model {spec.name!r}: onnxruntime options: {e}") from None
        if not spec.artifact.is_file():
            raise BackendError(f"model {spec.name!r}: no model file at {spec.artifact}")
        so = ort.SessionOptions()
        so.intra_op_num_threads = opts.intra_op_threads
        so.inter_op_num_threads = opts.inter_op_threads
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[opts.graph_optimization]
        providers: list[Any] = ["CPUExecutionProvider"]
        placed = "cpu"
        if device.startswith("cuda") or device == "auto":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                dev_id = int(device.partition(":")[2] or 0)
                providers = [("CUDAExecutionProvider", {"device_id": dev_id}), *providers]
                placed = f"cuda:{dev_id}"
            elif device != "auto":
                log.warning("model %s: no CUDA provider in onnxruntime; running on CPU", spec.name)
        try:
            self._session = ort.InferenceSession(str(spec.artifact), so, providers=providers)
        except Exception as e:
            raise BackendError(
                f"model {spec.name!r}: {spec.artifact} is not a loadable ONNX model: {e}"
            ) from None
        inputs = {i.name: _spec(i) for i in self._session.get_inputs()}
        outputs = {o.name: _spec(o) for o in self._session.get_outputs()}
        self._outputs = list(outputs)
        batch_dims = {i.shape[0] for i in self._session.get_inputs() if i.shape}
        fixed = [d for d in batch_dims if isinstance(d, int)]
        return ModelInfo(inputs, outputs, min(fixed) if fixed else None, placed)

    def infer(self, batch: TensorBatch) -> dict[str, np.ndarray[Any, Any]]:
        """Run the session on one batch."""
        if self._session is None:
            raise BackendError("infer() before load()")
        results = self._session.run(self._outputs, dict(batch))
        return dict(zip(self._outputs, results, strict=True))

    def unload(self) -> None:
        """Drop the session."""
        self._session = None


def _spec(node: Any) -> TensorSpec:
    datatype = _ORT_TYPES.get(node.type)
    if datatype is None:
        raise BackendError(f"{node.name}: unsupported ONNX type {node.type}")
    dims = [d if isinstance(d, int) and d > 0 else None for d in node.shape]
    return TensorSpec(datatype, tuple(dims[1:]))
