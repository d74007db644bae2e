"""``kp-pipeline schema``: every shipped topology validates, a misspelt key is named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from pipeline.config.schema import topology_schema

ROOT = Path(__file__).resolve().parents[3]
SHIPPED = sorted([*ROOT.glob("topology*.yaml"), *(ROOT / "load" / "topologies").glob("*.yaml")])
SCHEMA = topology_schema()
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def _errors(doc: Any) -> list[tuple[list[Any], str]]:
    return [(list(e.absolute_path), e.message) for e in VALIDATOR.iter_errors(doc)]


def test_the_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert len(SHIPPED) >= 6


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_topology_validates_as_written(path: Path) -> None:
    assert _errors(yaml.safe_load(path.read_text())) == []


def test_the_charts_topology_validates() -> None:
    values = yaml.safe_load((ROOT / "deploy/helm/kp-pipeline/values.yaml").read_text())
    assert _errors(yaml.safe_load(values["topology"])) == []


def _demo() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "topology.yaml").read_text())
    return doc


def test_a_misspelt_key_is_refused_at_its_path() -> None:
    doc = _demo()
    doc["models"][0]["batching"]["max_batch_sise"] = 4
    assert _errors(doc) == [
        (
            ["models", 0, "batching"],
            "Additional properties are not allowed ('max_batch_sise' was unexpected)",
        )
    ]


def test_stage_parameters_and_backend_options_are_checked_as_the_plugins_declare() -> None:
    doc = _demo()
    doc["models"][0]["options"] = {"intra_op_thread": 1}
    assert any(path == ["models", 0, "options"] for path, _ in _errors(doc))
    doc = _demo()
    doc["models"][0]["preprocess"].append({"stage": "softmax", "input": "x", "axes": 2})
    assert _errors(doc)  # softmax takes no `axes`
    doc["models"][0]["preprocess"][-1] = {"stage": "mypackage.stages:Mine", "anything": 1}
    assert _errors(doc) == []  # a module:Class stage: only its name is checked


def test_environment_references_are_taken_wherever_a_value_goes() -> None:
    doc = _demo()
    doc["metrics"]["port"] = "${KP_METRICS_PORT:-9464}"
    doc["delivery"] = "${KP_DELIVERY:-exactly_once}"
    assert _errors(doc) == []
    doc["metrics"]["port"] = "ninety"
    assert [path for path, _ in _errors(doc)] == [["metrics", "port"]]
