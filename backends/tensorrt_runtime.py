"""TensorRT: serialized engines on a CUDA device, each instance on its own CUDA stream.

Options (the model's ``options`` section in topology.yaml):

- ``profile``: pin one optimization profile by index. By default each batch runs on the
  first profile whose min..max range admits every input's shape, so an engine built with a
  small-batch and a large-batch profile serves both without configuration.
- ``log_level``: ``error`` | ``warning`` | ``info`` | ``verbose``: what TensorRT's own
  logger prints.

What runs where: TensorRT has no CPU path, so an instance runs on ``cuda:N`` only
(``auto`` means ``cuda:0``); ``cpu``, or ``auto`` on a machine without a GPU, is refused
at load. Each instance owns two streams, created for it rather than taken from torch's
pool of 32 (`backends.devices.InstanceStream`), and keeps the ordering rules of
`backends.streams`: GPU preprocessing runs on the preprocess stream; the inference stream
waits on the batch's ``ready`` event, then copies NumPy inputs from reused pinned host
buffers (asynchronously), takes device arrays (DLPack) in place, runs
``execute_async_v3`` and copies outputs into pinned host buffers; the host waits once,
on the ``done`` event after those copies. Device output buffers are reused batch after
batch on the one inference stream, so stream order alone puts batch N's copy out before
batch N+1 writes them. ``submit`` queues a batch without the host wait, so the runtime
can queue the next one before it collects this one. ``set_input_consumed_event`` is not
used: the input pinned buffers have two slots, released with ``done``; with at most one
batch queued ahead, the slot a batch takes was freed by a ``done`` the host already
waited for, so an earlier release would gain nothing.

The artifact is an engine (``.plan``/``.engine``) serialized by the same TensorRT version
for the same GPU architecture (``trtexec --onnx=m.onnx --saveEngine=m.plan``, or the
builder API). Engines with shape-tensor inputs or data-dependent output shapes are
refused: both need host-side plumbing this backend does not have.

Written against TensorRT 10's documented Python API (``execute_async_v3`` and
``set_input_consumed_event`` checked against the 10.x/11.x docs); never run on the
project's machines (no GPU there, and TensorRT is not installable from PyPI there). The
unit tests exercise the signature and profile logic on a fake engine; the tests marked
``tensorrt`` run the real thing where TensorRT and a CUDA GPU exist.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field

from backends.base import ModelInfo, ModelSpec, Probe, TensorBatch
from backends.devices import PinnedBuffers, StreamOwner, resolve_device
from backends.options import StrictOptions, parse_options
from schemas.devices import is_device_array, parse_device
from schemas.errors import BackendError
from schemas.tensors import TensorSpec

__all__ = [
    "Signature",
    "TensorRTBackend",
    "TensorRTOptions",
    "choose_profile",
    "read_signature",
    "set_input_shapes",
]

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, ...]]
"""Input name → (min, opt, max) shape, batch dimension included."""

# By member name, so the mapping needs no `tensorrt` import and works on any enum-like.
_DATATYPES = {
    "FLOAT": "FP32",
    "HALF": "FP16",
    "INT8": "INT8",
    "INT32": "INT32",
    "INT64": "INT64",
    "BOOL": "BOOL",
    "UINT8": "UINT8",
}
_TORCH_DTYPES = {
    "FP32": "float32",
    "FP16": "float16",
    "INT8": "int8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "UINT8": "uint8",
}


class TensorRTOptions(StrictOptions):
    """The backend's own section of a model's settings."""

    profile: int | None = Field(default=None, ge=0)
    log_level: Literal["error", "warning", "info", "verbose"] = "warning"


@dataclass(frozen=True, slots=True)
class Signature:
    """What an engine declares: per-row specs, its profiles, and the largest batch."""

    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    profiles: tuple[Profile, ...]
    max_batch_size: int | None


def _dims(dims: Any) -> Shape:
    return tuple(int(d) for d in dims)


def read_signature(engine: Any) -> Signature:
    """The signature of a deserialized ``ICudaEngine`` (or anything with its methods)."""
    inputs: dict[str, TensorSpec] = {}
    outputs: dict[str, TensorSpec] = {}
    full: dict[str, Shape] = {}
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        mode = engine.get_tensor_mode(name).name
        trt_type = engine.get_tensor_dtype(name).name
        datatype = _DATATYPES.get(trt_type)
        if datatype is None:
            raise BackendError(
                f"tensor {name!r}: TensorRT type {trt_type} is not served "
                f"(supported: {', '.join(_DATATYPES)})"
            )
        shape = _dims(engine.get_tensor_shape(name))
        if not shape:
            raise BackendError(f"tensor {name!r} is a scalar: no batch dimension to batch along")
        spec = TensorSpec(datatype, tuple(None if d < 0 else d for d in shape[1:]))
        if mode == "INPUT":
            if engine.is_shape_inference_io(name):
                raise BackendError(f"input {name!r} is a shape tensor: not supported")
            inputs[name] = spec
            full[name] = shape
        elif mode == "OUTPUT":
            outputs[name] = spec
    profiles = tuple(
        {name: _profile_shapes(engine, name, shape, p) for name, shape in full.items()}
        for p in range(engine.num_optimization_profiles)
    )
    # A fixed input's range is its shape, so this is also the fixed batch when there is one.
    largest = [min(p[n][2][0] for n in full) for p in profiles if full]
    return Signature(inputs, outputs, profiles, max(largest) if largest else None)


def _profile_shapes(engine: Any, name: str, shape: Shape, profile: int) -> tuple[Shape, ...]:
    if all(d >= 0 for d in shape):
        # Nothing to look up, and TensorRT only defines profile shapes for dynamic inputs.
        return (shape, shape, shape)
    lo, opt, hi = (_dims(d) for d in engine.get_tensor_profile_shape(name, profile))
    return (lo, opt, hi)


def choose_profile(
    profiles: Sequence[Profile], shapes: Mapping[str, Sequence[int]], only: int | None = None
) -> int:
    """Index of the first profile whose min..max range admits every input's shape.

    ``only`` restricts the choice to one profile (the ``profile`` option), so a batch that
    does not fit the pinned profile is refused here rather than by TensorRT mid-batch.
    """
    candidates = list(enumerate(profiles)) if only is None else [(only, profiles[only])]
    for index, profile in candidates:
        if all(_admits(rng, shapes.get(name)) for name, rng in profile.items()):
            return index
    got = ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
    ranges = "; ".join(
        f"profile {i}: " + ", ".join(f"{n} {list(lo)}..{list(hi)}" for n, (lo, _, hi) in p.items())
        for i, p in candidates
    )
    raise BackendError(f"no optimization profile admits {got} ({ranges or 'engine has none'})")


def _admits(rng: tuple[Shape, ...], shape: Sequence[int] | None) -> bool:
    lo, _, hi = rng
    return (
        shape is not None
        and len(shape) == len(lo)
        and all(a <= d <= b for a, d, b in zip(lo, shape, hi, strict=True))
    )


def set_input_shapes(
    context: Any, shapes: Mapping[str, Sequence[int]], outputs: Sequence[str]
) -> dict[str, Shape]:
    """Set every input's shape on an ``IExecutionContext``; return the outputs' shapes.

    Output shapes are only known once every input shape is set. A ``-1`` left in one means
    the engine computes it from the data, which would need an output allocator.
    """
    for name, shape in shapes.items():
        if not context.set_input_shape(name, tuple(int(d) for d in shape)):
            raise BackendError(f"TensorRT refused shape {list(shape)} for input {name!r}")
    result: dict[str, Shape] = {}
    for name in outputs:
        shape = _dims(context.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise BackendError(f"output {name!r} has a data-dependent shape {list(shape)}")
        result[name] = shape
    return result


def _gpu_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return int(torch.cuda.device_count())


def _import_tensorrt() -> Any:
    try:
        import tensorrt
    except (ImportError, OSError) as e:  # OSError: the wheel is there, libnvinfer is not
        raise BackendError(f"tensorrt is not importable: {e}") from None
    return tensorrt


class TensorRTBackend(StreamOwner):
    """One engine, one execution context, one CUDA stream: one model instance."""

    Options = TensorRTOptions  # the model's ``options`` section (docs, ``kp-pipeline schema``)

    def __init__(self) -> None:
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._device = ""
        self._signature: Signature | None = None
        self._pinned: int | None = None
        self._active = 0
        self._dtypes: dict[str, Any] = {}
        self._host = PinnedBuffers()
        self._device_out: dict[str, Any] = {}

    @classmethod
    def probe(cls) -> Probe:
        """Usable where ``tensorrt`` imports and PyTorch sees a CUDA device."""
        try:
            trt = _import_tensorrt()
        except BackendError as e:
            return Probe(False, f"{e} (it comes from NVIDIA's package index)")
        version = getattr(trt, "__version__", "?")
        try:
            import torch
        except ImportError:
            return Probe(False, f"TensorRT {version}, but torch (used to move tensors) is missing")
        if not torch.cuda.is_available():
            why = "a CPU-only build" if torch.version.cuda is None else "sees no CUDA device"
            return Probe(False, f"TensorRT {version}, torch {torch.__version__} is {why}")
        return Probe(
            True,
            f"TensorRT {version}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
            f"{torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}",
        )

    def load(self, spec: ModelSpec, device: str) -> ModelInfo:
        """Deserialize the engine on ``device`` and read its signature from it."""
        try:
            opts = parse_options(TensorRTOptions, spec, "tensorrt")
            placed = resolve_device(device, _gpu_count(), "tensorrt")
        except BackendError as e:
            raise BackendError(f"{e}") from None
        if placed == "cpu":
            raise BackendError(
                f"device {device!r}: TensorRT engines run on a CUDA "
                "device only" + ("" if device == "cpu" else ", and none is visible here")
            )
        if not spec.artifact.is_file():
            raise BackendError(f"no engine file at {spec.artifact}")
        try:
            data = spec.artifact.read_bytes()
        except OSError as e:
            raise BackendError(f"cannot read {spec.artifact}: {e}") from None
        try:
            trt = _import_tensorrt()
        except BackendError as e:
            raise BackendError(f"{e}") from None
        import torch

        self.unload()
        logger = trt.Logger(getattr(trt.Logger, opts.log_level.upper()))
        with torch.cuda.device(parse_device(placed)[1] or 0):
            runtime = trt.Runtime(logger)
            engine = runtime.deserialize_cuda_engine(data)
            if engine is None:
                raise BackendError(
                    f"{spec.artifact} is not a serialized TensorRT engine "
                    f"for TensorRT {getattr(trt, '__version__', '?')} on this GPU (an engine "
                    "only loads with the TensorRT version and GPU architecture that built it)"
                )
            try:
                signature = read_signature(engine)
            except BackendError as e:
                raise BackendError(f"{e}") from None
            if opts.profile is not None and opts.profile >= len(signature.profiles):
                raise BackendError(
                    f"options.profile {opts.profile}: the engine has "
                    f"{len(signature.profiles)} optimization profile(s)"
                )
            context = engine.create_execution_context()
            if context is None:
                raise BackendError("no execution context (GPU memory?)")
            # Its own stream, not one of torch's pooled 32 (see `InstanceStream`).
            stream = self._open_stream(parse_device(placed)[1] or 0, as_torch=True)
            if stream is None:
                raise BackendError(f"{placed}: cannot create a CUDA stream for the instance")
        self._attach((runtime, engine, context), stream, placed, signature, opts.profile)
        return ModelInfo(
            signature.inputs,
            signature.outputs,
            signature.max_batch_size,
            placed,
            signature.profiles,
        )

    def _attach(
        self,
        handles: tuple[Any, Any, Any],
        stream: Any,
        device: str,
        signature: Signature,
        pinned: int | None,
    ) -> None:
        """Adopt a runtime, engine and context; apart from load so tests can attach fakes."""
        import torch

        self._runtime, self._engine, self._context = handles
        self._stream, self._device = stream, device
        self._signature, self._pinned = signature, pinned
        self._active = 0  # a new context starts on profile 0 (TensorRT >= 8.6)
        self._dtypes = {
            name: getattr(torch, _TORCH_DTYPES[spec.datatype])
            for name, spec in {**signature.inputs, **signature.outputs}.items()
        }

    def infer(self, batch: TensorBatch) -> dict[str, np.ndarray[Any, Any]]:
        """Run one batch on the instance's stream; outputs are valid until the next call."""
        return self.submit(batch)()

    def submit(self, batch: TensorBatch) -> Callable[[], dict[str, np.ndarray[Any, Any]]]:
        """Queue one batch; the returned ``collect`` waits for it (`backends.streams`).

        The context's shapes and addresses are read when ``execute_async_v3`` queues the
        run, so the next batch may set its own before this one has run (one stream: in
        order). Its input tensors are kept until ``collect``.
        """
        if self._context is None or self._signature is None or self._pipeline is None:
            raise BackendError("infer() before load()")
        import torch

        gpu, sig, ctx, stream = self._pipeline, self._signature, self._context, self._stream
        missing = [n for n in sig.inputs if n not in batch]
        if missing:
            raise BackendError(f"batch lacks input(s) {missing}")
        shapes = {n: _dims(batch[n].shape) for n in sig.inputs}
        profile = choose_profile(sig.profiles, shapes, self._pinned)
        keep: list[Any] = []  # inputs must outlive the stream's work on them
        results: dict[str, Any] = {}
        # The inference stream waits on the batch's `ready` event; the pinned buffers are
        # released with `done`, which `collect` waits for (and `batch` itself, on an error:
        # a copy still in flight must not meet the next batch's writes into them).
        with gpu.batch(defer_wait=True) as run, torch.cuda.stream(stream):
            if profile != self._active:
                try:
                    switched = ctx.set_optimization_profile_async(profile, stream.cuda_stream)
                except RuntimeError as e:
                    raise BackendError(f"cannot switch to profile {profile}: {e}") from None
                if not switched:
                    raise BackendError(f"cannot switch to optimization profile {profile}")
                self._active = profile
            for name in sig.inputs:
                tensor = self._to_device(name, batch[name], run)
                keep.append(tensor)
                ctx.set_tensor_address(name, tensor.data_ptr())
            for name, shape in set_input_shapes(ctx, shapes, list(sig.outputs)).items():
                out = self._output_buffer(name, shape)
                ctx.set_tensor_address(name, out.data_ptr())
                results[name] = out
            if not ctx.execute_async_v3(stream.cuda_stream):
                raise BackendError("TensorRT execute_async_v3 failed (its log says why)")
            for name, out in results.items():
                host = self._host.view("out:" + name, tuple(out.shape), out.dtype, run)
                host.copy_(out, non_blocking=True)
                results[name] = host
        done = run.done
        assert done is not None

        def collect() -> dict[str, np.ndarray[Any, Any]]:
            gpu.wait(done)
            keep.clear()  # the run has read them
            return {name: host.numpy() for name, host in results.items()}

        return collect

    def unload(self) -> None:
        """Release context before engine before runtime, then every buffer."""
        self._context = None
        self._engine = None
        self._runtime = None
        self._close_stream()
        self._signature = None
        self._host.clear()
        self._device_out.clear()

    def _to_device(self, name: str, x: Any, run: Any) -> Any:
        """A contiguous tensor of the engine's dtype on the instance's device."""
        from torch.utils.dlpack import from_dlpack

        want = self._dtypes[name]
        if is_device_array(x):
            # Inside the stream context, so from_dlpack hands the producer our stream and the
            # producer orders its pending writes before our work (the DLPack protocol).
            tensor = from_dlpack(x)
            return tensor.to(self._device, want, non_blocking=True).contiguous()
        arr = np.asarray(x)
        host = self._host.view("in:" + name, arr.shape, want, run)
        try:
            np.copyto(host.numpy(), arr, casting="same_kind")
        except TypeError as e:
            raise BackendError(f"input {name!r}: {e}") from None
        return host.to(self._device, non_blocking=True)

    def _output_buffer(self, name: str, shape: Shape) -> Any:
        """A device tensor of ``shape`` over the name's buffer, grown geometrically."""
        import torch

        dtype = self._dtypes[name]
        need = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        buf = self._device_out.get(name)
        if buf is None or buf.numel() < need:
            size = max(need, 256, 0 if buf is None else 2 * buf.numel())
            buf = torch.empty(size, dtype=torch.uint8, device=self._device)
            self._device_out[name] = buf
        return buf[:need].view(dtype).view(shape)
