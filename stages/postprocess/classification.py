"""Classification postprocessing: softmax over logits; top-k, argmax and threshold with labels.

Every stage here that picks classes writes the same three kinds of column: class indices
(INT64), their scores (FP32) and, when a labels file is given, their names (BYTES).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from schemas.errors import GraphError
from schemas.tensors import TensorSpec, numpy_dtype
from stages.base import Batch, StageBase, StageContext, StageParams, require

__all__ = ["Argmax", "Softmax", "Threshold", "TopK", "load_labels"]


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
    """The column of the k best class indices (INT64)."""
    scores_output: str = "scores"
    """The column of their scores (FP32), best first."""
    labels_output: str = "labels"
    """The column of their names (BYTES), with ``labels``."""
    keep_input: bool = False


def load_labels(path: Path) -> list[str]:
    """Class names, one per line; blank trailing lines ignored."""
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _read_labels(labels: Path | None, ctx: StageContext, stage: str) -> np.ndarray[Any, Any] | None:
    """The names of a labels file as a BYTES array, or None without one."""
    if labels is None:
        return None
    path = labels if labels.is_absolute() else ctx.base_dir / labels
    try:
        names = load_labels(path)
    except OSError as e:
        raise GraphError(f"{stage}: cannot read labels {path}: {e.strerror}") from None
    return np.array([n.encode() for n in names], dtype=object)


def _check_labels(
    labels: np.ndarray[Any, Any] | None, n: int | None, name: str, stage: str
) -> None:
    if labels is not None and n is not None and len(labels) != n:
        raise GraphError(f"{stage}: {len(labels)} labels for {n} classes in {name!r}")


def _unusable_rows(
    x: np.ndarray[Any, Any], labels: np.ndarray[Any, Any] | None
) -> dict[int, tuple[str, str]]:
    """Rows no class can be picked from: NaN scores, or a class count the labels do not fit.

    A NaN compares false with everything, so argmax and thresholds would pick silently
    wrong classes; the row is rejected instead. The class count is only known here when
    the model declared it free (``None``) and the signature could not check it.
    """
    if labels is not None and x.shape[1] != len(labels):
        message = f"{x.shape[1]} classes but {len(labels)} labels"
        return {i: ("class_count", message) for i in range(len(x))}
    nans = np.isnan(x).sum(axis=1)
    return {int(i): ("nan_score", f"{int(nans[i])} NaN scores") for i in np.flatnonzero(nans)}


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
        self.labels = _read_labels(self.p.labels, ctx, self.name)

    def signature(self, inputs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        """A class-score vector in; classes, scores (and labels) of length k out."""
        spec = _need_vector(inputs, self.p.input, self.name)
        n = spec.shape[0]
        if n is not None and self.p.k > n:
            raise GraphError(f"topk: k={self.p.k} is more than the {n} classes of {self.p.input!r}")
        _check_labels(self.labels, n, self.p.input, self.name)
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


class ArgmaxParams(StageParams):
    """The best class of ``input``, its score and (optionally) its name from ``labels``.

    ``labels`` is a text file with one class name per line, relative to the topology file.
    """

    input: str
    labels: Path | None = None
    class_output: str = "class"
    """The column of the best class index (INT64)."""
    score_output: str = "score"
    """The column of its score (FP32)."""
    label_output: str = "label"
    """The column of its name (BYTES), with ``labels``."""
    keep_input: bool = False


class Argmax(StageBase):
    """The best class per row: index (INT64), score (FP32), name (BYTES), each a scalar.

    Ties go to the lowest index, as in NumPy. A row with a NaN score is rejected
    (``nan_score``): its best class is not defined.
    """

    Params: ClassVar[type[StageParams]] = ArgmaxParams
    name = "argmax"

    def __init__(self, params: ArgmaxParams) -> None:
        super().__init__(params)
        self.p = params
        self.labels: np.ndarray[Any, Any] | None = None

    def setup(self, ctx: StageContext) -> None:
        """Read the label file, relative to the topology's folder."""
        self.labels = _read_labels(self.p.labels, ctx, self.name)

    def signature(self, inputs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        """A class-score vector in; a scalar class, score (and label) out."""
        spec = _need_vector(inputs, self.p.input, self.name)
        _check_labels(self.labels, spec.shape[0], self.p.input, self.name)
        out = (
            dict(inputs)
            if self.p.keep_input
            else {k: v for k, v in inputs.items() if k != self.p.input}
        )
        out[self.p.class_output] = TensorSpec("INT64", ())
        out[self.p.score_output] = TensorSpec("FP32", ())
        if self.labels is not None:
            out[self.p.label_output] = TensorSpec("BYTES", ())
        return out

    def process(self, batch: Batch) -> Batch:
        """One vectorised argmax over the batch, after rejecting unusable rows."""
        batch = batch.reject(_unusable_rows(np.asarray(batch.columns[self.p.input]), self.labels))
        x = np.asarray(batch.columns[self.p.input], dtype=np.float32)
        classes = x.argmax(axis=-1).astype(np.int64)
        columns = dict(batch.columns)
        if not self.p.keep_input:
            del columns[self.p.input]
        columns[self.p.class_output] = classes
        columns[self.p.score_output] = np.take_along_axis(x, classes[:, None], axis=-1)[:, 0]
        if self.labels is not None:
            columns[self.p.label_output] = self.labels[classes]
        return batch.with_columns(columns)


class ThresholdParams(StageParams):
    """The classes of ``input`` whose score is at least ``threshold``.

    ``threshold`` is one value for every class or a list with one per class. ``format``:

    - ``mask``: one column ``mask_output`` of shape [classes], 1/true where a class passes,
      in ``mask_datatype``.
    - ``classes``: like topk, ``classes_output`` (INT64), ``scores_output`` (FP32) and, with
      ``labels``, ``labels_output`` (BYTES), best first, of a fixed length ``max_classes``
      (default: the class count) so that results stack; slots past the passing classes hold
      class -1, score NaN and label ``b""``, and ``count_output`` (INT64, a scalar) says how
      many slots are real.
    """

    input: str
    threshold: float | list[float]
    format: Literal["mask", "classes"] = "mask"
    mask_output: str = "mask"
    mask_datatype: Literal["BOOL", "UINT8", "INT32", "INT64"] = "BOOL"
    max_classes: int | None = Field(None, ge=1)
    labels: Path | None = None
    classes_output: str = "classes"
    scores_output: str = "scores"
    labels_output: str = "labels"
    count_output: str = "count"
    keep_input: bool = False


class Threshold(StageBase):
    """Multi-label decisions: every class at or above its threshold, as a mask or a list.

    Scores are compared in float32, the precision they are kept in. A row with a NaN score
    is rejected (``nan_score``): NaN is never at or above anything, so the row would look
    like one where no class passed.
    """

    Params: ClassVar[type[StageParams]] = ThresholdParams
    name = "threshold"

    def __init__(self, params: ThresholdParams) -> None:
        super().__init__(params)
        self.p = params
        self.t = np.asarray(params.threshold, dtype=np.float32)
        if np.isnan(self.t).any():
            raise GraphError("threshold: a threshold is NaN")
        if self.t.ndim == 1 and len(self.t) == 0:
            raise GraphError("threshold: an empty list of thresholds")
        if params.format == "mask" and (params.labels or params.max_classes):
            raise GraphError("threshold: labels and max_classes need format: classes")
        self.labels: np.ndarray[Any, Any] | None = None

    def setup(self, ctx: StageContext) -> None:
        """Read the label file, relative to the topology's folder."""
        self.labels = _read_labels(self.p.labels, ctx, self.name)

    def signature(self, inputs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        """A class-score vector in; a mask of the same length, or padded class lists, out."""
        spec = _need_vector(inputs, self.p.input, self.name)
        n = spec.shape[0]
        if self.t.ndim == 1 and n is not None and len(self.t) != n:
            raise GraphError(
                f"threshold: {len(self.t)} thresholds for {n} classes in {self.p.input!r}"
            )
        _check_labels(self.labels, n, self.p.input, self.name)
        out = (
            dict(inputs)
            if self.p.keep_input
            else {k: v for k, v in inputs.items() if k != self.p.input}
        )
        if self.p.format == "mask":
            out[self.p.mask_output] = TensorSpec(self.p.mask_datatype, (n,))
            return out
        k = self.p.max_classes or n
        out[self.p.classes_output] = TensorSpec("INT64", (k,))
        out[self.p.scores_output] = TensorSpec("FP32", (k,))
        if self.labels is not None:
            out[self.p.labels_output] = TensorSpec("BYTES", (k,))
        out[self.p.count_output] = TensorSpec("INT64", ())
        return out

    def process(self, batch: Batch) -> Batch:
        """Compare the whole batch at once; for lists, sort passing classes first, best first."""
        x = np.asarray(batch.columns[self.p.input])
        if self.t.ndim == 1 and x.shape[1] != len(self.t):
            message = f"{x.shape[1]} classes but {len(self.t)} thresholds"
            failures = {i: ("class_count", message) for i in range(len(x))}
        else:
            failures = _unusable_rows(x, self.labels)
        batch = batch.reject(failures)
        if not batch.rows:  # nothing left to compare (and a wrong class count would not)
            return batch
        x = np.asarray(batch.columns[self.p.input], dtype=np.float32)
        passing = x >= self.t
        columns = dict(batch.columns)
        if not self.p.keep_input:
            del columns[self.p.input]
        if self.p.format == "mask":
            columns[self.p.mask_output] = passing.astype(
                numpy_dtype(self.p.mask_datatype), copy=False
            )
            return batch.with_columns(columns)
        rows, n = x.shape
        k = self.p.max_classes or n
        # Passing classes first (stable: lexsort's last key is the primary one), best first.
        order = np.lexsort((-x, ~passing), axis=-1)[:, : min(k, n)]
        count = np.minimum(passing.sum(axis=1), k).astype(np.int64)
        real = np.arange(k) < count[:, None]
        classes = np.full((rows, k), -1, np.int64)
        classes[:, : order.shape[1]] = order
        classes[~real] = -1
        scores = np.full((rows, k), np.nan, np.float32)
        scores[real] = x[np.nonzero(real)[0], classes[real]]
        columns[self.p.classes_output] = classes
        columns[self.p.scores_output] = scores
        if self.labels is not None:
            names = np.full((rows, k), b"", dtype=object)
            names[real] = self.labels[classes[real]]
            columns[self.p.labels_output] = names
        columns[self.p.count_output] = count
        return batch.with_columns(columns)
