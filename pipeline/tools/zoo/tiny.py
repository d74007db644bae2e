"""The tiny MLP (64 → 32 → 10) with fixed, seeded weights, in every format served here.

It costs microseconds per batch, so benchmarks on it measure the pipeline, not the
model, and tests can push thousands of requests through it. The same weights are written
as ONNX (built directly with onnx.helper), TorchScript, a torch.export program, a state
dict for the torch backend's module factory, and a TensorFlow SavedModel; every one is
checked against `tiny_mlp_reference` (NumPy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from schemas.tensors import TensorSpec

__all__ = [
    "TINY_INPUTS",
    "TINY_OUTPUTS",
    "export_tiny_mlp_exported",
    "export_tiny_mlp_onnx",
    "export_tiny_mlp_state_dict",
    "export_tiny_mlp_torchscript",
    "tiny_mlp_module",
    "tiny_mlp_reference",
    "tiny_weights",
]

TINY_IN, TINY_HIDDEN, TINY_OUT = 64, 32, 10
TINY_INPUTS = {"x": TensorSpec("FP32", (TINY_IN,))}
TINY_OUTPUTS = {"logits": TensorSpec("FP32", (TINY_OUT,))}


def tiny_weights() -> tuple[np.ndarray[Any, Any], ...]:
    """``w1 [64,32], b1 [32], w2 [32,10], b2 [10]`` (x @ w + b), float32, seeded."""
    rng = np.random.default_rng(20261124)
    w1 = rng.standard_normal((TINY_IN, TINY_HIDDEN)) / np.sqrt(TINY_IN)
    b1 = rng.standard_normal(TINY_HIDDEN) * 0.1
    w2 = rng.standard_normal((TINY_HIDDEN, TINY_OUT)) / np.sqrt(TINY_HIDDEN)
    b2 = rng.standard_normal(TINY_OUT) * 0.1
    return tuple(a.astype(np.float32) for a in (w1, b1, w2, b2))


def tiny_mlp_reference(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The tiny MLP's logits computed in NumPy, to check a served result against."""
    w1, b1, w2, b2 = tiny_weights()
    h = np.maximum(x.astype(np.float32) @ w1 + b1, 0.0)
    out: np.ndarray[Any, Any] = h @ w2 + b2
    return out


def export_tiny_mlp_onnx(out_dir: Path) -> Path:
    """Write ``tiny_mlp.onnx`` (input ``x`` FP32[N,64], output ``logits`` FP32[N,10])."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w1, b1, w2, b2 = tiny_weights()
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
    path = out_dir / "tiny_mlp.onnx"
    onnx.save(model, str(path))
    return path


def _torch_mlp() -> Any:
    import torch
    from torch import nn

    w1, b1, w2, b2 = tiny_weights()
    model = nn.Sequential(
        nn.Linear(TINY_IN, TINY_HIDDEN), nn.ReLU(), nn.Linear(TINY_HIDDEN, TINY_OUT)
    )
    state = {"0.weight": w1.T, "0.bias": b1, "2.weight": w2.T, "2.bias": b2}
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()})
    return model.eval()


def tiny_mlp_module(artifact: Path) -> Any:
    """Module factory for the torch backend: the MLP's code, weights from ``artifact``.

    This is the form of a model that exists only as Python code plus a state dict; a
    topology serves it with ``backend: torch`` and
    ``options: {factory: "pipeline.tools.zoo.tiny:tiny_mlp_module"}``.
    """
    import torch
    from torch import nn

    model = nn.Sequential(
        nn.Linear(TINY_IN, TINY_HIDDEN), nn.ReLU(), nn.Linear(TINY_HIDDEN, TINY_OUT)
    )
    model.load_state_dict(torch.load(artifact, weights_only=True))
    return model.eval()


def export_tiny_mlp_torchscript(out_dir: Path) -> Path:
    """``tiny_mlp.pt``: TorchScript, signature embedded."""
    import torch

    from pipeline.tools.zoo.torch_formats import save_torchscript

    path = out_dir / "tiny_mlp.pt"
    return save_torchscript(_torch_mlp(), torch.zeros(2, TINY_IN), path, TINY_INPUTS, TINY_OUTPUTS)


def export_tiny_mlp_exported(out_dir: Path) -> Path:
    """``tiny_mlp.pt2``: a torch.export program with a dynamic batch, signature embedded."""
    import torch

    from pipeline.tools.zoo.torch_formats import save_exported_program

    path = out_dir / "tiny_mlp.pt2"
    sample = torch.zeros(2, TINY_IN)
    return save_exported_program(_torch_mlp(), sample, path, TINY_INPUTS, TINY_OUTPUTS)


def export_tiny_mlp_state_dict(out_dir: Path) -> Path:
    """``tiny_mlp.pth``: the weights alone, for `tiny_mlp_module`."""
    import torch

    path = out_dir / "tiny_mlp.pth"
    torch.save(_torch_mlp().state_dict(), path)
    return path
