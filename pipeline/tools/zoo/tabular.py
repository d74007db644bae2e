"""Tabular demo models: breast-cancer classifiers trained here, from data inside scikit-learn.

scikit-learn ships the Wisconsin breast-cancer data set (569 rows, 30 named features,
two classes) in its wheel, so nothing is downloaded. Each export trains a small model
with a fixed seed, so every machine makes the same file from the same data:

- ``breast_cancer_xgb.ubj``: an XGBoost classifier (binary:logistic, 60 trees of depth
  4), saved in XGBoost's UBJSON format with the feature names;
- ``breast_cancer_lgbm.txt``: a LightGBM classifier in LightGBM's text format;
- ``breast_cancer_hgb.skops``: a scikit-learn HistGradientBoostingClassifier fitted on
  named columns, saved with skops (loads without running code from the file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "breast_cancer",
    "export_hgb_skops",
    "export_lgbm_text",
    "export_xgb_ubj",
    "feature_names",
]

SEED = 7


def breast_cancer() -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], list[str]]:
    """The data set's rows (float32, as the wire carries them), labels and feature names."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    return data.data.astype(np.float32), data.target.astype(np.int64), feature_names()


def feature_names() -> list[str]:
    """The 30 feature names, as scikit-learn gives them ('mean radius', …)."""
    from sklearn.datasets import load_breast_cancer

    return [str(n) for n in load_breast_cancer().feature_names]


def export_xgb_ubj(out_dir: Path) -> Path:
    """Train and save the XGBoost classifier."""
    import xgboost

    x, y, names = breast_cancer()
    model = xgboost.XGBClassifier(
        n_estimators=60, max_depth=4, learning_rate=0.2, random_state=SEED, n_jobs=1
    )
    model.fit(x, y)
    booster = model.get_booster()
    booster.feature_names = names
    path = out_dir / "breast_cancer_xgb.ubj"
    booster.save_model(str(path))
    return path


def export_lgbm_text(out_dir: Path) -> Path:
    """Train and save the LightGBM classifier."""
    import lightgbm

    x, y, names = breast_cancer()
    model = lightgbm.LGBMClassifier(
        n_estimators=60, num_leaves=15, random_state=SEED, n_jobs=1, verbose=-1
    )
    model.fit(x, y, feature_name=[n.replace(" ", "_") for n in names])
    path = out_dir / "breast_cancer_lgbm.txt"
    model.booster_.save_model(str(path))
    return path


def export_hgb_skops(out_dir: Path) -> Path:
    """Train and save the scikit-learn classifier, fitted on named columns."""
    import pandas as pd
    import skops.io as sio
    from sklearn.ensemble import HistGradientBoostingClassifier

    x, y, names = breast_cancer()
    model = HistGradientBoostingClassifier(max_iter=60, max_depth=4, random_state=SEED)
    model.fit(pd.DataFrame(x, columns=names), y)
    path = out_dir / "breast_cancer_hgb.skops"
    sio.dump(model, path)
    return path
