"""ONNX Runtime: the CPU provider everywhere; CUDA and TensorRT providers on GPUs.

Options (the model's ``options`` section in topology.yaml):

- ``intra_op_threads``: threads inside one operator (0 = ONNX Runtime decides).
- ``inter_op_threads``: threads across independent operators (0 = decides).
- ``graph_optimization``: ``disable`` | ``basic`` | ``extended`` | ``all``.
- ``tensorrt``: on a GPU, put ONNX Runtime's TensorRT execution provider before the CUDA
  one (it compiles the supported subgraphs into engines on first use; the rest runs on
  CUDA). ``tensorrt_fp16`` lets those engines use half precision;
  ``tensorrt_cache_dir`` keeps built engines on disk between starts.

Providers follow the device: ``cpu`` → CPU; ``cuda:N`` → [TensorRT,] CUDA on device N,
then CPU for operators the GPU providers lack; ``auto`` → CUDA when this onnxruntime
build has it, else CPU. Asking for ``cuda`` from a build without the CUDA provider (the
``onnxruntime`` wheel rather than ``onnxruntime-gpu``) is refused at start, and so is a
session that ONNX Runtime built without a provider that was asked for (it does that,
logging rather than raising, when the CUDA provider's libraries do not load): the error
names what was asked, what was built, and the loader's reason when it can be had.
ONNX Runtime's Python fallback to the CPU is turned off, at start and per batch.

On a GPU each instance owns two CUDA streams (made for it with CuPy or PyTorch, whichever
is installed: `backends.devices.InstanceStream`) and keeps the ordering rules of
`backends.streams`: the instance's GPU preprocessing runs on the preprocess stream; ONNX
Runtime computes, and copies host inputs, on the inference stream
(``user_compute_stream``, ``do_copy_in_default_stream``), which first waits on the batch's
``ready`` event; the host waits once, on the ``done`` event recorded after the run, then
ONNX Runtime copies the outputs out (``copy_outputs_to_cpu``: a synchronous copy, the only
one its Python API offers). Tensors are bound with I/O binding: host inputs as they are
(from pageable memory: ONNX Runtime copies them itself), device arrays from GPU
preprocessing (anything exposing ``__cuda_array_interface__``: CuPy, PyTorch) by pointer,
without a host round trip. ``user_compute_stream`` and I/O binding were checked against
ONNX Runtime's documentation only.
IOBinding's ``synchronize_inputs``/``synchronize_outputs`` are not used: they
synchronize the whole device, so every instance would wait for every other. (Without
CuPy or PyTorch there is no stream of our own, and they are the only way left.)
On the CPU, NumPy arrays are passed to ``run`` and read in place. The GPU paths are
written against ONNX Runtime's documented Python API (IOBinding, CUDA and TensorRT
provider options) and have not run on the project's machines: no GPU onnxruntime and
no GPU there.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np

from backends.base import ModelInfo, ModelSpec, Probe, TensorBatch
from backends.devices import StreamOwner, resolve_device
from backends.options import StrictOptions, parse_options
from schemas.devices import gpu_extra, is_device_array
from schemas.errors import BackendError
from schemas.tensors import TensorSpec, numpy_dtype

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


class OnnxRuntimeOptions(StrictOptions):
    """The backend's own section of a model's settings."""

    intra_op_threads: int = 0
    inter_op_threads: int = 0
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    tensorrt: bool = False
    tensorrt_fp16: bool = False
    tensorrt_cache_dir: str | None = None


class OnnxRuntimeBackend(StreamOwner):
    """One ``InferenceSession``: one model instance."""

    Options = OnnxRuntimeOptions  # the model's ``options`` section (docs, ``kp-pipeline schema``)

    def __init__(self) -> None:
        self._session: Any = None
        self._outputs: list[str] = []
        self._input_types: dict[str, Any] = {}
        self._gpu: int | None = None
        self._stream: Any = None

    @classmethod
    def probe(cls) -> Probe:
        """Usable wherever onnxruntime imports; lists its execution providers."""
        try:
            import onnxruntime as ort
        except ImportError as e:
            return Probe(
                False,
                f"onnxruntime does not import ({e}): pip install 'kp-pipeline[cpu]', "
                f"or {gpu_extra()} for onnxruntime-gpu (never both)",
            )
        providers = ", ".join(ort.get_available_providers())
        return Probe(True, f"onnxruntime {ort.__version__}; providers: {providers}")

    def load(self, spec: ModelSpec, device: str) -> ModelInfo:
        """Create the session on the device's providers and read the signature."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError(
                "onnxruntime is not installed: pip install 'kp-pipeline[cpu]' "
                f"(or {gpu_extra()} for onnxruntime-gpu; never both)"
            ) from None
        opts = parse_options(OnnxRuntimeOptions, spec, "onnxruntime")
        if not spec.artifact.is_file():
            raise BackendError(f"no model file at {spec.artifact}")
        available = ort.get_available_providers()
        has_cuda = "CUDAExecutionProvider" in available
        placed = resolve_device(device, None if has_cuda else 0, "onnxruntime (no CUDA provider)")
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
        if placed != "cpu":
            self._gpu = int(placed.partition(":")[2] or 0)
            providers = self._gpu_providers(opts, available) + providers
        asked = [p[0] if isinstance(p, tuple) else p for p in providers]
        try:
            # No fallback: ONNX Runtime's Python API would otherwise answer a provider that
            # fails to start by building a CPU session (printing why on stdout), and
            # switch a running session to the CPU when a provider fails a batch.
            self._session = ort.InferenceSession(
                str(spec.artifact), so, providers=providers, enable_fallback=0
            )
        except Exception as e:
            self.unload()
            if placed == "cpu":
                raise BackendError(f"{spec.artifact} is not a loadable ONNX model: {e}") from None
            raise BackendError(
                f"{spec.artifact}: ONNX Runtime built no session on {asked} ({placed}): {e}"
            ) from None
        built = list(self._session.get_providers())
        missing = [p for p in asked if p not in built]
        if missing:
            self.unload()
            why = [_provider_load_error(ort, p) for p in missing]
            raise BackendError(
                f"device {placed!r}: asked ONNX Runtime for {asked}, it built the session on "
                f"{built}: {', '.join(missing)} did not start ("
                + ("; ".join(w for w in why if w) or "ONNX Runtime logged why on stderr")
                + ")"
            )
        inputs = {i.name: _spec(i) for i in self._session.get_inputs()}
        outputs = {o.name: _spec(o) for o in self._session.get_outputs()}
        self._outputs = list(outputs)
        self._input_types = {k: numpy_dtype(v.datatype) for k, v in inputs.items()}
        batch_dims = {i.shape[0] for i in self._session.get_inputs() if i.shape}
        fixed = [d for d in batch_dims if isinstance(d, int)]
        return ModelInfo(inputs, outputs, min(fixed) if fixed else None, placed)

    def _gpu_providers(self, opts: OnnxRuntimeOptions, available: list[str]) -> list[Any]:
        """CUDA (and TensorRT first, when asked) on this instance's device and stream."""
        common: dict[str, Any] = {"device_id": self._gpu}
        cuda: dict[str, Any] = {}
        if self._open_stream(self._gpu or 0) is not None:
            common["user_compute_stream"] = str(self._stream.cuda_stream)
            # Copies of host inputs on the compute stream (ONNX Runtime's default, relied on).
            cuda["do_copy_in_default_stream"] = True
        providers: list[Any] = [("CUDAExecutionProvider", {**common, **cuda})]
        if opts.tensorrt:
            if "TensorrtExecutionProvider" not in available:
                raise BackendError(
                    "options.tensorrt: this onnxruntime build has no TensorRT execution provider"
                )
            trt: dict[str, Any] = {**common, "trt_fp16_enable": opts.tensorrt_fp16}
            if opts.tensorrt_cache_dir:
                trt |= {
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": opts.tensorrt_cache_dir,
                }
            providers.insert(0, ("TensorrtExecutionProvider", trt))
        return providers

    def infer(self, batch: TensorBatch) -> dict[str, np.ndarray[Any, Any]]:
        """Run the session on one batch (through I/O binding on a GPU)."""
        if self._session is None:
            raise BackendError("infer() before load()")
        if self._gpu is None:
            results = self._session.run(self._outputs, dict(batch))
            return dict(zip(self._outputs, results, strict=True))
        return self._run_bound(batch)

    def _run_bound(self, batch: TensorBatch) -> dict[str, np.ndarray[Any, Any]]:
        binding = self._session.io_binding()
        for name, x in batch.items():
            if is_device_array(x) and hasattr(x, "__cuda_array_interface__"):
                cai = x.__cuda_array_interface__
                if cai.get("strides") is not None:
                    raise BackendError(f"input {name!r}: a device array must be C-contiguous")
                binding.bind_input(
                    name=name,
                    device_type="cuda",
                    device_id=self._gpu,
                    element_type=self._input_types[name],
                    shape=tuple(cai["shape"]),
                    buffer_ptr=cai["data"][0],
                )
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(x))
        for name in self._outputs:
            binding.bind_output(name, "cuda", self._gpu)
        if self._pipeline is None:
            # No stream of our own to wait on: IOBinding's synchronize_* are all there is,
            # and they synchronize the whole device (the CUDA provider's Sync).
            binding.synchronize_inputs()
            self._session.run_with_iobinding(binding)
            binding.synchronize_outputs()
        else:
            # The inference stream (ONNX Runtime's compute stream) waits on the batch's
            # `ready` event, so the run reads device inputs after the preprocess stream
            # wrote them; the host waits once, on `done` after the run.
            with self._pipeline.batch():
                self._session.run_with_iobinding(binding)
        # A synchronous copy of ONNX Runtime's own: its Python API has no asynchronous
        # copy into memory of ours. After the wait on `done` it waits for nothing more.
        return dict(zip(self._outputs, binding.copy_outputs_to_cpu(), strict=True))

    def unload(self) -> None:
        """Drop the session (and its stream)."""
        self._session = None
        self._close_stream()


