"""Backend option parsing and the signature embedded in archives."""

from __future__ import annotations

from pathlib import Path

import pytest

from backends.base import ModelSpec
from backends.options import StrictOptions, parse_options, parse_signature_json, signature_json
from schemas.errors import BackendError
from schemas.tensors import TensorSpec


class Opts(StrictOptions):
    threads: int = 0
    mode: str = "fast"


def test_options_are_validated_with_field_named_errors() -> None:
    assert parse_options(Opts, ModelSpec("m", Path("a"), {"threads": 2}), "rt").threads == 2
    with pytest.raises(BackendError) as e:
        parse_options(Opts, ModelSpec("m", Path("a"), {"thread": 2, "threads": "x"}), "rt")
    assert str(e.value).startswith("rt options: ")
    assert "options.thread: unknown option" in str(e.value)
    assert "options.threads: Input should be a valid integer" in str(e.value)


def test_signature_round_trips_with_free_dimensions() -> None:
    inputs = {"ids": TensorSpec("INT64", (None,)), "mask": TensorSpec("INT64", (None,))}
    outputs = {"emb": TensorSpec("FP32", (384,))}
    assert parse_signature_json(signature_json(inputs, outputs)) == (inputs, outputs)
    assert parse_signature_json(signature_json(inputs, outputs).encode()) == (inputs, outputs)


@pytest.mark.parametrize(
    "text",
    ["{", "[]", '{"inputs": []}', '{"inputs": [{"name": "x"}], "outputs": []}'],
)
def test_a_broken_signature_is_a_backend_error(text: str) -> None:
    with pytest.raises(BackendError, match="is not a signature"):
        parse_signature_json(text)
