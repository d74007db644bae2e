"""Classification postprocessing: softmax over logits, top-k with label names."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from pipeline.errors import GraphError
from pipeline.tensors import TensorSpec
from stages.base import Batch, StageBase, StageContext, StageParams, require

__all__ = ["Softmax", "TopK", "load_labels"]


def _need_vector(inputs: Mapping[str, TensorSpec], name: str, stage: str) -> TensorSpec:
    spec = require(inputs, name, stage)
    if spec.datatype not in ("FP16", "FP32", "FP64") or len(spec.shape) != 1:
        raise GraphError(f"{stage}: {name!r} must be a float vector per row, got {spec}")
    return spec


class SoftmaxParams(StageParams):
    """Softmax over the last axis of ``input``, written to ``output`` (default: in place)."""

    input: str
    output: str | None = None


class Softmax(StageBase):
    """Numerically stable softmax, vectorised over the batch, in float32."""

    Params: ClassVar[type[StageParams]] = SoftmaxParams
    name = "softmax"

    def __init__(self, params: SoftmaxParams) -> None:
        super().__init__(params)
        self.p = params
        self.out = params.output or params.input

    def signature(self, inputs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        """A float vector in, an FP32 vector of the same length out."""
        spec = _need_vector(inputs, self.p.input, self.name)
        out = {k: v for k, v in inputs.items() if k != self.p.input}
        out[self.out] = TensorSpec("FP32", spec.shape)
        return out

    def process(self, batch: Batch) -> Batch:
        """exp(x - max) / sum, row by row in one vectorised pass."""
        x = np.asarray(batch.columns[self.p.input], dtype=np.float32)
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        e /= e.sum(axis=-1, keepdims=True)
        columns = {k: v for k, v in batch.columns.items() if k != self.p.input}
        columns[self.out] = e
        return batch.with_columns(columns)


class TopKParams(StageParams):
    """The ``k`` best classes of ``input`` with their scores and (optionally) names.

    ``labels`` is a text file with one class name per line, relative to the topology file.
    """

    input: str
    k: int = Field(5, ge=1)
    labels: Path | None = None
    classes_output: str = "classes"
    scores_output: str = "scores"
    labels_output: str = "labels"
    keep_input: bool = False


def load_labels(path: Path) -> list[str]:
    """Class names, one per line; blank trailing lines ignored."""
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


class TopK(StageBase):
    """Top-k indices (INT64), scores (FP32) and label names (BYTES), best first."""

    Params: ClassVar[type[StageParams]] = TopKParams
    name = "topk"

    def __init__(self, params: TopKParams) -> None:
        super().__init__(params)
        self.p = params
        self.labels: np.ndarray[Any, Any] | None = None

    def setup(self, ctx: StageContext) -> None:
        """Read the label file, relative to the topology's folder."""
        if self.p.labels is None:
            return
        path = self.p.labels if self.p.labels.is_absolute() else ctx.base_dir / self.p.labels
        try:
            names = load_labels(path)
        except OSError as e:
            raise GraphError(f"topk: cannot read labels {path}: {e.strerror}") from None
        self.labels = np.array([n.encode() for n in names], dtype=object)

    def signature(self, inputs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        """A class-score vector in; classes, scores (and labels) of length k out."""
        spec = _need_vector(inputs, self.p.input, self.name)
        n = spec.shape[0]
        if n is not None and self.p.k > n:
            raise GraphError(f"topk: k={self.p.k} is more than the {n} classes of {self.p.input!r}")
        if self.labels is not None and n is not None and len(self.labels) != n:
            raise GraphError(f"topk: {len(self.labels)} labels for {n} classes in {self.p.input!r}")
        out = (
            dict(inputs)
            if self.p.keep_input
            else {k: v for k, v in inputs.items() if k != self.p.input}
        )
        out[self.p.classes_output] = TensorSpec("INT64", (self.p.k,))
        out[self.p.scores_output] = TensorSpec("FP32", (self.p.k,))
        if self.labels is not None:
            out[self.p.labels_output] = TensorSpec("BYTES", (self.p.k,))
        return out

    def process(self, batch: Batch) -> Batch:
        """Partial sort per row (argpartition), then order the k survivors."""
        x = np.asarray(batch.columns[self.p.input], dtype=np.float32)
        k = self.p.k
        part = np.argpartition(-x, k - 1, axis=-1)[:, :k]
        part_scores = np.take_along_axis(x, part, axis=-1)
        order = np.argsort(-part_scores, axis=-1, kind="stable")
        classes = np.take_along_axis(part, order, axis=-1).astype(np.int64)
        columns = dict(batch.columns)
        if not self.p.keep_input:
            del columns[self.p.input]
        columns[self.p.classes_output] = classes
        columns[self.p.scores_output] = np.take_along_axis(part_scores, order, axis=-1)
        if self.labels is not None:
            columns[self.p.labels_output] = self.labels[classes]
        return batch.with_columns(columns)
