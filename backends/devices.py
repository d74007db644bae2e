"""Where an instance runs, and moving tensors there without needless copies.

Device strings are the topology's (`schemas.devices`). `resolve_device` turns them into
a concrete place for one runtime, refusing a GPU the runtime cannot see.

`PinnedBuffers` keeps two page-locked host buffers per tensor name and reuses them batch
after batch: copies between pinned memory and the GPU can run asynchronously on the
instance's stream, and allocating pinned memory per batch costs more than the copy.
It needs PyTorch and a CUDA device; the CUDA paths here were written against PyTorch's
documented API and have not run on the project's machines (no GPU was lent).

`instance_stream` makes a CUDA stream an instance owns (see `InstanceStream` for why
not ``torch.cuda.Stream()``); `StreamOwner` opens and closes a backend's two streams
(preprocess and inference) and the `backends.streams.GpuPipeline` that orders them: the
ordering rules are written in `backends.streams`.
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from backends.streams import BufferRing, Event, GpuPipeline, cupy_events, torch_events
from schemas.devices import parse_device
from schemas.errors import BackendError

__all__ = [
    "InstanceStream",
    "PinnedBuffers",
    "StreamOwner",
    "instance_stream",
    "resolve_device",
]


def resolve_device(device: str, gpus: int | None, runtime: str) -> str:
    """A concrete ``cpu`` or ``cuda:N`` for a runtime that sees ``gpus`` CUDA devices.

    ``gpus=None`` is a runtime that can use CUDA but cannot count the devices (ONNX
    Runtime): any index is taken, and the runtime itself refuses one that does not exist.
    """
    kind, index = parse_device(device)
    if kind == "cpu":
        return "cpu"
    if kind == "auto":
        return "cuda:0" if gpus != 0 else "cpu"
    n = index or 0
    if gpus == 0:
        raise BackendError(f"device {device!r}: {runtime} sees no CUDA device on this machine")
    if gpus is not None and n >= gpus:
        raise BackendError(f"device {device!r}: {runtime} sees {gpus} CUDA device(s)")
    return f"cuda:{n}"


class InstanceStream:
    """A CUDA stream made for one model instance, which no other instance is given.

    ``torch.cuda.Stream()`` does not create a stream: it hands out the next of a pool of
    32 per device and priority, round robin (c10/cuda/CUDAStream.cpp), so the 33rd
    instance on a device would share the first one's stream, and "each instance owns its
    stream" would stop holding without a word. This one is created for the instance and
    destroyed by `close` (or when it is collected):

    - with CuPy when it is installed (the GPU preprocessing stages need it anyway):
      ``cupy.cuda.Stream(non_blocking=True)``, a non-blocking stream like torch's own;
    - else with PyTorch's binding of ``cudaStreamCreate`` (``torch.cuda.cudart()``),
      which makes a blocking stream: it also waits for work on the legacy default
      stream, and that stream waits for it. The torch and TensorRT backends queue
      nothing there, so their instances still overlap; a synchronous ``cudaMemcpy``
      (ONNX Runtime's copy of outputs to the host) does queue there and would wait for
      every such stream, which is one more reason GPU machines have CuPy (``gpu`` extra).

    ``cuda_stream`` is the raw handle (what ONNX Runtime and the preprocessing stages
    take); `torch` gives a ``torch.cuda.ExternalStream`` over it for ``torch.cuda.stream``.
    Written against CuPy's and PyTorch's documented APIs and not run here (no GPU).
    """

    def __init__(
        self,
        handle: int,
        device: int,
        synchronize: Callable[[], Any],
        *,
        owner: Any = None,
        destroy: Callable[[int], Any] | None = None,
        torch_view: Any = None,
        events: tuple[Callable[[], Event], Callable[[Event], None]] | None = None,
    ) -> None:
        self.cuda_stream = handle
        self.device = device
        self._synchronize = synchronize
        self._events = events
        self._owner = owner  # a CuPy stream destroys what it created when it goes
        self._torch = torch_view
        # Runs once: from close, or when this object is collected without one; not at
        # exit, when the CUDA runtime may be torn down already (c10 leaks its streams
        # then for the same reason).
        self._release = weakref.finalize(self, destroy or _nothing, handle)
        self._release.atexit = False

    def synchronize(self) -> None:
        """Wait on the host for the work queued on this stream, and only this stream."""
        self._synchronize()

    def record(self) -> Event:
        """A new event recorded on this stream now (`backends.streams.Stream`)."""
        if self._events is None:
            raise BackendError(f"cuda:{self.device}: this stream was made without events")
        return self._events[0]()

    def wait(self, event: Event) -> None:
        """Make work queued here from now on wait for ``event``, without a host wait."""
        if self._events is None:
            raise BackendError(f"cuda:{self.device}: this stream was made without events")
        self._events[1](event)

    def torch(self) -> Any:
        """A ``torch.cuda.ExternalStream`` over this stream (it does not own it)."""
        if self._torch is None:
            import torch

            self._torch = torch.cuda.ExternalStream(self.cuda_stream, device=self.device)
        return self._torch

    def close(self) -> None:
        """Destroy the stream; CUDA lets work already queued on it finish first."""
        self._torch = None
        self._owner = None
        self._events = None
        self._synchronize = _nothing_queued  # a bound method would keep the owner alive
        self._release()


def _nothing(handle: int) -> None:
    """No destroy step: the stream's owner object destroys it."""


def _nothing_queued() -> None:
    """A closed stream has nothing left to wait for."""


def instance_stream(device: int) -> InstanceStream | None:
    """A new stream on CUDA device ``device``; None without CuPy or a CUDA PyTorch."""
    try:
        import cupy
    except ImportError:
        cupy = None
    if cupy is not None:
        with cupy.cuda.Device(device):
            made = cupy.cuda.Stream(non_blocking=True)
        events = cupy_events(made, device)
        return InstanceStream(int(made.ptr), device, made.synchronize, owner=made, events=events)
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    cudart = torch.cuda.cudart()
    slot = ctypes.c_void_p()
    with torch.cuda.device(device):
        status = cudart.cudaStreamCreate(ctypes.addressof(slot))
    if status != cudart.cudaError.success:
        why = cudart.cudaGetErrorString(status)
        raise BackendError(f"cuda:{device}: cannot create a CUDA stream: {why}")
    handle = int(slot.value or 0)
    view = torch.cuda.ExternalStream(handle, device=device)
    return InstanceStream(
        handle,
        device,
        view.synchronize,
        destroy=cudart.cudaStreamDestroy,
        torch_view=view,
        events=torch_events(view),
    )


class StreamOwner:
    """A backend instance that may own CUDA streams (None of them on a CPU).

    On a GPU it owns two (`backends.streams`): the graph sets up the instance's
    preprocessing stages with ``preprocess_stream``, the backend computes on ``stream``
    (the inference stream), and ``gpu`` orders the two with events.
    """

    _stream: Any = None
    _owned: InstanceStream | None = None
    _owned_pre: InstanceStream | None = None
    _pipeline: GpuPipeline | None = None

    @property
    def stream(self) -> Any:
        """The instance's inference stream (``cuda_stream`` is its handle); None on a CPU."""
        return self._stream

    @property
    def preprocess_stream(self) -> Any:
        """The stream the instance's GPU preprocessing runs on; None on a CPU."""
        return self._owned_pre

    @property
    def gpu(self) -> GpuPipeline | None:
        """The events between the instance's two streams; None on a CPU."""
        return self._pipeline

    def _open_stream(self, device: int, *, as_torch: bool = False) -> Any:
        """Make this instance's two streams on ``device`` and the pipeline between them.

        ``as_torch`` keeps the ``torch.cuda.ExternalStream`` view of the inference stream
        as ``_stream``, for backends that queue work with ``torch.cuda.stream``. Returns
        ``_stream``: None where no library can make a stream (neither CuPy nor a CUDA
        PyTorch).
        """
        self._close_stream()
        self._owned = instance_stream(device)
        if self._owned is None:
            return None
        self._owned_pre = instance_stream(device)
        assert self._owned_pre is not None  # the library that made one makes another
        self._pipeline = GpuPipeline(self._owned_pre, self._owned)
        self._stream = self._owned.torch() if as_torch else self._owned
        return self._stream

    def _close_stream(self) -> None:
        """Drop and destroy the instance's streams, if it has them."""
        self._stream = None
        self._pipeline = None
        for attr in ("_owned_pre", "_owned"):
            owned = getattr(self, attr)
            setattr(self, attr, None)
            if owned is not None:
                owned.close()


class PinnedBuffers:
    """Reusable page-locked host buffers, one per name, grown when a batch needs more.

    ``view`` returns a pinned tensor of exactly the requested shape over one of the name's
    two buffers (a `backends.streams.BufferRing`, slots in turn): given the batch's
    ``run`` (`GpuPipeline.batch`), the buffer is held by that batch and released with its
    ``done`` event, so it is written again only after the copies that read or wrote it
    have completed (the ordering rules in `backends.streams`). Without a run the caller
    answers for that itself.
    """

    def __init__(self) -> None:
        self._rings: dict[str, BufferRing] = {}

    def view(self, name: str, shape: tuple[int, ...], dtype: Any, run: Any = None) -> Any:
        """A pinned ``torch.Tensor`` of ``shape`` and ``dtype`` (a torch dtype)."""
        import torch

        count = int(np.prod(shape)) if shape else 1
        need = count * torch.empty((), dtype=dtype).element_size()
        ring = self._rings.get(name)
        if ring is None:
            # Two slots: a batch may be queued while the one before is not yet collected.
            ring = self._rings[name] = BufferRing(_pin, depth=2, fits=_holds)
        buf = ring.take(need)[1] if run is None else run.take(ring, need)
        return buf[:need].view(dtype).view(shape)

    def clear(self) -> None:
        """Drop every buffer (the memory is unpinned when the tensors are freed)."""
        self._rings.clear()


def _pin(need: int) -> Any:
    """A pinned byte buffer of at least ``need`` bytes, rounded up to a power of two.

    Rounded so a slowly rising batch size does not re-pin every batch.
    """
    import torch

    size = 1 << max(need - 1, 0).bit_length()
    return torch.empty(size, dtype=torch.uint8, pin_memory=True)


def _holds(buf: Any, need: int) -> bool:
    return int(buf.numel()) >= need
