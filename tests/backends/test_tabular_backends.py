"""XGBoost, LightGBM and scikit-learn backends: the library's own answers, row for row.

Each model is trained here on the breast-cancer data inside scikit-learn (and a
three-class and a regression variant); hypothesis draws rows around the data's range and
every backend's outputs must equal what the library's own ``predict_proba``/``predict``
give for the same float32 rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from backends.base import ModelSpec
from pipeline.tools.zoo.tabular import breast_cancer
from schemas.errors import BackendError

xgboost = pytest.importorskip("xgboost")
lightgbm = pytest.importorskip("lightgbm")
sklearn = pytest.importorskip("sklearn")
sio = pytest.importorskip("skops.io")
pd = pytest.importorskip("pandas")

from backends.lightgbm_runtime import LightGBMBackend  # noqa: E402
from backends.sklearn_runtime import SklearnBackend  # noqa: E402
from backends.xgboost_runtime import XGBoostBackend  # noqa: E402

X, Y, NAMES = breast_cancer()
THREE = (X[:, 0] > 13).astype(int) + (X[:, 0] > 17).astype(int)  # a three-class target
TARGET = X[:, 3] / 100  # a regression target: mean area / 100
LOW, HIGH = X.min(axis=0), X.max(axis=0)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every model these tests serve, trained once."""
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestRegressor
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out = tmp_path_factory.mktemp("tabular")
    paths: dict[str, Path] = {}
    common = {"n_estimators": 20, "max_depth": 3, "random_state": 1, "n_jobs": 1}
    for name, model, y in (
        ("xgb_binary", xgboost.XGBClassifier(**common), Y),
        ("xgb_three", xgboost.XGBClassifier(**common), THREE),
        ("xgb_reg", xgboost.XGBRegressor(**common), TARGET),
    ):
        model.fit(X, y)
        booster = model.get_booster()
        booster.feature_names = NAMES
        suffix = ".json" if name == "xgb_three" else ".ubj"
        paths[name] = out / f"{name}{suffix}"
        booster.save_model(str(paths[name]))
    for name, lgbm, y in (
        ("lgbm_binary", lightgbm.LGBMClassifier, Y),
        ("lgbm_three", lightgbm.LGBMClassifier, THREE),
        ("lgbm_reg", lightgbm.LGBMRegressor, TARGET),
    ):
        fitted = lgbm(n_estimators=20, num_leaves=7, random_state=1, n_jobs=1, verbose=-1)
        fitted.fit(X, y)
        paths[name] = out / f"{name}.txt"
        fitted.booster_.save_model(str(paths[name]))
    hgb = HistGradientBoostingClassifier(max_iter=20, random_state=1)
    hgb.fit(pd.DataFrame(X, columns=NAMES), THREE)
    paths["sk_named"] = out / "sk_named.skops"
    sio.dump(hgb, paths["sk_named"])
    strings = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    strings.fit(X, np.where(Y == 1, "benign", "malignant"))
    paths["sk_strings"] = out / "sk_strings.skops"
    sio.dump(strings, paths["sk_strings"])
    forest = RandomForestRegressor(n_estimators=10, max_depth=4, random_state=1).fit(X, TARGET)
    paths["sk_reg"] = out / "sk_reg.joblib"
    import joblib

    joblib.dump(forest, paths["sk_reg"])
    return paths


def _load(cls: type, path: Path, trust: bool = False, **options: Any) -> Any:
    backend = cls()
    info = backend.load(ModelSpec("m", path, options, trust), "cpu")
    return backend, info


rows = arrays(
    np.float32,
    st.tuples(st.integers(1, 40), st.just(30)),
    elements=st.floats(0, 1, width=32),
).map(lambda u: (LOW + u * (HIGH - LOW)).astype(np.float32))
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(x=rows)
def test_xgboost_answers_as_its_classifier_and_regressor(models: dict[str, Path], x: Any) -> None:
    for name in ("xgb_binary", "xgb_three"):
        backend, info = _load(XGBoostBackend, models[name], margin=True)
        out = backend.infer({"features": x})
        clf = xgboost.XGBClassifier()
        clf.load_model(str(models[name]))
        np.testing.assert_array_equal(out["probabilities"], clf.predict_proba(x))
        np.testing.assert_array_equal(out["label"].ravel(), clf.predict(x))
        margin = clf.get_booster().inplace_predict(x, predict_type="margin")
        np.testing.assert_array_equal(out["margin"], np.asarray(margin).reshape(len(x), -1))
        assert info.feature_names == tuple(NAMES)
    backend, info = _load(XGBoostBackend, models["xgb_reg"])
    reg = xgboost.XGBRegressor()
    reg.load_model(str(models["xgb_reg"]))
    np.testing.assert_array_equal(
        backend.infer({"features": x})["prediction"].ravel(), reg.predict(x)
    )
    assert set(info.outputs) == {"prediction"}


