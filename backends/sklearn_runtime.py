"""scikit-learn: fitted estimators and pipelines, from skops files or trusted pickles.

Formats, as scikit-learn's documentation on model persistence gives them:

- ``.skops`` (skops.io): loads without running code from the file: skops rebuilds each
  object from the types the file names. scikit-learn's own types (``sklearn.*``) are
  taken as trusted besides skops' defaults (the library being served is trusted anyway);
  any other type the file names is refused, named, unless the topology sets
  ``trust_artifact: true``.
- pickle / joblib (``.pkl``, ``.pickle``, ``.joblib``): unpickling runs code from the
  file, so it is refused unless ``trust_artifact: true``; with ``sha256`` set the file's
  hash is checked before it is opened (`pipeline.serving.graph`), so only that file runs.

Options: `backends.tabular.TabularOptions` (``features``; ``threads`` is taken as a cap
on the BLAS/OpenMP threads of this instance's predictions, through threadpoolctl).
The signature comes from the estimator: ``n_features_in_`` and ``feature_names_in_``
(present when it was fitted on a DataFrame), ``classes_`` and ``predict_proba`` for a
classifier (``probabilities``, and ``label`` from ``predict``), else ``predict`` for a
regressor (``prediction``). CPU only: ``cuda`` devices are refused at start (a
scikit-learn model that must run on a GPU is converted to ONNX with skl2onnx and served
with ``onnxruntime`` on CUDA).
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from backends.base import ModelInfo, ModelSpec, Probe, TensorBatch
from backends.devices import resolve_device
from backends.options import parse_options
from backends.tabular import (
    TabularBackend,
    TabularOptions,
    as_columns,
    class_labels,
    classifier_outputs,
    regressor_outputs,
    signature,
)
from schemas.errors import BackendError

__all__ = ["PICKLE_SUFFIXES", "SklearnBackend"]

_HINT = "pip install 'kp-pipeline[tabular]'"
PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib")


class SklearnBackend(TabularBackend):
    """One fitted scikit-learn estimator instance."""

    Options = TabularOptions  # the model's ``options`` section (docs, ``kp-pipeline schema``)

    def __init__(self) -> None:
        super().__init__()
        self._labels: np.ndarray[Any, Any] | None = None
        self._threads = 0

    @classmethod
    def probe(cls) -> Probe:
        """Usable wherever scikit-learn imports (and skops, for .skops files)."""
        try:
            import sklearn
        except ImportError as e:
            return Probe(False, f"scikit-learn does not import ({e}): {_HINT}")
        try:
            import skops

            with_skops = f"skops {skops.__version__}"
        except ImportError:
            with_skops = "no skops (only trusted pickles load)"
        return Probe(True, f"scikit-learn {sklearn.__version__}, {with_skops}; CPU")

    def load(self, spec: ModelSpec, device: str) -> ModelInfo:
        """Load the estimator (refusing what would run untrusted code) and its signature."""
        options = parse_options(TabularOptions, spec, "sklearn")
        place = resolve_device(device, 0, "sklearn (it predicts on the CPU only)")
        model = _read(spec)
        if not hasattr(model, "predict") or not hasattr(model, "n_features_in_"):
            raise BackendError(
                f"{spec.artifact} holds a {type(model).__name__}, not a fitted estimator "
                "(no predict or n_features_in_)"
            )
        names = getattr(model, "feature_names_in_", None)
        if hasattr(model, "predict_proba") and hasattr(model, "classes_"):
            label_type, self._labels = class_labels(model.classes_)
            outputs = classifier_outputs(len(self._labels), label_type, None)
        else:
            targets = int(getattr(model, "n_outputs_", 1) or 1)
            outputs = regressor_outputs(targets, None)
        self._signature = signature(
            None if names is None else [str(n) for n in names],
            int(model.n_features_in_),
            options.features,
            outputs,
        )
        self._model, self._threads = model, options.threads
        return self._signature.info(place)

    def infer(self, batch: TensorBatch) -> dict[str, np.ndarray[Any, Any]]:
        """Predict one batch of rows, as the estimator's own methods do."""
        model, sig, x = self._loaded(batch)
        if sig.names and hasattr(model, "feature_names_in_"):
            x = _frame(x, sig.names)  # fitted on named columns: predict on named columns
        n = len(x)
        with self._limits():
            if self._labels is None:
                return {"prediction": as_columns(model.predict(x), n)}
            probs = as_columns(model.predict_proba(x), n)
            predicted = np.asarray(model.predict(x))
        index = {v: i for i, v in enumerate(model.classes_.tolist())}
        positions = np.fromiter((index[v] for v in predicted.tolist()), np.int64, n)
        return {"probabilities": probs, "label": self._labels[positions].reshape(n, 1)}

    def _limits(self) -> contextlib.AbstractContextManager[Any]:
        if not self._threads:
            return contextlib.nullcontext()
        from threadpoolctl import threadpool_limits

        limits: contextlib.AbstractContextManager[Any] = threadpool_limits(self._threads)
        return limits


def _read(spec: ModelSpec) -> Any:
    path = spec.artifact
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not spec.trust_artifact:
            raise BackendError(
                f"{path} is a pickle: loading it runs code from the file. Set trust_artifact: "
                "true (and sha256, so only this file runs) if you trust it, or save the model "
                "with skops (skops.io.dump) instead"
            )
        import joblib

        try:
            return joblib.load(path)
        except Exception as e:
            raise BackendError(f"{path} did not unpickle: {type(e).__name__}: {e}") from None
    try:
        import skops.io as sio
    except ImportError:
        raise BackendError(f"skops is not installed, and {path} needs it: {_HINT}") from None
    try:
        untrusted = sio.get_untrusted_types(file=path)
    except Exception as e:
        raise BackendError(f"{path} is not a skops file: {type(e).__name__}: {e}") from None
    foreign = [t for t in untrusted if not t.startswith("sklearn.")]
    if foreign and not spec.trust_artifact:
        raise BackendError(
            f"{path} holds types that are not scikit-learn's: {', '.join(foreign)}. "
            "Set trust_artifact: true if you trust them"
        )
    try:
        return sio.load(path, trusted=untrusted or None)
    except Exception as e:
        raise BackendError(f"{path} did not load: {type(e).__name__}: {e}") from None


def _frame(x: np.ndarray[Any, Any], names: tuple[str, ...]) -> Any:
    """Rows as a DataFrame with the estimator's column names (pandas is its dependency)."""
    try:
        import pandas as pd
    except ImportError:
        return x  # scikit-learn warns about the missing names, and predicts the same
    return pd.DataFrame(x, columns=list(names), copy=False)
