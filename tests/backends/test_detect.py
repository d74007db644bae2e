"""The backend chosen from an artifact's content, and the artifacts it cannot tell."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import pytest

from backends.detect import detect
from schemas.errors import GraphError

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"


@pytest.mark.parametrize(
    ("file", "backend", "why"),
    [
        ("tiny_mlp.onnx", "onnxruntime", "an ONNX model"),
        ("tiny_mlp.pt", "torch", "TorchScript"),
        ("tiny_mlp.pt2", "torch", "torch.export"),
        ("tiny_mlp.pth", "torch", "a torch state dict"),
        ("tiny_mlp.savedmodel", "tensorflow", "saved_model.pb"),
        ("breast_cancer_xgb.ubj", "xgboost", "UBJSON"),
        ("breast_cancer_lgbm.txt", "lightgbm", "LightGBM"),
        ("breast_cancer_hgb.skops", "sklearn", "skops"),
    ],
)
def test_every_shipped_format_is_told_by_its_content(file: str, backend: str, why: str) -> None:
    path = MODELS / file
    if not path.exists():
        pytest.skip(f"{file} not exported on this machine (kp-pipeline models export)")
    found, reason = detect(path)
    assert found == backend
    assert why in reason


def test_the_suffix_does_not_decide(tmp_path: Path) -> None:
    onnx_file = MODELS / "tiny_mlp.onnx"
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(onnx_file.read_bytes())
    assert detect(renamed)[0] == "onnxruntime"
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"\x08\x07 not really a model")
    with pytest.raises(GraphError, match="cannot tell which backend reads"):
        detect(fake)


def test_xgboost_json_pickles_and_plans(tmp_path: Path) -> None:
    doc = tmp_path / "model.json"
    doc.write_text(json.dumps({"learner": {"objective": {}}, "version": [2, 1, 0]}))
    assert detect(doc)[0] == "xgboost"
    sklearn_pickle = tmp_path / "model.pkl"
    from sklearn.linear_model import LinearRegression

    sklearn_pickle.write_bytes(pickle.dumps(LinearRegression()))
    assert detect(sklearn_pickle) == (
        "sklearn",
        "a pickle naming scikit-learn classes (trust_artifact required)",
    )
    plan = tmp_path / "resnet.plan"
    plan.write_bytes(b"\x00" * 32)
    assert detect(plan)[0] == "tensorrt"


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"just some text", "none of the formats"),
        (json.dumps({"tokenizer": 1}).encode(), "none of the formats"),
        (pickle.dumps({"a": 1}), "none of the formats"),
    ],
)
def test_what_fits_no_format_is_refused_asking_for_backend(
    tmp_path: Path, content: bytes, words: str
) -> None:
    path = tmp_path / "artifact"
    path.write_bytes(content)
    with pytest.raises(GraphError, match=rf"{words}.*set backend:"):
        detect(path)


def test_ambiguous_artifacts_are_refused(tmp_path: Path) -> None:
    unknown_zip = tmp_path / "archive.zip"
    with zipfile.ZipFile(unknown_zip, "w") as z:
        z.writestr("model/weights.bin", b"0")
    with pytest.raises(GraphError, match="a zip none of the backends reads"):
        detect(unknown_zip)
    both = tmp_path / "both.pkl"
    both.write_bytes(
        pickle.dumps(["sklearn.linear_model.LinearRegression", "torch.nn.Linear"], protocol=4)
    )
    with pytest.raises(GraphError, match="both scikit-learn and torch"):
        detect(both)
    (tmp_path / "empty").mkdir()
    with pytest.raises(GraphError, match=r"a folder without saved_model\.pb"):
        detect(tmp_path / "empty")
