"""Stages for plain tensors: cast, rename, scale (affine map), pad or crop to a shape."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from schemas.errors import GraphError
from schemas.tensors import DATATYPES, TensorSpec, numpy_dtype
from stages.base import Batch, Column, StageBase, StageParams, require, stack_if_uniform

__all__ = ["Cast", "PadCrop", "Rename", "Scale"]


class CastParams(StageParams):
    """Cast ``input`` to ``datatype`` (an Open Inference Protocol name)."""

    input: str
    datatype: str


class Cast(StageBase):
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
        """Cast the whole column at once."""
        columns = dict(batch.columns)
        columns[self.p.input] = np.asarray(batch.columns[self.p.input]).astype(self.dtype)
        return batch.with_columns(columns)


class RenameParams(StageParams):
    """Rename column ``input`` to ``output``."""

    input: str
    output: str


class Rename(StageBase):
    """Give a column the name the model (or the result) expects."""

    Params: ClassVar[type[StageParams]] = RenameParams
    name = "rename"

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


def _reject_rows(bad: np.ndarray[Any, Any], reason: str, what: str) -> dict[int, tuple[str, str]]:
    """Failures for the rows with a bad element (``bad``: per element, rows first)."""
    counts = bad.sum(axis=tuple(range(1, bad.ndim)))
    return {int(i): (reason, f"{int(counts[i])} {what}") for i in np.flatnonzero(counts)}


class ScaleParams(StageParams):
    """``output = input * factor + offset`` as ``datatype`` (default: in place, FP32)."""

    input: str
    output: str | None = None
    factor: float = 1.0
    offset: float = 0.0
    datatype: str = "FP32"


class Scale(StageBase):
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
        failures: dict[int, tuple[str, str]] = {}
        if isinstance(col, np.ndarray):
            y, bad = self._scale(col)
            failures = _reject_rows(bad, *self._why())
            result: Column = y
        else:
            rows: list[Any] = []
            for i, row in enumerate(col):
                y, bad = self._scale(np.asarray(row))
                if bad.any():
                    reason, what = self._why()
                    failures[i] = (reason, f"{int(bad.sum())} {what}")
                rows.append(y)
            result = stack_if_uniform(rows)
        columns = {k: v for k, v in batch.columns.items() if k != self.p.input}
        columns[self.out] = result
        return batch.with_columns(columns).reject(failures)

    def _why(self) -> tuple[str, str]:
        if self.dtype.kind == "f":
            return "non_finite", f"elements not finite after scaling to {self.p.datatype}"
        return "out_of_range", f"elements not finite or outside the range of {self.p.datatype}"

    def _scale(self, x: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        """The scaled array and a mask of its bad elements (those are zero in the array)."""
        if self.dtype.kind == "f" and self.dtype.itemsize <= 4:
            # As precise as the input needs: float32 for images, float64 for int32/64 or FP64.
            work = np.result_type(x.dtype, np.float32)
        else:
            work = np.dtype(np.float64)  # FP64 and integer outputs: round from float64
        y = x.astype(work)  # a copy: the in-place steps below never touch the input
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is caught as non-finite
            if self.p.factor != 1.0:
                y *= work.type(self.p.factor)
            if self.p.offset != 0.0:
                y += work.type(self.p.offset)
            if self.dtype.kind == "f":
                out = y.astype(self.dtype)
        if self.dtype.kind == "f":
            bad = ~np.isfinite(out)
        else:
            np.rint(y, out=y)
            info = np.iinfo(self.dtype)
            # float(info.max) rounds up for 64-bit types: that value itself is then too large.
            hi = float(info.max)
            too_big = y >= hi if int(hi) > info.max else y > hi
            bad = ~np.isfinite(y) | (y < float(info.min)) | too_big
            y[bad] = 0
            out = y.astype(self.dtype)
        if bad.any():
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
    align: Literal["start", "center"] = "start"


class PadCrop(StageBase):
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
        failures: dict[int, tuple[str, str]] = {}
        padded = 0
        rank = len(self.p.shape)
        if isinstance(col, np.ndarray):
            if col.ndim - 1 != rank:
                message = f"row has {col.ndim - 1} dimensions, pad_crop wants {rank}"
                failures = {i: ("bad_shape", message) for i in range(len(batch))}
                result: Column = col
            else:
                result, added = self._pad_crop(col, col.shape[1:])
                padded = added * len(batch)
        else:
            rows: list[Any] = []
            for i, row in enumerate(col):
                arr = np.asarray(row)
                if arr.ndim != rank:
                    failures[i] = ("bad_shape", f"row has {arr.ndim} dimensions, want {rank}")
                    rows.append(arr)
                    continue
                fixed, added = self._pad_crop(arr[None], arr.shape)
                rows.append(fixed[0])
                padded += added
            result = rows
        columns = {k: v for k, v in batch.columns.items() if k != self.p.input}
        columns[self.out] = result
        out = batch.with_columns(columns).reject(failures)
        if not isinstance(result, np.ndarray):
            out.columns[self.out] = stack_if_uniform(list(out.columns[self.out]))
        out.padded_elements += padded
        return out

    def _pad_crop(
        self, x: np.ndarray[Any, Any], shape: tuple[int, ...]
    ) -> tuple[np.ndarray[Any, Any], int]:
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
        out = np.full((x.shape[0], *target), self.p.value, dtype=x.dtype)
        out[tuple(dst)] = x[tuple(src)]
        kept = math.prod(min(h, w) for h, w in zip(shape, target, strict=True))
        return out, math.prod(target) - kept


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
