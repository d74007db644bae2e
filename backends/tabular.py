"""Tabular models (tree ensembles, scikit-learn estimators): what their backends share.

A tabular model answers rows of F numeric features. Its signature, per row:

- inputs, by ``options.features``: ``row`` (the default): one ``features`` FP32[F], the
  values in the model's own feature order; ``named``: one FP32[1] tensor per feature,
  named as the model names them, which the backend stacks in that order. With ``named``
  the pipeline's routing refuses a request missing a feature or carrying one the model
  does not know, naming it (``bad_tensor`` dead letter), before it joins a batch.
- outputs: a classifier answers ``probabilities`` FP32[C] (the library's
  ``predict_proba``: one column per class, in the model's class order) and ``label``
  (INT64[1], or BYTES[1] for classes that are not integers: the class the library's
  ``predict`` gives); a regressor answers ``prediction`` FP32[K] (K targets, usually 1).
  Tree ensembles answer ``margin`` FP32[M] too where ``options.margin`` asks: the raw
  score before the link function (``output_margin`` in XGBoost, ``raw_score`` in
  LightGBM), at the cost of a second prediction pass.

The model's feature names travel in `ModelInfo.feature_names` (``kp-pipeline validate``
prints them); a model that records none has names ``f0`` … ``f{F-1}`` only in the ``row``
form, and ``named`` is refused for it. Rows arrive as float32 (what the wire carries) and
are given to the library as such; every library here predicts from float32 exactly as
from the float64 it was trained on, because tree split thresholds are float32 (checked
by the parity tests against ``predict``/``predict_proba`` on the same rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field

from backends.base import ModelInfo, TensorBatch
from backends.options import StrictOptions
from schemas.errors import BackendError
from schemas.tensors import TensorSpec

__all__ = [
    "TabularBackend",
    "TabularOptions",
    "TabularSignature",
    "TreeOptions",
    "class_answers",
    "class_labels",
    "feature_names",
    "rows_of",
    "signature",
]

FEATURES = "features"


class TabularOptions(StrictOptions):
    """The options every tabular backend takes."""

    features: Literal["row", "named"] = Field(
        "row",
        description="row: one FP32[F] 'features' tensor per request; named: one FP32[1] "
        "tensor per feature, named as the model names them.",
    )
    threads: int = Field(0, ge=0, description="Threads per prediction (0: the library's).")


class TreeOptions(TabularOptions):
    """A tree ensemble's options: the tabular ones, and whether to answer the margin."""

    margin: bool = Field(
        False,
        description="Also answer 'margin', the raw score before the link function (one more "
        "prediction pass per batch).",
    )


class TabularSignature:
    """A loaded tabular model's names and shapes, and how a batch becomes its rows."""

    def __init__(
        self,
        names: Sequence[str],
        form: str,
        outputs: dict[str, TensorSpec],
        recorded: bool,
    ) -> None:
        self.names = tuple(names)
        self.form = form
        self.outputs = outputs
        if form == "named" and not recorded:
            raise BackendError(
                "options.features: named needs the model's feature names and this model "
                f"records none (it takes {len(self.names)} unnamed features); use "
                "features: row, or save the model with feature names"
            )

    def info(self, device: str) -> ModelInfo:
        """The `ModelInfo` of this signature on ``device``."""
        if self.form == "named":
            inputs = {n: TensorSpec("FP32", (1,)) for n in self.names}
        else:
            inputs = {FEATURES: TensorSpec("FP32", (len(self.names),))}
        return ModelInfo(inputs, dict(self.outputs), None, device, feature_names=self.names)

    def rows(self, batch: TensorBatch) -> np.ndarray[Any, Any]:
        """The batch as an (n, F) float32 matrix in the model's feature order."""
        if self.form == "row":
            return np.ascontiguousarray(np.asarray(batch[FEATURES]), dtype=np.float32)
        columns = [np.asarray(batch[n]).reshape(-1) for n in self.names]
        return np.ascontiguousarray(np.stack(columns, axis=1), dtype=np.float32)


def signature(
    names: Sequence[str] | None,
    n_features: int,
    form: str,
    outputs: dict[str, TensorSpec],
) -> TabularSignature:
    """A `TabularSignature` from what the model recorded (``names`` may be None)."""
    recorded = names is not None and len(names) > 0
    listed = list(names) if recorded and names is not None else feature_names(n_features)
    if len(listed) != n_features:
        raise BackendError(
            f"the model names {len(listed)} features but takes {n_features}: a broken file"
        )
    return TabularSignature(listed, form, outputs, recorded)


def feature_names(n: int) -> list[str]:
    """The names of ``n`` unnamed features: f0 … f{n-1} (XGBoost's own convention)."""
    return [f"f{i}" for i in range(n)]


def rows_of(batch: TensorBatch) -> int:
    """How many rows a batch holds."""
    return len(next(iter(batch.values())))


def class_labels(classes: Any) -> tuple[str, np.ndarray[Any, Any]]:
    """The ``label`` output's datatype and the per-class values it publishes."""
    values = np.asarray(classes)
    if np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.bool_):
        return "INT64", values.astype(np.int64)
    if np.issubdtype(values.dtype, np.floating) and np.all(values == np.round(values)):
        return "INT64", values.astype(np.int64)
    return "BYTES", np.array([str(v).encode() for v in values], dtype=object)


def classifier_outputs(n_classes: int, label_type: str, margins: int | None) -> dict[str, Any]:
    """A classifier's output specs; ``margins``: the margin's width, None for no margin."""
    out = {
        "probabilities": TensorSpec("FP32", (n_classes,)),
        "label": TensorSpec(label_type, (1,)),
    }
    if margins is not None:
        out["margin"] = TensorSpec("FP32", (margins,))
    return out


def regressor_outputs(targets: int, margins: int | None) -> dict[str, Any]:
    """A regressor's output specs."""
    out = {"prediction": TensorSpec("FP32", (targets,))}
    if margins is not None:
        out["margin"] = TensorSpec("FP32", (margins,))
    return out


def as_columns(values: Any, n: int) -> np.ndarray[Any, Any]:
    """A prediction of ``n`` rows as (n, k) float32: a 1-D answer becomes one column."""
    arr = np.asarray(values, dtype=np.float32)
    return arr.reshape(n, -1)


class TabularBackend:
    """What the tabular backends share: the loaded model, its signature, and unloading."""

    def __init__(self) -> None:
        self._model: Any = None
        self._signature: TabularSignature | None = None

    def _loaded(self, batch: TensorBatch) -> tuple[Any, TabularSignature, np.ndarray[Any, Any]]:
        """The model, its signature and the batch as rows; asserts `load` came first."""
        model, sig = self._model, self._signature
        assert model is not None, "infer before load"
        assert sig is not None, "infer before load"
        return model, sig, sig.rows(batch)

    def unload(self) -> None:
        """Drop the model."""
        self._model = None


def class_answers(answer: Any, n: int, binary: bool) -> dict[str, np.ndarray[Any, Any]]:
    """``probabilities`` and ``label`` from a booster's prediction of ``n`` rows.

    ``binary``: the prediction is class 1's probability (one column), as XGBoost's
    ``binary:logistic`` and LightGBM's ``binary`` give it; else one column per class.
    The label is what the libraries' classifiers' ``predict`` gives: p > 0.5, or argmax.
    """
    p = as_columns(answer, n)
    if binary:
        return {
            "probabilities": np.concatenate([1.0 - p, p], axis=1),
            "label": (p > 0.5).astype(np.int64),
        }
    return {"probabilities": p, "label": np.argmax(p, axis=1).astype(np.int64).reshape(n, 1)}
