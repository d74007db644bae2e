"""XGBoost: boosters in XGBoost's own formats (``.ubj`` UBJSON, ``.json``), CPU or GPU.

Options (the model's ``options`` section): `backends.tabular.TreeOptions` (``features``,
``threads`` as ``nthread``, ``margin``). The signature comes from the booster:
its feature names and count, and its objective: ``binary:logistic`` and
``multi:softprob`` are classifiers (``probabilities`` as ``XGBClassifier.predict_proba``
gives them, ``label`` its ``predict``), ``multi:softmax`` answers ``label`` only, every
other objective is a regressor (``prediction``, as ``Booster.predict``); ``margin`` is
``output_margin``. Predictions use ``inplace_predict`` (no DMatrix per
batch), which is what XGBoost's scikit-learn wrapper calls too.

``device: cuda:N`` sets the booster's ``device`` parameter, so XGBoost's GPU predictor
runs it; rows arrive from the host and XGBoost copies them. That needs an XGBoost built
with CUDA (the ``xgboost`` wheel on Linux; the ``xgboost-cpu`` wheel the CPU extra
installs has none and is refused for ``cuda`` at start). The GPU path is written against
XGBoost's documented parameters and has not run on the project's machines (no GPU there).
"""

from __future__ import annotations

import json
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

__all__ = ["XGBoostBackend"]

_HINT = "pip install 'kp-pipeline[tabular]' (xgboost-cpu), or xgboost for GPUs"


class XGBoostBackend(TabularBackend):
    """One XGBoost booster instance."""

    Options = TreeOptions  # the model's ``options`` section (docs, ``kp-pipeline schema``)

    def __init__(self) -> None:
        super().__init__()
        self._objective = ""

    @classmethod
    def probe(cls) -> Probe:
        """Usable wherever xgboost imports; says whether it was built with CUDA."""
        try:
            import xgboost
        except ImportError as e:
            return Probe(False, f"xgboost does not import ({e}): {_HINT}")
        cuda = xgboost.build_info().get("USE_CUDA", False)
        return Probe(True, f"xgboost {xgboost.__version__}; CUDA: {'yes' if cuda else 'no'}")

    def load(self, spec: ModelSpec, device: str) -> ModelInfo:
        """Load the booster, place it, and read its signature from it."""
        try:
            import xgboost
        except ImportError:
            raise BackendError(f"xgboost is not installed: {_HINT}") from None
        options = parse_options(TreeOptions, spec, "xgboost")
        place = resolve_device(device, None if _has_cuda(xgboost) else 0, "xgboost")
        try:
            booster = xgboost.Booster(model_file=str(spec.artifact))
        except xgboost.core.XGBoostError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BackendError(f"{spec.artifact} is not an XGBoost model: {first}") from None
        params: dict[str, Any] = {"device": place}
        if options.threads:
            params["nthread"] = options.threads
        booster.set_param(params)
        config = json.loads(booster.save_config())["learner"]
        self._objective = config["objective"]["name"]
        classes = int(config["learner_model_param"].get("num_class", "0") or 0)
        groups = max(1, classes)
        margin = groups if options.margin else None
        if self._objective in ("binary:logistic", "multi:softprob"):
            width = 2 if self._objective.startswith("binary") else classes
            outputs = classifier_outputs(width, "INT64", margin)
        elif self._objective == "multi:softmax":
            outputs = {"label": classifier_outputs(1, "INT64", None)["label"]}
            if margin is not None:
                outputs["margin"] = regressor_outputs(margin, None)["prediction"]
        else:
            targets = int(config["learner_model_param"].get("num_target", "1") or 1)
            outputs = regressor_outputs(targets, targets if options.margin else None)
        self._signature = signature(
            booster.feature_names, booster.num_features(), options.features, outputs
        )
        self._model = booster
        return self._signature.info(place)

    def infer(self, batch: TensorBatch) -> dict[str, np.ndarray[Any, Any]]:
        """Predict one batch of rows."""
        booster, sig, x = self._loaded(batch)
        n = len(x)
        out: dict[str, np.ndarray[Any, Any]] = {}
        if "margin" in sig.outputs:
            out["margin"] = as_columns(booster.inplace_predict(x, predict_type="margin"), n)
        answer = booster.inplace_predict(x)
        if self._objective in ("binary:logistic", "multi:softprob"):
            out.update(class_answers(answer, n, self._objective == "binary:logistic"))
        elif self._objective == "multi:softmax":  # predicts the class index itself
            out["label"] = as_columns(answer, n).astype(np.int64)
        else:
            out["prediction"] = as_columns(answer, n)
        return out


def _has_cuda(xgboost: Any) -> bool:
    return bool(xgboost.build_info().get("USE_CUDA", False))
