"""PyTorch, natively: TorchScript archives, torch.export programs, and module factories.

Options (the model's ``options`` section in topology.yaml):

- ``format``: ``auto`` (default: told apart by content), ``torchscript``, ``export``,
  ``state_dict``, ``pickle`` or ``factory``; which of them may run code while loading,
  and ``trust_artifact``, are in `backends.torch_artifacts`.
- ``module`` and ``module_kwargs``: the ``nn.Module`` class (``module:Class``) a state dict
  is loaded into, weights-only.
- ``factory``: ``module:callable``, called with the artifact's path, returning an
  ``nn.Module`` (its loads are weights-only unless the model is trusted).
- ``precision``: ``fp32`` (default), ``fp16`` or ``bf16``: the module's weights and its
  floating inputs are cast; floating outputs come back as the signature's datatype.
- ``intra_op_threads``: ``torch.set_num_threads`` (process-wide in PyTorch, so the last
  model to load sets it for all; 0 leaves PyTorch's default).
- ``inputs`` / ``outputs``: the signature, in the form of a model's ``inputs``, for files
  that carry none (TorchScript keeps no names, dtypes or shapes). Archives written by
  ``kp-pipeline models export`` embed theirs (`backends.options.SIGNATURE_FILE`);
  torch.export programs also record input dtypes and shapes, which are checked.

Inputs are passed to ``forward`` positionally in signature order; a module may return a
tensor, a tuple or a dict of tensors. Every call runs under ``torch.inference_mode``.

On the CPU, NumPy arrays become tensors without a copy (``torch.from_numpy``) and outputs
come back the same way. On ``cuda:N`` each instance owns two CUDA streams, made for it rather
than taken from torch's pool of 32 (`backends.devices.InstanceStream`), and keeps the
ordering rules of `backends.streams`: its GPU preprocessing runs on the preprocess stream;
the inference stream waits on the batch's ``ready`` event, then takes host inputs through
reused pinned buffers (asynchronous copies) and device arrays from GPU preprocessing
(CuPy, PyTorch) through DLPack without touching the host, computes, and copies outputs
into pinned buffers; the host waits once, on the ``done`` event after those copies.
The CUDA path is written against PyTorch's documented API and runs only in the
``gpu``-marked tests (make gpu-check); it has not run on the project's machines, and no
GPU was lent to this work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from backends.base import ModelInfo, ModelSpec, Probe, TensorBatch
from backends.devices import PinnedBuffers, StreamOwner, resolve_device
from backends.options import (
    DeclaredTensor,
    StrictOptions,
    parse_options,
    parse_signature_json,
    signature_of,
)
from backends.torch_artifacts import load_module as _load_module
from backends.torch_artifacts import resolve_format
from schemas.devices import is_device_array
from schemas.errors import BackendError
from schemas.tensors import TensorSpec, numpy_dtype, oip_datatype_named

__all__ = ["TorchBackend", "TorchOptions"]

log = logging.getLogger(__name__)


class TorchOptions(StrictOptions):
    """The torch backend's section of a model's settings."""

    format: Literal["auto", "torchscript", "export", "state_dict", "pickle", "factory"] = "auto"
    factory: str | None = None
    module: str | None = None  # module:Class that a state dict is loaded into
    module_kwargs: dict[str, Any] = Field(default_factory=dict)
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    intra_op_threads: int = 0
    inputs: list[DeclaredTensor] = Field(default_factory=list)
    outputs: list[DeclaredTensor] = Field(default_factory=list)


class TorchBackend(StreamOwner):
    """One PyTorch module on one device (with its own CUDA stream there)."""

    Options = TorchOptions  # the model's ``options`` section (docs, ``kp-pipeline schema``)

    def __init__(self) -> None:
        self._module: Any = None
        self._device: Any = None
        self._stream: Any = None
        self._dtype: Any = None
        self._inputs: list[str] = []
        self._outputs: dict[str, TensorSpec] = {}
        self._pinned = PinnedBuffers()

    @classmethod
    def probe(cls) -> Probe:
        """Usable wherever torch imports; says which CUDA devices it sees."""
        try:
            import torch
        except ImportError as e:
            return Probe(False, f"torch does not import ({e}): pip install 'kp-pipeline[torch]'")
        n = torch.cuda.device_count()
        gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(n)) if n else "none"
        return Probe(True, f"torch {torch.__version__}; CUDA devices: {gpus}")

    def load(self, spec: ModelSpec, device: str) -> ModelInfo:
        """Load the artifact in its format, place it, and settle its signature."""
        try:
            import torch
        except ImportError:
            raise BackendError("torch is not installed: pip install 'kp-pipeline[torch]'") from None
        opts = parse_options(TorchOptions, spec, "torch")
        placed = resolve_device(device, torch.cuda.device_count(), "torch")
        self._device = torch.device(placed)
        if opts.intra_op_threads:
            torch.set_num_threads(opts.intra_op_threads)
        if opts.factory is None and not spec.artifact.is_file():
            raise BackendError(f"no model file at {spec.artifact}")
        fmt = resolve_format(opts.format, spec.artifact, opts.factory, opts.module)
        module, embedded = _load_module(fmt, spec.artifact, opts, self._device, spec.trust_artifact)
        inputs, outputs = _signature(fmt, opts, embedded, spec.artifact)
        self._dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[opts.precision]
        if self._dtype is not None:
            module = module.to(self._dtype)
        self._module = module
        self._inputs = list(inputs)
        self._outputs = outputs
        # On a GPU, its own stream, not one of torch's pooled 32 (see `InstanceStream`).
        on_gpu = self._device.type == "cuda"
        if on_gpu and self._open_stream(self._device.index or 0, as_torch=True) is None:
            raise BackendError(f"{placed}: cannot create a CUDA stream for the instance")
        program = embedded.get("program")
        max_batch = None if program is None else _program_max_batch(program)
        return ModelInfo(inputs, outputs, max_batch, placed)

    def infer(self, batch: TensorBatch) -> dict[str, np.ndarray[Any, Any]]:
        """Run ``forward`` on one batch, on this instance's stream when on a GPU."""
        if self._module is None:
            raise BackendError("infer() before load()")
        import torch

        if self._stream is None:
            with torch.inference_mode():
                out = self._module(*(self._to_tensor(batch[n]) for n in self._inputs))
                return {name: self._host(name, t) for name, t in self._named(out).items()}
        return self.submit(batch)()

    def submit(self, batch: TensorBatch) -> Callable[[], dict[str, np.ndarray[Any, Any]]]:
        """Queue one batch on the GPU; the returned ``collect`` waits for it and gives outputs.

        The inference stream waits on the batch's ``ready`` event; copies in, ``forward``
        and copies out into pinned buffers are queued, then ``done``. ``collect`` is the
        batch's one host wait (`backends.streams`). Between the two the runtime may queue
        the next batch. On the CPU the batch runs here and ``collect`` returns it.
        """
        if self._module is None:
            raise BackendError("infer() before load()")
        if self._stream is None:
            outputs = self.infer(batch)
            return lambda: outputs
        import torch

        gpu = self._pipeline
        assert gpu is not None  # made with the stream
        queue = gpu.batch(defer_wait=True)
        with queue as run, torch.inference_mode(), torch.cuda.stream(self._stream):
            out = self._module(*(self._to_device(n, batch[n], run) for n in self._inputs))
            pending = {n: self._to_pinned(n, t, run) for n, t in self._named(out).items()}
        done = run.done
        assert done is not None

        def collect() -> dict[str, np.ndarray[Any, Any]]:
            gpu.wait(done)
            return {name: t.numpy() for name, t in pending.items()}

        return collect

    def unload(self) -> None:
        """Drop the module, its stream and the pinned buffers."""
        self._module = None
        self._close_stream()
        self._pinned.clear()

    # -- tensors in and out ----------------------------------------------------------------

    def _cast_in(self, t: Any) -> Any:
        if self._dtype is not None and t.is_floating_point():
            return t.to(self._dtype)
        return t

    def _to_tensor(self, x: Any) -> Any:
        """CPU: share the NumPy array's memory; a read-only array is copied once."""
        import torch

        if is_device_array(x):
            return self._cast_in(torch.utils.dlpack.from_dlpack(x).to(self._device))
        arr = np.asarray(x)
        if not arr.flags.writeable or not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr).copy()
        return self._cast_in(torch.from_numpy(arr))

    def _to_device(self, name: str, x: Any, run: Any) -> Any:
        """GPU: DLPack for device arrays; host arrays through this instance's pinned buffer.

        A device array was written on the preprocess stream, which the inference stream
        already waits for (the batch's ``ready`` event): ``from_dlpack`` runs inside the
        inference stream's context, so the producer is told that stream (DLPack), and a
        CuPy producer's own ordering against its current stream adds nothing wrong.
        """
        import torch

        if is_device_array(x):
            t = torch.utils.dlpack.from_dlpack(x)
            if t.device != self._device:
                t = t.to(self._device, non_blocking=True)
            return self._cast_in(t)
        arr = np.ascontiguousarray(x)
        dtype = torch.from_numpy(arr[:0]).dtype
        pinned = self._pinned.view(f"in:{name}", arr.shape, dtype, run)
        pinned.numpy()[...] = arr
        return self._cast_in(pinned.to(self._device, non_blocking=True))

    def _named(self, out: Any) -> dict[str, Any]:
        """Name the module's outputs after the signature, whatever container it used."""
        names = list(self._outputs)
        if isinstance(out, dict):
            missing = [n for n in names if n not in out]
            if missing:
                raise BackendError(f"the module returned keys {sorted(out)}; missing {missing}")
            return {n: out[n] for n in names}
        items: Sequence[Any] = out if isinstance(out, tuple | list) else (out,)
        if len(items) != len(names):
            raise BackendError(
                f"the module returned {len(items)} tensor(s); the signature names {names}"
            )
        return dict(zip(names, items, strict=True))

    def _want_dtype(self, name: str) -> Any:
        import torch

        return getattr(torch, numpy_dtype(self._outputs[name].datatype).name)

    def _host(self, name: str, t: Any) -> np.ndarray[Any, Any]:
        t = t.to(self._want_dtype(name))
        out: np.ndarray[Any, Any] = t.numpy() if t.is_contiguous() else t.contiguous().numpy()
        return out

    def _to_pinned(self, name: str, t: Any, run: Any) -> Any:
        t = t.to(self._want_dtype(name))
        pinned = self._pinned.view(f"out:{name}", tuple(t.shape), t.dtype, run)
        pinned.copy_(t, non_blocking=True)
        return pinned


