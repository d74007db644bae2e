"""What backends share about their settings: option parsing and declared signatures.

Each backend validates its own section of a model's settings (``options`` in
topology.yaml) with a pydantic model; errors come back as `BackendError` lines that name
the field, e.g. ``options.precision: Input should be 'fp32', 'fp16' or 'bf16'``.

Formats that do not record their signature (TorchScript, a Python module factory) take
it from ``options.inputs`` / ``options.outputs`` in the same form as a model's
``inputs``: per row, no batch dimension, ``-1`` for a free dimension. `DeclaredTensor`
is the same pydantic model as a model's ``inputs``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from backends.base import ModelSpec
from schemas.errors import BackendError, error_message, format_path
from schemas.tensors import DeclaredTensor, TensorSpec

__all__ = [
    "SIGNATURE_FILE",
    "DeclaredTensor",
    "StrictOptions",
    "parse_options",
    "parse_signature_json",
    "signature_json",
    "signature_of",
]

OptionsT = TypeVar("OptionsT", bound=BaseModel)


class StrictOptions(BaseModel):
    """Base of every backend's options: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


def signature_of(tensors: Sequence[DeclaredTensor]) -> dict[str, TensorSpec]:
    """Name → spec, in declaration order."""
    return {t.name: t.spec() for t in tensors}


def parse_options(model: type[OptionsT], spec: ModelSpec, backend: str) -> OptionsT:
    """Validate ``spec.options`` with ``model``; a `BackendError` names each bad field."""
    try:
        return model.model_validate(dict(spec.options))
    except ValidationError as e:
        lines = [
            f"options.{format_path(err['loc'])}: {error_message(err, 'unknown option')}"
            for err in e.errors()
        ]
        raise BackendError(f"{backend} options: " + "; ".join(lines)) from None


SIGNATURE_FILE = "kp_signature.json"
"""Name of the signature that `pipeline.tools.zoo` embeds in the archives it writes (TorchScript
``_extra_files``, torch.export ``extra_files``), for formats that keep none themselves."""


def signature_json(inputs: dict[str, TensorSpec], outputs: dict[str, TensorSpec]) -> str:
    """The embedded signature: per-row shapes, ``-1`` for free dimensions."""

    def side(specs: dict[str, TensorSpec]) -> list[dict[str, Any]]:
        return [
            {"name": k, "datatype": v.datatype, "shape": [-1 if d is None else d for d in v.shape]}
            for k, v in specs.items()
        ]

    return json.dumps({"inputs": side(inputs), "outputs": side(outputs)})


def parse_signature_json(
    text: str | bytes,
) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
    """Inputs and outputs from `signature_json`'s text; `BackendError` if it is not one."""
    try:
        doc = json.loads(text)
        return (
            signature_of([DeclaredTensor.model_validate(t) for t in doc["inputs"]]),
            signature_of([DeclaredTensor.model_validate(t) for t in doc["outputs"]]),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise BackendError(f"embedded {SIGNATURE_FILE} is not a signature: {e}") from None
