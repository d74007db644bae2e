"""Artifacts cannot run code by surprise: pickles need trust, state dicts load weights-only.

A file saved with a ``Boom`` (tests/torch_models.py) touches a marker file if anything
unpickles it; each refusal is checked by that marker staying absent.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch_models import Boom, TinyMLP

from backends.base import ModelSpec
from backends.torch_artifacts import resolve_format, weights_only
from backends.torch_runtime import TorchBackend
from pipeline.tools.zoo import tiny
from schemas.errors import BackendError

SIGNATURE: dict[str, Any] = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [64]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [10]}],
}


def _load(path: Path, options: dict[str, Any], trust: bool = False) -> TorchBackend:
    backend = TorchBackend()
    backend.load(ModelSpec("m", path, {**SIGNATURE, **options}, trust_artifact=trust), "cpu")
    return backend


@pytest.fixture
def hostile(tmp_path: Path) -> tuple[Path, Path]:
    """A torch.save file that touches ``marker`` when unpickled, and the marker."""
    marker = tmp_path / "it-ran"
    path = tmp_path / "hostile.pt"
    torch.save({"weights": torch.zeros(2), "payload": Boom(marker)}, path)
    return path, marker


def test_a_pickled_module_is_refused_without_trust_and_nothing_runs(
    hostile: tuple[Path, Path],
) -> None:
    path, marker = hostile
    assert resolve_format("auto", path, None, None) == "pickle"
    with pytest.raises(BackendError, match="Set trust_artifact: true on the model"):
        _load(path, {})
    assert not marker.exists()


def test_a_trusted_whole_module_pickle_loads_and_serves(tmp_path: Path) -> None:
    module = TinyMLP()
    path = tmp_path / "whole.pt"
    torch.save(module, path)
    backend = _load(path, {"format": "pickle"}, trust=True)
    x = np.ones((3, 64), np.float32)
    want = module(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(backend.infer({"x": x})["logits"], want, rtol=1e-6)


def test_a_state_dict_loads_weights_only_into_the_named_module(tmp_path: Path) -> None:
    tiny.export_tiny_mlp_state_dict(tmp_path)
    path = tmp_path / "tiny_mlp.pth"
    assert resolve_format("auto", path, None, "torch_models:TinyMLP") == "state_dict"
    backend = _load(path, {"module": "torch_models:TinyMLP", "module_kwargs": {"hidden": 32}})
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    np.testing.assert_allclose(
        backend.infer({"x": x})["logits"], tiny.tiny_mlp_reference(x), rtol=1e-5, atol=1e-5
    )


def test_a_hostile_state_dict_is_refused_weights_only_even_when_trusted(
    hostile: tuple[Path, Path],
) -> None:
    path, marker = hostile
    for trust in (False, True):  # a state dict is always weights-only
        with pytest.raises(BackendError, match="cannot load it weights-only"):
            _load(path, {"module": "torch_models:TinyMLP"}, trust=trust)
    assert not marker.exists()


def test_a_factory_loads_weights_only_unless_the_model_is_trusted(
    hostile: tuple[Path, Path],
) -> None:
    path, marker = hostile
    options = {"factory": "torch_models:unsafe_factory"}
    with pytest.raises(BackendError, match="weights-only unless the model says trust_artifact"):
        _load(path, options)
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # put back after the call
    _load(path, options, trust=True)  # trusted: the factory's own choice stands
    assert marker.exists()


def test_weights_only_puts_the_environment_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with weights_only(True):
        assert os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "1"
        assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"format": "state_dict"}, "options.format is 'state_dict' but options.module names none"),
        ({"module": "torch_models:Nope"}, "options.module: torch module 'torch_models:Nope'"),
        ({"module": "torch_models:TinyMLP", "module_kwargs": {"hidden": 7}},
         "options.module torch_models:TinyMLP: cannot take"),
    ],
)  # fmt: skip
def test_state_dict_mistakes_name_the_option(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    tiny.export_tiny_mlp_state_dict(tmp_path)
    with pytest.raises(BackendError, match=message):
        _load(tmp_path / "tiny_mlp.pth", options)
