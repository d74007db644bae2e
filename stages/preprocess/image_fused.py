"""``normalize`` + cast + ``to_nchw`` fused into one pass over the batch.

The separate CPU stages pass over the batch four times (cast to float, multiply and
subtract in place, transpose into a new array). `NormalizeNCHW` makes the NCHW output
directly:

- CPU (NumPy twin): float32 output is one ``np.multiply`` that reads the NHWC input through
  a transposed view and writes the contiguous NCHW output, then a subtract in place: the
  same float32 operations as ``normalize`` (``x * (scale / std) - mean / std``), about 6x
  faster than ``normalize`` + ``to_nchw`` (load/preprocess.py). float16 output
  from 8-bit input gathers from a 256-entry table per channel (the float32 formula, cast
  once), writing each float16 once; computing float32 and then casting is 2.5x slower.
- CUDA: one CuPy ``ElementwiseKernel`` over the NCHW output reads the NHWC input (any
  DLPack-capable device array, or NumPy, which is copied over from a reused pinned
  buffer, asynchronously) and writes float32 or float16, on the instance's preprocess
  stream (the ordering rules are in `backends.streams`). The output is a CuPy array
  (DLPack-capable).

Tolerance: float32 output equals ``normalize`` then ``to_nchw`` bit for bit on the CPU
(tested to 0, the stated bound is 1e-6); float16 output equals that float32 result cast
to float16. The CUDA kernel does the same float32 multiply and subtract, but the compiler
may fuse them into one FMA (a single rounding), so it is within 1e-6 of the CPU for the
float32 path (values are within ±~3 for ImageNet statistics, one ulp there is 2.4e-7) and
within one float16 ulp for the float16 path. The CUDA path was written against CuPy's
documented API and has NOT been run here (no GPU on the project's machines).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import numpy as np

from schemas.devices import gpu_install_hint, parse_device
from schemas.errors import GraphError, KpError
from schemas.streams import BufferRing, LibraryEvent
from schemas.tensors import TensorSpec
from stages.base import Batch, StageBase, StageContext, StageParams, require

__all__ = ["NormalizeNCHW", "NormalizeNCHWParams", "cupy_stream", "stream_handle"]

# One thread per output element: index the NHWC input from the NCHW output position.
_KERNEL = """
const long long p = i % hw;
const long long nc = i / hw;
const long long ch = nc % c;
y = (Y)((float)x[(nc / c * hw + p) * c + ch] * mul[ch] - sub[ch]);
"""


class NormalizeNCHWParams(StageParams):
    """``normalize``'s and ``to_nchw``'s parameters, and the output datatype."""

    input: str = "image"
    output: str | None = None
    mean: list[float]
    """Per-channel mean, subtracted after ``scale`` (one value per channel)."""
    std: list[float]
    """Per-channel standard deviation the result is divided by."""
    scale: float = 1.0 / 255.0
    """Factor applied to the pixel values first (1/255 maps uint8 to [0, 1])."""
    dtype: Literal["FP32", "FP16"] = "FP32"
    """The output's datatype."""


