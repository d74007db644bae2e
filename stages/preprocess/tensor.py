"""Stages for plain tensors: cast a column's datatype, rename a column."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import numpy as np

from pipeline.errors import GraphError
from pipeline.tensors import DATATYPES, TensorSpec, numpy_dtype
from stages.base import Batch, StageBase, StageParams, require

__all__ = ["Cast", "Rename"]


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
