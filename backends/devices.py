"""Where an instance runs, and moving tensors there without needless copies.

Device strings are the topology's (`schemas.devices`). `resolve_device` turns them into
a concrete place for one runtime, refusing a GPU the runtime cannot see.

`PinnedBuffers` keeps one page-locked host buffer per tensor name and reuses it batch
after batch: copies between pinned memory and the GPU can run asynchronously on the
instance's stream, and allocating pinned memory per batch costs more than the copy.
It needs PyTorch and a CUDA device; the CUDA paths here were written against PyTorch's
documented API and have not run on the project's machines (no GPU was lent).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from schemas.devices import parse_device
from schemas.errors import BackendError

__all__ = ["PinnedBuffers", "StreamOwner", "resolve_device"]


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


class StreamOwner:
    """A backend instance that may own a CUDA stream (``_stream``; None on a CPU).

    The graph sets up this instance's preprocessing stages with ``stream``, so GPU
    preprocessing queues on the same stream as the model.
    """

    _stream: Any = None

    @property
    def stream(self) -> Any:
        """The instance's CUDA stream (``cuda_stream`` is its handle); None on a CPU."""
        return self._stream


class PinnedBuffers:
    """Reusable page-locked host buffers, one per name, grown when a batch needs more.

    ``view`` returns a pinned tensor of exactly the requested shape over the name's
    buffer. The caller must not ask for the same name again before the copies that
    read or write the previous view have finished (the instance synchronises its stream
    at the end of each batch, which guarantees that).
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Any] = {}

    def view(self, name: str, shape: tuple[int, ...], dtype: Any) -> Any:
        """A pinned ``torch.Tensor`` of ``shape`` and ``dtype`` (a torch dtype)."""
        import torch

        count = int(np.prod(shape)) if shape else 1
        itemsize = torch.empty((), dtype=dtype).element_size()
        need = count * itemsize
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < need:
            # Grow geometrically so a slowly rising batch size does not re-pin every time.
            size = max(need, 0 if buf is None else 2 * buf.numel())
            buf = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            self._buffers[name] = buf
        return buf[:need].view(dtype).view(shape)

    def clear(self) -> None:
        """Drop every buffer (the memory is unpinned when the tensors are freed)."""
        self._buffers.clear()