class NormalizeNCHW(StageBase):
    """[N,H,W,C] (uint8 or any number) → contiguous normalised [N,C,H,W] in one pass."""

    Params: ClassVar[type[StageParams]] = NormalizeNCHWParams
    name = "normalize_nchw"

    def __init__(self, params: NormalizeNCHWParams) -> None:
        super().__init__(params)
        self.p = params
        self.out = params.output or params.input
        self.dtype = np.dtype(np.float16 if params.dtype == "FP16" else np.float32)
        std = np.asarray(params.std, np.float32)
        # The same folded constants as the `normalize` stage, so the results are identical.
        self._mul = (np.float32(params.scale) / std).astype(np.float32)
        self._sub = (np.asarray(params.mean, np.float32) / std).astype(np.float32)
        levels = np.arange(256, dtype=np.float32)[None, :]
        self._lut = (levels * self._mul[:, None] - self._sub[:, None]).astype(self.dtype)
        self._gpu: int | None = None
        self._stream: int | None = None
        self._device_consts: Any = None  # (mul, sub) as CuPy arrays on the device
        self._uploads: BufferRing | None = None  # pinned host buffers for NumPy inputs

    @property
    def leaves_device_arrays(self) -> bool:
        """On CUDA the output is a CuPy array: only stages that take those may follow."""
        return self._gpu is not None

    def signature(self, inputs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        """A fixed [h,w,c] in, FP32/FP16 [c,h,w] out."""
        spec = require(inputs, self.p.input, self.name)
        if len(spec.shape) != 3 or None in spec.shape:
            raise GraphError(f"{self.name}: {self.p.input!r} must be a fixed [h,w,c], got {spec}")
        h, w, c = spec.shape
        if len(self.p.mean) != c or len(self.p.std) != c:
            raise GraphError(f"{self.name}: mean and std need {c} values for {spec}")
        out = {k: v for k, v in inputs.items() if k != self.p.input}
        out[self.out] = TensorSpec(self.p.dtype, (c, h, w))
        return out

    def setup(self, ctx: StageContext) -> None:
        """On ``cuda:N``, take the instance's stream and copy the constants over on it.

        ``cupy.asarray`` of a NumPy array copies on the current stream (CuPy's documented
        behaviour), hence the ``with`` on the instance's stream. Written against CuPy's
        documentation and NOT RUN here (no GPU on the project's machines); the order of
        copies and launches is tested with a fake CuPy.
        """
        try:
            kind, index = parse_device(ctx.device)
        except KpError as e:
            raise GraphError(f"{self.name}: {e}") from None
        if kind == "auto":
            kind = "cuda" if _cuda_available() else "cpu"
        if kind == "cpu":
            self._gpu = None
            return
        cupy = _cupy()
        self._gpu, self._stream = index or 0, stream_handle(ctx.stream)
        # Copied on the kernel's own stream, so stream order puts them before its first
        # launch. On the legacy default stream they would not be: the instance's stream is
        # usually non-blocking, and then nothing orders the two.
        with cupy.cuda.Device(self._gpu), cupy_stream(cupy, self._stream):
            self._device_consts = (cupy.asarray(self._mul), cupy.asarray(self._sub))
        self._uploads = BufferRing(
            lambda need: _Pinned(cupy, need), depth=2, fits=lambda buf, need: buf.nbytes >= need
        )

    def close(self) -> None:
        """Drop the device constants and the pinned buffers."""
        self._device_consts = None
        if self._uploads is not None:
            self._uploads.clear()

    def process(self, batch: Batch) -> Batch:
        """Normalise and transpose the whole batch (NumPy on the CPU, a kernel on CUDA)."""
        x = batch.columns[self.p.input]
        y = self._gpu_pass(x) if self._gpu is not None else self.cpu_pass(x)
        columns = {k: v for k, v in batch.columns.items() if k != self.p.input}
        columns[self.out] = y
        return batch.with_columns(columns)

    def cpu_pass(self, x: Any) -> np.ndarray[Any, Any]:
        """The NumPy twin: [N,H,W,C] → contiguous [N,C,H,W] of ``dtype``."""
        x = np.asarray(x)
        n, h, w, c = x.shape
        if self.dtype == np.float16 and x.dtype == np.uint8 and c == len(self._lut):
            y = np.empty((n, c, h, w), self.dtype)
            for i in range(n):  # per plane, so that `take` writes without a buffer
                for ch in range(c):
                    np.take(self._lut[ch], x[i, :, :, ch], out=y[i, ch], mode="clip")
            return y
        if np.result_type(x.dtype, np.float32) != np.float32:
            x = x.astype(np.float32)  # as `normalize` does: float32 arithmetic throughout
        y32 = np.empty((n, c, h, w), np.float32)
        np.multiply(x.transpose(0, 3, 1, 2), self._mul[:, None, None], out=y32)
        np.subtract(y32, self._sub[:, None, None], out=y32)
        return y32 if self.dtype == np.float32 else y32.astype(self.dtype)

    def _gpu_pass(self, x: Any) -> Any:
        """The CuPy kernel over the NCHW output; NOT RUN on the project's machines."""
        cupy = _cupy()
        mul, sub = self._device_consts
        stream = cupy_stream(cupy, self._stream)
        with cupy.cuda.Device(self._gpu), stream:
            # NumPy: copied from a pinned buffer on the kernel's stream. Device arrays:
            # from_dlpack passes our stream to the producer, which orders its work before it.
            if isinstance(x, np.ndarray):
                src = self._upload(cupy, stream, x)
            else:
                src = cupy.from_dlpack(x)
            src = cupy.ascontiguousarray(src)  # the kernel indexes the input as dense NHWC
            n, h, w, c = src.shape
            y = cupy.empty((n, c, h, w), dtype=self.dtype)
            if y.size:
                _kernel(cupy)(src, mul, sub, c, h * w, y)
            return y

    def _upload(self, cupy: Any, stream: Any, x: np.ndarray[Any, Any]) -> Any:
        """Host → device through a pinned buffer, asynchronously on ``stream``.

        From pageable memory the copy would be staged by the driver and hold this thread;
        from pinned memory it is queued and overlaps the inference stream's work. The
        buffer is one of two (`schemas.streams.BufferRing`) released with an event
        recorded after the copy, so the host overwrites it only once that copy is done:
        it is two batches old by then, and the host waits only if it still runs.
        """
        assert self._uploads is not None
        if not x.size:
            return cupy.asarray(x)
        x = np.ascontiguousarray(x)
        index, pinned = self._uploads.take(x.nbytes)
        staged = pinned.view(x.dtype, x.shape)
        staged[...] = x
        src = cupy.empty(x.shape, x.dtype)
        src.set(staged, stream=stream)
        event = cupy.cuda.Event(disable_timing=True)
        event.record(stream)
        self._uploads.release(index, LibraryEvent(event))
        return src


class _Pinned:
    """Page-locked host memory from CuPy's pinned pool, rounded up to a power of two."""

    def __init__(self, cupy: Any, need: int) -> None:
        self.nbytes = 1 << max(need - 1, 0).bit_length()
        self.mem = cupy.cuda.alloc_pinned_memory(self.nbytes)

    def view(self, dtype: Any, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
        """A NumPy array of ``shape`` over the start of the buffer."""
        count = int(np.prod(shape))
        return np.frombuffer(self.mem, dtype, count).reshape(shape)


def stream_handle(stream: Any) -> int | None:
    """A raw ``cudaStream_t`` from a handle, a PyTorch or a CuPy stream, or None."""
    if stream is None or isinstance(stream, int):
        return stream
    for attr in ("cuda_stream", "ptr"):  # torch.cuda.Stream, cupy.cuda.Stream
        if hasattr(stream, attr):
            return int(getattr(stream, attr))
    raise GraphError(f"cannot use {type(stream).__name__} as a CUDA stream")


_KERNELS: dict[str, Any] = {}


def _kernel(cupy: Any) -> Any:
    """The fused kernel, built once; CuPy compiles it per dtype pair on first launch."""
    if "k" not in _KERNELS:
        _KERNELS["k"] = cupy.ElementwiseKernel(
            "raw X x, raw float32 mul, raw float32 sub, int64 c, int64 hw",
            "Y y",
            _KERNEL,
            "kp_normalize_nchw",
        )
    return _KERNELS["k"]


def cupy_stream(cupy: Any, handle: int | None) -> Any:
    """A CuPy stream over a raw handle, to use as ``with``; the default stream for None.

    CuPy 14 deprecates ``ExternalStream`` for ``Stream.from_external``, which takes an
    object speaking the CUDA stream protocol; older CuPy has only ``ExternalStream``.
    """
    if handle is None:
        return cupy.cuda.Stream.null
    if hasattr(cupy.cuda.Stream, "from_external"):
        return cupy.cuda.Stream.from_external(_StreamHandle(handle))
    return cupy.cuda.ExternalStream(handle)


class _StreamHandle:
    """A raw ``cudaStream_t`` behind the CUDA stream protocol (``__cuda_stream__``)."""

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.handle)


def _cupy() -> Any:
    try:
        import cupy
    except ImportError:
        raise GraphError(f"normalize_nchw on CUDA needs CuPy: {gpu_install_hint()}") from None
    return cupy


def _cuda_available() -> bool:
    """Whether CuPy is installed and sees a CUDA device."""
    try:
        import cupy

        return bool(cupy.cuda.is_available())
    except Exception:  # no CuPy, or no driver: both mean the CPU
        return False
