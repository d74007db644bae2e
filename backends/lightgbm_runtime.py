"""LightGBM: boosters in LightGBM's text model format (``Booster.save_model``), CPU only.

Options: `backends.tabular.TreeOptions` (``features``, ``threads`` as ``num_threads``,
``margin``). The signature
comes from the booster: its feature names and count, and its objective: ``binary`` and
``multiclass``/``multiclassova`` are classifiers (``probabilities`` as
``LGBMClassifier.predict_proba`` gives them, ``label`` its ``predict``), every other
objective a regressor (``prediction``, as ``Booster.predict``); ``margin`` is
``raw_score``.

On the device: LightGBM's own GPU builds accelerate training, not prediction, and are
not on PyPI; ``cuda`` devices are refused at start. A LightGBM model that must run on a
GPU is converted to ONNX (onnxmltools) and served with ``onnxruntime`` on CUDA.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from backends.base import ModelInfo, ModelSpec, Probe, TensorBatch
from backends.devices import resolve_device
from backends.options import parse_options
from backends.tabular import (
    TabularBackend,
    TreeOptions,
    as_columns,
    class_answers,
    classifier_outputs,
    regressor_outputs,
    signature,
)
from schemas.errors import BackendError

__all__ = ["LightGBMBackend"]

_HINT = "pip install 'kp-pipeline[tabular]'"


class LightGBMBackend(TabularBackend):
    """One LightGBM booster instance."""

    Options = TreeOptions  # the model's ``options`` section (docs, ``kp-pipeline schema``)

    def __init__(self) -> None:
        super().__init__()
        self._kind = ""
        self._threads = 0

    @classmethod
    def probe(cls) -> Probe:
        """Usable wherever lightgbm imports (prediction on the CPU)."""
        try:
            import lightgbm
        except ImportError as e:
            return Probe(False, f"lightgbm does not import ({e}): {_HINT}")
        return Probe(True, f"lightgbm {lightgbm.__version__}; CPU")

    def load(self, spec: ModelSpec, device: str) -> ModelInfo:
        """Load the booster and read its signature from it."""
        try:
            import lightgbm
        except ImportError:
            raise BackendError(f"lightgbm is not installed: {_HINT}") from None
        options = parse_options(TreeOptions, spec, "lightgbm")
        place = resolve_device(device, 0, "lightgbm (its prediction runs on the CPU only)")
        try:
            booster = lightgbm.Booster(model_file=str(spec.artifact))
        except lightgbm.basic.LightGBMError as e:
            raise BackendError(f"{spec.artifact} is not a LightGBM text model: {e}") from None
        dump = booster.dump_model(num_iteration=0)
        objective = str(dump.get("objective", "regression")).split()[0]
        classes = int(dump.get("num_class", 1))
        margin = options.margin
        if objective == "binary":
            self._kind = "binary"
            outputs = classifier_outputs(2, "INT64", 1 if margin else None)
        elif objective in ("multiclass", "multiclassova"):
            self._kind = "multiclass"
            outputs = classifier_outputs(classes, "INT64", classes if margin else None)
        else:
            self._kind = "regression"
            outputs = regressor_outputs(1, 1 if margin else None)
        self._signature = signature(
            booster.feature_name(), booster.num_feature(), options.features, outputs
        )
        self._model, self._threads = booster, options.threads
        return self._signature.info(place)

    def infer(self, batch: TensorBatch) -> dict[str, np.ndarray[Any, Any]]:
        """Predict one batch of rows."""
        booster, sig, x = self._loaded(batch)
        n = len(x)
        kw: dict[str, Any] = {"num_threads": self._threads} if self._threads else {}
        out = {}
        if "margin" in sig.outputs:
            out["margin"] = as_columns(booster.predict(x, raw_score=True, **kw), n)
        answer = booster.predict(x, **kw)
        if self._kind == "regression":
            out["prediction"] = as_columns(answer, n)
        else:
            out.update(class_answers(answer, n, self._kind == "binary"))
        return out
