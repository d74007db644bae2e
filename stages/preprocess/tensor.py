"""Stages for plain tensors: cast, rename, scale (affine map), pad or crop to a shape.

All four take device-array columns (CuPy after ``dali_image`` or ``normalize_nchw`` on
CUDA, torch tensors from a custom stage) and leave them on their device: they compute with
the array's own library (`stages.base.array_namespace`) and bring only one count per row
to the host (the rows ``scale`` rejects). On a GPU that work is queued on the instance's
preprocess stream (`StageContext.stream`), the stream the stage before wrote the column
on; the model's inference stream waits on the event recorded there after the batch's
last stage (`backends.streams`). The device paths are written against CuPy's and PyTorch's
documentation and not run here (no GPU on the project's machines); on the CPU they are
tested with torch tensors and a device-array double that refuses ``np.asarray``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from schemas.devices import is_device_array
from schemas.errors import GraphError
from schemas.tensors import DATATYPES, TensorSpec, numpy_dtype
from stages.base import (
    Batch,
    Column,
    StageBase,
    StageContext,
    StageParams,
    array_namespace,
    astype,
    host_dtype,
    require,
    stack_if_uniform,
)
from stages.preprocess.image_fused import cupy_stream, stream_handle

__all__ = ["Cast", "PadCrop", "Rename", "Scale"]


class _DeviceStage(StageBase):
    """A stage that works on device arrays where they are, on its instance's stream."""

    takes_device_arrays: ClassVar[bool] = True
    _stream: Any = None

    def setup(self, ctx: StageContext) -> None:
        """Keep the instance's stream (read only when a device array comes)."""
        self._stream = ctx.stream

    def on_device(self, col: Column) -> contextlib.AbstractContextManager[None]:
        """Where ``col``'s library queues the work: its device, the instance's stream."""
        first = col[0] if isinstance(col, list) and col else col
        return _device_work(first, self._stream)


@contextlib.contextmanager
def _device_work(x: Any, stream: Any) -> Iterator[None]:
    """Make ``x``'s device and ``stream`` current for its library (nothing for NumPy).

    CuPy and torch queue work on a per-thread current stream, the default one unless told;
    the instances' preprocess streams (made for them, non-blocking) do not wait for the
    default stream, so work there could read a column before the stage that wrote it on
    the preprocess stream is done. Written against CuPy's and PyTorch's documentation and
    NOT run here (no GPU).
    """
    library = type(x).__module__.partition(".")[0]
    if library == "cupy":
        import cupy

        with x.device, cupy_stream(cupy, stream_handle(stream)):
            yield
    elif library == "torch" and getattr(x, "is_cuda", False):
        import torch

        with torch.cuda.device(x.device):
            if stream is None:
                yield
                return
            if not isinstance(stream, torch.cuda.Stream):
                handle = stream_handle(stream)
                stream = torch.cuda.ExternalStream(handle, device=x.device)  # type: ignore[no-untyped-call]
            with torch.cuda.stream(stream):
                yield
    else:
        yield


def _stacked(col: Column, stage: str, name: str) -> Any:
    """A column as one array: a list of host rows as NumPy makes it, device rows stacked."""
    if not isinstance(col, list):
        return col
    if not (col and is_device_array(col[0])):
        return np.asarray(col)
    stacked = stack_if_uniform(col)
    if isinstance(stacked, list):
        raise ValueError(f"{stage}: the rows of {name!r} differ in shape or type")
    return stacked


class CastParams(StageParams):
    """Cast ``input`` to ``datatype`` (an Open Inference Protocol name)."""

    input: str
    datatype: str


