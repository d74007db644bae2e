"""Saving a PyTorch module in the formats the backends serve, signature embedded.

TorchScript keeps no tensor names, dtypes or shapes, and a torch.export program keeps
dtypes and shapes but not meaningful output names; both archives carry the signature as
an extra file (`backends.options.SIGNATURE_FILE`), which the torch backend reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from backends.options import SIGNATURE_FILE, signature_json
from schemas.tensors import TensorSpec

__all__ = ["save_exported_program", "save_onnx", "save_torchscript"]

MAX_BATCH = 4096


def save_torchscript(
    module: Any,
    sample: Any,
    path: Path,
    inputs: dict[str, TensorSpec],
    outputs: dict[str, TensorSpec],
) -> Path:
    """Trace ``module`` on ``sample`` and save it with its signature."""
    import torch

    with torch.inference_mode():
        traced = torch.jit.trace(module, (sample,))
    torch.jit.save(
        traced, str(path), _extra_files={SIGNATURE_FILE: signature_json(inputs, outputs)}
    )
    return path


def save_exported_program(
    module: Any,
    sample: Any,
    path: Path,
    inputs: dict[str, TensorSpec],
    outputs: dict[str, TensorSpec],
) -> Path:
    """``torch.export`` with a dynamic batch dimension, saved as .pt2 with its signature."""
    import torch

    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    program = torch.export.export(module, (sample,), dynamic_shapes=({0: batch},))
    torch.export.save(
        program, str(path), extra_files={SIGNATURE_FILE: signature_json(inputs, outputs)}
    )
    return path


def save_onnx(module: Any, sample: Any, path: Path, input_name: str, output_name: str) -> Path:
    """ONNX (opset 17, the TorchScript-based exporter) with a free batch dimension."""
    import torch

    with torch.inference_mode():
        torch.onnx.export(
            module,
            (sample,),
            str(path),
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return path
