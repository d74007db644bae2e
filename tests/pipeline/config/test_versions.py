"""``versions``: one model name in several versions, its default and canaries, checked."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from pipeline.config.topology import Topology


def _model(name: str, version: str) -> dict[str, Any]:
    return {
        "name": name,
        "version": version,
        "backend": "onnxruntime",
        "artifact": f"{name}-{version}.onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [4]}],
    }


def _topology(models: list[tuple[str, str]], versions: dict[str, Any] | None = None) -> Topology:
    return Topology.model_validate(
        {
            "topics": {"input": ["in"], "output": "out", "dead_letter": "dlq"},
            "models": [_model(n, v) for n, v in models],
            "versions": versions or {},
        }
    )


def _refused(models: list[tuple[str, str]], versions: dict[str, Any] | None = None) -> str:
    with pytest.raises(ValidationError) as e:
        _topology(models, versions)
    return str(e.value)


def test_a_model_in_two_versions_with_a_default_and_a_canary() -> None:
    t = _topology(
        [("m", "1"), ("m", "2"), ("k", "1")], {"m": {"default": "1", "canary": {"2": 0.1}}}
    )
    assert t.versions["m"].default == "1"
    assert t.versions["m"].canary == {"2": 0.1}


@pytest.mark.parametrize(
    ("models", "versions", "words"),
    [
        ([("m", "1"), ("m", "1")], None, "models[1]: model 'm' version '1' appears twice"),
        (
            [("m", "1"), ("m", "2")],
            None,
            "versions.m.default: model 'm' is served in versions 1, 2",
        ),
        ([("m", "1"), ("m", "2")], {"m": {}}, "versions.m.default: model 'm' is served in"),
        ([("m", "1")], {"k": {"default": "1"}}, "versions.k: no model 'k' is served"),
        (
            [("m", "1"), ("m", "2")],
            {"m": {"default": "3"}},
            "versions.m.default: version '3' is not served (serving 1, 2)",
        ),
        (
            [("m", "1"), ("m", "2")],
            {"m": {"default": "1", "canary": {"4": 0.5}}},
            "versions.m.canary: version '4' is not served",
        ),
        (
            [("m", "1"), ("m", "2")],
            {"m": {"default": "1", "canary": {"1": 0.5}}},
            "versions.m.canary: '1' is the default already",
        ),
        ([("m", "1"), ("m", "2")], {"m": {"default": "1", "canary": {"2": 0}}}, "share 0"),
        ([("m", "1"), ("m", "2")], {"m": {"default": "1", "canary": {"2": 1.5}}}, "share 1.5"),
        (
            [("m", "1"), ("m", "2"), ("m", "3")],
            {"m": {"default": "1", "canary": {"2": 0.6, "3": 0.6}}},
            "the shares add up to 1.2, more than 1",
        ),
        ([("m", "1"), ("m", "2")], {"m": {"default": "1", "weights": {}}}, "weights"),
        (
            [("m", "1"), ("m", "2")],
            {"m": {"default": "1", "shadow": {"version": "3"}}},
            "versions.m.shadow.version: version '3' is not served",
        ),
        (
            [("m", "1"), ("m", "2")],
            {"m": {"default": "1", "shadow": {"version": "1"}}},
            "versions.m.shadow.version: '1' is the default",
        ),
        (
            [("m", "1"), ("m", "2")],
            {"m": {"default": "1", "shadow": {"version": "2", "share": 0}}},
            "share",
        ),
    ],
)
def test_traffic_that_does_not_fit_the_models_is_refused_naming_the_field(
    models: list[tuple[str, str]], versions: dict[str, Any] | None, words: str
) -> None:
    assert words in _refused(models, versions)