class Cast(_DeviceStage):
    """Convert a stacked numeric column to another datatype."""

    Params: ClassVar[type[StageParams]] = CastParams
    name = "cast"

    def __init__(self, params: CastParams) -> None:
        super().__init__(params)
        self.p = params
        if params.datatype not in DATATYPES or params.datatype == "BYTES":
            raise GraphError(f"cast: {params.datatype!r} is not a numeric datatype")
        self.dtype = numpy_dtype(params.datatype)

    def signature(self, inputs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        """Same shape, new datatype."""
        spec = require(inputs, self.p.input, self.name)
        if spec.datatype == "BYTES":
            raise GraphError(f"cast: {self.p.input!r} is BYTES; decode it first")
        out = dict(inputs)
        out[self.p.input] = TensorSpec(self.p.datatype, spec.shape)
        return out

    def process(self, batch: Batch) -> Batch:
        """Cast the whole column at once, on the device it is on."""
        col = batch.columns[self.p.input]
        columns = dict(batch.columns)
        with self.on_device(col):
            columns[self.p.input] = astype(_stacked(col, self.name, self.p.input), self.dtype)
        return batch.with_columns(columns)


class RenameParams(StageParams):
    """Rename column ``input`` to ``output``."""

    input: str
    output: str


class Rename(StageBase):
    """Give a column the name the model (or the result) expects."""

    Params: ClassVar[type[StageParams]] = RenameParams
    name = "rename"
    takes_device_arrays: ClassVar[bool] = True  # it never looks inside the column

    def __init__(self, params: RenameParams) -> None:
        super().__init__(params)
        self.p = params

    def signature(self, inputs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        """The same specs under the new name."""
        spec = require(inputs, self.p.input, self.name)
        out = {k: v for k, v in inputs.items() if k != self.p.input}
        out[self.p.output] = spec
        return out

    def process(self, batch: Batch) -> Batch:
        """Move the column."""
        columns = {k: v for k, v in batch.columns.items() if k != self.p.input}
        columns[self.p.output] = batch.columns[self.p.input]
        return batch.with_columns(columns)


def _reject_rows(bad: Any, reason: str, what: str) -> dict[int, tuple[str, str]]:
    """Failures for the rows with a bad element (``bad``: per element, rows first).

    Counted where ``bad`` is; only one count per row comes to the host.
    """
    counts = bad
    if bad.ndim > 1:  # torch reads an empty axis tuple as "every axis"
        counts = array_namespace(bad).sum(bad, axis=tuple(range(1, bad.ndim)))
    return {i: (reason, f"{int(n)} {what}") for i, n in enumerate(counts.tolist()) if n}


class ScaleParams(StageParams):
    """``output = input * factor + offset`` as ``datatype`` (default: in place, FP32)."""

    input: str
    output: str | None = None
    factor: float = 1.0
    """Multiplies every value."""
    offset: float = 0.0
    """Added after the factor."""
    datatype: str = "FP32"


class Scale(_DeviceStage):
    """An affine map of a numeric column into a float or integer datatype.

    A model fed NaN or infinity computes garbage without failing, so a row whose result is
    not finite is rejected (``non_finite``). Integer outputs are rounded to the nearest
    value (half to even); a row with a value outside the datatype's range is rejected
    (``out_of_range``) instead of wrapping around silently.
    """

    Params: ClassVar[type[StageParams]] = ScaleParams
    name = "scale"

    def __init__(self, params: ScaleParams) -> None:
        super().__init__(params)
        self.p = params
        self.out = params.output or params.input
        if params.datatype not in DATATYPES or params.datatype in ("BYTES", "BOOL"):
            raise GraphError(f"scale: {params.datatype!r} is not a numeric datatype")
        if not (math.isfinite(params.factor) and math.isfinite(params.offset)):
            raise GraphError("scale: factor and offset must be finite numbers")
        self.dtype = numpy_dtype(params.datatype)

    def signature(self, inputs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        """Same shape, the new datatype."""
        spec = require(inputs, self.p.input, self.name)
        if spec.datatype == "BYTES":
            raise GraphError(f"scale: {self.p.input!r} is BYTES; decode it first")
        out = {k: v for k, v in inputs.items() if k != self.p.input}
        out[self.out] = TensorSpec(self.p.datatype, spec.shape)
        return out

    def process(self, batch: Batch) -> Batch:
        """Scale the stacked column at once (or each row of a list column)."""
        col = batch.columns[self.p.input]
        with self.on_device(col):
            return self._process(batch, col)

    def _process(self, batch: Batch, col: Column) -> Batch:
        failures: dict[int, tuple[str, str]] = {}
        if not isinstance(col, list):
            y, bad = self._scale(col)
            failures = _reject_rows(bad, *self._why())
            result: Column = y
        else:
            rows: list[Any] = []
            for i, row in enumerate(col):
                y, bad = self._scale(row if is_device_array(row) else np.asarray(row))
                xp = array_namespace(bad)
                if bool(xp.any(bad)):
                    reason, what = self._why()
                    failures[i] = (reason, f"{int(xp.sum(bad))} {what}")
                rows.append(y)
            result = stack_if_uniform(rows)
        columns = {k: v for k, v in batch.columns.items() if k != self.p.input}
        columns[self.out] = result
        return batch.with_columns(columns).reject(failures)

    def _why(self) -> tuple[str, str]:
        if self.dtype.kind == "f":
            return "non_finite", f"elements not finite after scaling to {self.p.datatype}"
        return "out_of_range", f"elements not finite or outside the range of {self.p.datatype}"

    def _scale(self, x: Any) -> tuple[Any, Any]:
        """The scaled array and a mask of its bad elements (those are zero in the array).

        In ``x``'s own library and on its device. Python floats as factor and offset: the
        array's float type takes them as its own (NumPy 2's promotion rules, NumPy 1's
        value-based casting and torch alike), as the NumPy scalars were taken before.
        """
        xp = array_namespace(x)
        if self.dtype.kind == "f" and self.dtype.itemsize <= 4:
            # As precise as the input needs: float32 for images, float64 for int32/64 or FP64.
            work = np.result_type(host_dtype(x), np.float32)
        else:
            work = np.dtype(np.float64)  # FP64 and integer outputs: round from float64
        y = astype(x, work)  # a copy: the in-place steps below never touch the input
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is caught as non-finite
            if self.p.factor != 1.0:
                y *= self.p.factor
            if self.p.offset != 0.0:
                y += self.p.offset
            if self.dtype.kind == "f":
                out = astype(y, self.dtype)
        if self.dtype.kind == "f":
            bad = ~xp.isfinite(out)
        else:
            y = xp.round(y)  # half to even, as np.rint
            info = np.iinfo(self.dtype)
            # float(info.max) rounds up for 64-bit types: that value itself is then too large.
            hi = float(info.max)
            too_big = y >= hi if int(hi) > info.max else y > hi
            bad = ~xp.isfinite(y) | (y < float(info.min)) | too_big
            y[bad] = 0
            out = astype(y, self.dtype)
        if bool(xp.any(bad)):
            out[bad] = 0
        return out, bad


class PadCropParams(StageParams):
    """Pad or crop each row of ``input`` to ``shape`` (``null`` keeps a dimension as it is).

    ``align``: ``start`` keeps the beginning of each dimension and pads at its end;
    ``center`` splits padding and cropping between both sides (the extra one at the end).
    """

    input: str
    output: str | None = None
    shape: tuple[Annotated[int, Field(ge=1)] | None, ...] = Field(min_length=1)
    value: float = 0.0
    """What padding fills in."""
    align: Literal["start", "center"] = "start"


class PadCrop(_DeviceStage):
    """Bring rows to one fixed shape, so the batch stacks and the model sees what it expects.

    Padding elements are counted in `Batch.padded_elements`: the padding-waste metric
    compares them with the real elements the model was fed.
    """

    Params: ClassVar[type[StageParams]] = PadCropParams
    name = "pad_crop"

    def __init__(self, params: PadCropParams) -> None:
        super().__init__(params)
        self.p = params
        self.out = params.output or params.input

    def signature(self, inputs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        """Same datatype; the fixed dimensions of ``shape``, the others as they were."""
        spec = require(inputs, self.p.input, self.name)
        if spec.datatype == "BYTES":
            raise GraphError(f"pad_crop: {self.p.input!r} is BYTES; decode it first")
        if len(spec.shape) != len(self.p.shape):
            raise GraphError(
                f"pad_crop: shape has {len(self.p.shape)} dimensions but {self.p.input!r} "
                f"has {len(spec.shape)}: {spec}"
            )
        if not _fits(self.p.value, numpy_dtype(spec.datatype)):
            raise GraphError(f"pad_crop: pad value {self.p.value} does not fit {spec.datatype}")
        out = {k: v for k, v in inputs.items() if k != self.p.input}
        dims = tuple(s if t is None else t for s, t in zip(spec.shape, self.p.shape, strict=True))
        out[self.out] = TensorSpec(spec.datatype, dims)
        return out

    def process(self, batch: Batch) -> Batch:
        """One slice copy for a stacked column; row by row for a list column."""
        col = batch.columns[self.p.input]
        with self.on_device(col):
            return self._process(batch, col)

    def _process(self, batch: Batch, col: Column) -> Batch:
        failures: dict[int, tuple[str, str]] = {}
        padded = 0
        rank = len(self.p.shape)
        if not isinstance(col, list):
            if col.ndim - 1 != rank:
                message = f"row has {col.ndim - 1} dimensions, pad_crop wants {rank}"
                failures = {i: ("bad_shape", message) for i in range(len(batch))}
                result: Column = col
            else:
                result, added = self._pad_crop(col, tuple(col.shape[1:]))
                padded = added * len(batch)
        else:
            rows: list[Any] = []
            for i, row in enumerate(col):
                arr = row if is_device_array(row) else np.asarray(row)
                if arr.ndim != rank:
                    failures[i] = ("bad_shape", f"row has {arr.ndim} dimensions, want {rank}")
                    rows.append(arr)
                    continue
                fixed, added = self._pad_crop(arr[None], tuple(arr.shape))
                rows.append(fixed[0])
                padded += added
            result = rows
        columns = {k: v for k, v in batch.columns.items() if k != self.p.input}
        columns[self.out] = result
        out = batch.with_columns(columns).reject(failures)
        if isinstance(result, list):
            out.columns[self.out] = stack_if_uniform(list(out.columns[self.out]))
        out.padded_elements += padded
        return out

    def _pad_crop(self, x: Any, shape: tuple[int, ...]) -> tuple[Any, int]:
        """``x`` ([rows, *shape]) at the target shape, and the padding elements per row."""
        target = tuple(s if t is None else t for s, t in zip(shape, self.p.shape, strict=True))
        if target == shape:
            return x, 0
        src: list[slice] = [slice(None)]
        dst: list[slice] = [slice(None)]
        for have, want in zip(shape, target, strict=True):
            keep = min(have, want)
            skip_in = 0 if self.p.align == "start" else (have - keep) // 2
            skip_out = 0 if self.p.align == "start" else (want - keep) // 2
            src.append(slice(skip_in, skip_in + keep))
            dst.append(slice(skip_out, skip_out + keep))
        out = _full(x, (x.shape[0], *target), self.p.value)
        out[tuple(dst)] = x[tuple(src)]
        kept = math.prod(min(h, w) for h, w in zip(shape, target, strict=True))
        return out, math.prod(target) - kept


def _full(like: Any, shape: tuple[int, ...], value: float) -> Any:
    """An array of ``shape`` filled with ``value``, of ``like``'s dtype, library and device.

    NumPy and CuPy allocate on the current device (`_device_work` made it ``like``'s);
    torch and the array API standard are told the device.
    """
    xp = array_namespace(like)
    if xp is np or type(like).__module__.partition(".")[0] == "cupy":
        return xp.full(shape, value, dtype=like.dtype)
    return xp.full(shape, value, dtype=like.dtype, device=like.device)


def _fits(value: float, dtype: np.dtype[Any]) -> bool:
    """Whether ``value`` can fill a ``dtype`` array without wrapping, truncating or overflowing.

    Integer types need a whole number in their range, BOOL needs 0 or 1, float types take
    any value that does not overflow them (NaN and infinity included).
    """
    if dtype.kind == "f":
        if not math.isfinite(value):
            return True
        with np.errstate(over="ignore"):
            return bool(np.isfinite(dtype.type(value)))
    if dtype.kind == "b":
        return value in (0.0, 1.0)
    if not value.is_integer():
        return False
    info = np.iinfo(dtype)
    return info.min <= int(value) <= info.max
