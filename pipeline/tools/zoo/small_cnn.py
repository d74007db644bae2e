"""A small convolutional network with seeded weights: the backend benchmark's model.

Four 3x3 convolutions (3→32, 32→64/2, 64→128/2, 128→256/2, ReLU after each), global
average pooling and a 256→10 linear layer, on FP32[3,64,64] inputs (~60 M multiply-adds
per image). It is heavy enough that the model, not the pipeline, bounds throughput on a
CPU, and small enough to be written identically in every runtime: ONNX, TorchScript and
torch.export from the PyTorch module, and a Keras twin with the same weights
(`pipeline.tools.zoo.keras_twins`). No weights are downloaded: they come from a fixed seed.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from schemas.tensors import TensorSpec

__all__ = [
    "CNN_INPUTS",
    "CNN_OUTPUTS",
    "CNN_SIZE",
    "export_small_cnn_exported",
    "export_small_cnn_onnx",
    "export_small_cnn_torchscript",
    "small_cnn_module",
    "small_cnn_weights",
]

CNN_SIZE = 64
CNN_CHANNELS = (3, 32, 64, 128, 256)
CNN_STRIDES = (1, 2, 2, 2)
CNN_CLASSES = 10
CNN_INPUTS = {"x": TensorSpec("FP32", (3, CNN_SIZE, CNN_SIZE))}
CNN_OUTPUTS = {"logits": TensorSpec("FP32", (CNN_CLASSES,))}


def small_cnn_weights() -> dict[str, np.ndarray[Any, Any]]:
    """PyTorch-layout weights: ``conv{i}.weight`` [out, in, 3, 3], ``fc.weight`` [10, 256]."""
    rng = np.random.default_rng(64)
    weights: dict[str, np.ndarray[Any, Any]] = {}
    for i, (cin, cout) in enumerate(itertools.pairwise(CNN_CHANNELS)):
        fan_in = cin * 9
        weights[f"conv{i}.weight"] = rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2 / fan_in)
        weights[f"conv{i}.bias"] = rng.standard_normal(cout) * 0.01
    weights["fc.weight"] = rng.standard_normal((CNN_CLASSES, CNN_CHANNELS[-1])) / 16.0
    weights["fc.bias"] = rng.standard_normal(CNN_CLASSES) * 0.01
    return {k: v.astype(np.float32) for k, v in weights.items()}


def small_cnn_module() -> Any:
    """The PyTorch module, eval mode, with `small_cnn_weights`."""
    import torch
    from torch import nn

    class SmallCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.convs = nn.ModuleList(
                nn.Conv2d(cin, cout, 3, stride=s, padding=1)
                for cin, cout, s in zip(CNN_CHANNELS, CNN_CHANNELS[1:], CNN_STRIDES, strict=False)
            )
            self.fc = nn.Linear(CNN_CHANNELS[-1], CNN_CLASSES)

        def forward(self, x: Any) -> Any:
            for conv in self.convs:
                x = torch.relu(conv(x))
            return self.fc(x.mean(dim=(2, 3)))

    model = SmallCNN()
    # The module's own names: conv{i}.* lives at convs.{i}.*.
    state = {k.replace("conv", "convs.", 1): v for k, v in small_cnn_weights().items()}
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    return model.eval()


def _sample() -> Any:
    import torch

    return torch.zeros(2, 3, CNN_SIZE, CNN_SIZE)


def export_small_cnn_onnx(out_dir: Path) -> Path:
    """``small_cnn.onnx`` with a free batch dimension."""
    from pipeline.tools.zoo.torch_formats import save_onnx

    return save_onnx(small_cnn_module(), _sample(), out_dir / "small_cnn.onnx", "x", "logits")


def export_small_cnn_torchscript(out_dir: Path) -> Path:
    """``small_cnn.pt``: traced TorchScript, signature embedded."""
    from pipeline.tools.zoo.torch_formats import save_torchscript

    path = out_dir / "small_cnn.pt"
    return save_torchscript(small_cnn_module(), _sample(), path, CNN_INPUTS, CNN_OUTPUTS)


def export_small_cnn_exported(out_dir: Path) -> Path:
    """``small_cnn.pt2``: torch.export with a dynamic batch, signature embedded."""
    from pipeline.tools.zoo.torch_formats import save_exported_program

    path = out_dir / "small_cnn.pt2"
    return save_exported_program(small_cnn_module(), _sample(), path, CNN_INPUTS, CNN_OUTPUTS)