def _signature(
    fmt: str, opts: TorchOptions, embedded: dict[str, Any], artifact: Path
) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
    """Declared options win, then the embedded signature; a program's own specs are checked."""
    if opts.inputs and opts.outputs:
        inputs, outputs = signature_of(opts.inputs), signature_of(opts.outputs)
    elif "signature" in embedded:
        inputs, outputs = parse_signature_json(embedded["signature"])
    elif "program" in embedded:
        inputs, outputs = _program_signature(embedded["program"])
    else:
        raise BackendError(
            f"{artifact} ({fmt}) carries no signature: declare options.inputs and "
            "options.outputs (name, datatype, shape per request, -1 for any size)"
        )
    if "program" in embedded:
        _check_program(embedded["program"], inputs)
    return inputs, outputs


def _program_signature(program: Any) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
    """Inputs and outputs of a torch.export program, from its graph's fake tensors."""
    placeholders = _placeholders(program)
    inputs = {name: _spec_of(val, name) for name, val in placeholders.items()}
    out_node = next(n for n in program.graph.nodes if n.op == "output")
    values = out_node.args[0] if isinstance(out_node.args[0], tuple | list) else [out_node.args[0]]
    names = list(program.graph_signature.user_outputs)
    outputs = {
        name: _spec_of(node.meta["val"], name) for name, node in zip(names, values, strict=False)
    }
    return inputs, outputs