_PROVIDER_LIBRARIES = {
    "CUDAExecutionProvider": "libonnxruntime_providers_cuda.so",
    "TensorrtExecutionProvider": "libonnxruntime_providers_tensorrt.so",
}


def _provider_load_error(ort: Any, provider: str) -> str | None:
    """Why a provider's shared library does not load here, in the dynamic loader's words.

    When a GPU provider's library cannot load (a missing libcudnn or libcublasLt, most
    often), ONNX Runtime logs the loader's error on stderr and builds the session
    without that provider; loading the library again is how to get those words back.
    """
    library = _PROVIDER_LIBRARIES.get(provider)
    where = getattr(ort, "__file__", None)
    if library is None or where is None or not sys.platform.startswith("linux"):
        return None
    path = Path(where).parent / "capi" / library
    if not path.is_file():
        return f"{library} is not in this onnxruntime install"
    try:
        ctypes.CDLL(str(path))
    except OSError as e:
        return f"{library}: {e}"
    return None


def _spec(node: Any) -> TensorSpec:
    datatype = _ORT_TYPES.get(node.type)
    if datatype is None:
        raise BackendError(f"{node.name}: unsupported ONNX type {node.type}")
    dims = [d if isinstance(d, int) and d > 0 else None for d in node.shape]
    return TensorSpec(datatype, tuple(dims[1:]))