@FAST
@given(x=rows)
def test_lightgbm_answers_as_its_booster(models: dict[str, Path], x: Any) -> None:
    for name, classes in (("lgbm_binary", 2), ("lgbm_three", 3)):
        backend, info = _load(LightGBMBackend, models[name])
        out = backend.infer({"features": x})
        p = lightgbm.Booster(model_file=str(models[name])).predict(x)
        expected = np.column_stack([1 - p, p]) if classes == 2 else p
        np.testing.assert_allclose(out["probabilities"], expected, rtol=0, atol=1e-7)
        np.testing.assert_array_equal(out["label"].ravel(), np.argmax(expected, axis=1))
        assert info.outputs["probabilities"].shape == (classes,)
    backend, _ = _load(LightGBMBackend, models["lgbm_reg"], margin=True)
    out = backend.infer({"features": x})
    booster = lightgbm.Booster(model_file=str(models["lgbm_reg"]))
    np.testing.assert_allclose(out["prediction"].ravel(), booster.predict(x), rtol=1e-6)
    np.testing.assert_allclose(out["margin"].ravel(), booster.predict(x, raw_score=True), rtol=1e-6)


@FAST
@given(x=rows)
def test_sklearn_answers_as_its_estimator(models: dict[str, Path], x: Any) -> None:
    named = sio.load(models["sk_named"], trusted=sio.get_untrusted_types(file=models["sk_named"]))
    backend, info = _load(SklearnBackend, models["sk_named"], features="named")
    columns = {n: x[:, i : i + 1] for i, n in enumerate(NAMES)}
    out = backend.infer(dict(reversed(list(columns.items()))))  # any order: stacked by name
    frame = pd.DataFrame(x, columns=NAMES)
    np.testing.assert_array_equal(
        out["probabilities"], named.predict_proba(frame).astype(np.float32)
    )
    np.testing.assert_array_equal(out["label"].ravel(), named.predict(frame))
    assert list(info.inputs) == NAMES
    strings = sio.load(
        models["sk_strings"], trusted=sio.get_untrusted_types(file=models["sk_strings"])
    )
    backend, info = _load(SklearnBackend, models["sk_strings"])
    out = backend.infer({"features": x})
    assert info.outputs["label"].datatype == "BYTES"
    assert [b.decode() for b in out["label"].ravel()] == list(strings.predict(x))
    import joblib

    forest = joblib.load(models["sk_reg"])
    backend, _ = _load(SklearnBackend, models["sk_reg"], trust=True)
    got = backend.infer({"features": x})["prediction"].ravel()
    np.testing.assert_array_equal(got, forest.predict(x).astype(np.float32))


def test_what_cannot_be_served_safely_or_at_all_is_refused(
    models: dict[str, Path], tmp_path: Path
) -> None:
    refusals = [
        (SklearnBackend, models["sk_reg"], {}, "is a pickle: loading it runs code"),
        (XGBoostBackend, models["lgbm_binary"], {}, "is not an XGBoost model"),
        (LightGBMBackend, models["xgb_binary"], {}, "is not a LightGBM text model"),
        (SklearnBackend, models["xgb_binary"], {}, "is not a skops file"),
        (LightGBMBackend, models["lgbm_binary"], {"features": "named"}, ""),  # names: fine
        (XGBoostBackend, models["xgb_binary"], {"feature": "row"}, "options.feature"),
    ]
    for cls, path, options, words in refusals:
        if not words:
            _load(cls, path, **options)
            continue
        with pytest.raises(BackendError, match=words):
            _load(cls, path, **options)
    unnamed = xgboost.XGBClassifier(n_estimators=2).fit(X, Y)
    path = tmp_path / "unnamed.ubj"
    unnamed.get_booster().save_model(str(path))
    with pytest.raises(BackendError, match="named needs the model's feature names"):
        _load(XGBoostBackend, path, features="named")
    for cls, path in (
        (LightGBMBackend, models["lgbm_binary"]),
        (SklearnBackend, models["sk_named"]),
    ):
        with pytest.raises(BackendError, match="sees no CUDA device"):
            cls().load(ModelSpec("m", path), "cuda:0")
    if not xgboost.build_info().get("USE_CUDA"):
        with pytest.raises(BackendError, match="sees no CUDA device"):
            XGBoostBackend().load(ModelSpec("m", models["xgb_binary"]), "cuda:0")


class Threshold(sklearn.base.BaseEstimator):  # type: ignore[misc]
    """An estimator that is not scikit-learn's own: skops names its type as untrusted."""

    def fit(self, x: Any, y: Any) -> Threshold:
        self.n_features_in_ = x.shape[1]
        return self

    def predict(self, x: Any) -> Any:
        return (x[:, 0] > 15).astype(np.float32)


def test_a_skops_file_with_foreign_types_needs_trust(tmp_path: Path) -> None:
    path = tmp_path / "foreign.skops"
    sio.dump(Threshold().fit(X, Y), path)
    with pytest.raises(BackendError, match=r"types that are not scikit-learn's: .*Threshold"):
        SklearnBackend().load(ModelSpec("m", path), "cpu")
    backend, info = _load(SklearnBackend, path, trust=True)
    assert set(info.outputs) == {"prediction"}
    assert backend.infer({"features": X[:3]})["prediction"].ravel().tolist() == [1.0, 1.0, 1.0]