def _placeholders(program: Any) -> dict[str, Any]:
    user = list(program.graph_signature.user_inputs)
    vals = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"}
    return {name: vals[name] for name in user}


def _spec_of(val: Any, name: str) -> TensorSpec:
    datatype = oip_datatype_named(str(val.dtype).removeprefix("torch."))
    if datatype is None:
        raise BackendError(f"{name}: unsupported torch dtype {val.dtype}")
    dims = tuple(d if isinstance(d, int) else None for d in val.shape)
    return TensorSpec(datatype, dims[1:])


def _program_max_batch(program: Any) -> int | None:
    """The upper bound torch.export recorded for the first input's batch dimension."""
    first = next(iter(_placeholders(program).values()), None)
    if first is None or not first.shape:
        return None
    dim = first.shape[0]
    if isinstance(dim, int):
        return dim
    for symbol, bounds in program.range_constraints.items():
        if str(symbol) == str(dim) and bounds.upper.is_finite:
            return int(bounds.upper)
    return None


def _check_program(program: Any, inputs: dict[str, TensorSpec]) -> None:
    """The signature must agree with what the exported graph was traced with."""
    traced = [_spec_of(v, n) for n, v in _placeholders(program).items()]
    if len(traced) != len(inputs):
        raise BackendError(
            f"the signature names {len(inputs)} input(s); the program takes {len(traced)}"
        )
    for (name, want), have in zip(inputs.items(), traced, strict=True):
        if have.datatype != want.datatype or len(have.shape) != len(want.shape):
            raise BackendError(
                f"input {name!r} is declared {want}, but the program was exported with {have}"
            )
