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
    TabularSignature,
    TreeOptions,
    as_columns,
    classifier_outputs,
    regressor_outputs,
    signature,
)
from schemas.errors import BackendError

__all__ = ["LightGBMBackend"]

_HINT = "pip install 'kp-pipeline[tabular]'"


class LightGBMBackend:
    """One LightGBM booster instance."""

    Options = TreeOptions  # the model's ``options`` section (docs, ``kp-pipeline schema``)

    def __init__(self) -> None:
        self._booster: Any = None
        self._signature: TabularSignature | None = None
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
        self._booster, self._threads = booster, options.threads
        return self._signature.info(place)

    def infer(self, batch: TensorBatch) -> dict[str, np.ndarray[Any, Any]]:
        """Predict one batch of rows."""
        sig, booster = self._signature, self._booster
        assert sig is not None, "infer before load"
        assert booster is not None, "infer before load"
        x = sig.rows(batch)
        n = len(x)
        kw: dict[str, Any] = {"num_threads": self._threads} if self._threads else {}
        out = {}
        if "margin" in sig.outputs:
            out["margin"] = as_columns(booster.predict(x, raw_score=True, **kw), n)
        answer = as_columns(booster.predict(x, **kw), n)
        if self._kind == "binary":
            out["probabilities"] = np.concatenate([1.0 - answer, answer], axis=1)
            out["label"] = (answer > 0.5).astype(np.int64)
        elif self._kind == "multiclass":
            out["probabilities"] = answer
            out["label"] = np.argmax(answer, axis=1).astype(np.int64).reshape(n, 1)
        else:
            out["prediction"] = answer
        return out

    def unload(self) -> None:
        """Drop the booster."""
        self._booster = None
