from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.loader import interpolate, load_topology, parse_topology

GOOD = """
kafka: {bootstrap_servers: "${BOOT:-embedded}"}
topics: {input: [a], output: b, dead_letter: c}
models:
  - name: m
    backend: onnxruntime
    artifact: model.onnx
    inputs: [{name: x, datatype: FP32, shape: [4]}]
"""


def _error(text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as e:
        parse_topology(text, "topo.yaml", env or {})
    return str(e.value)


def test_good_topology_and_defaults() -> None:
    t = parse_topology(GOOD, "topo.yaml", {})
    assert t.kafka.embedded
    assert t.models[0].batching.max_batch_size == 32
    assert t.flow.low_mark == t.flow.max_in_flight // 2


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("shape: [4]", "shape: [4], dims: 2", "topo.yaml: models[0].inputs[0].dims: unknown key"),
        (
            "backend: onnxruntime",
            "backend: onnxruntime\n    batching: {max_batchsize: 3}",
            "topo.yaml: models[0].batching.max_batchsize: unknown key",
        ),
        (
            "datatype: FP32",
            "datatype: FLOAT",
            "models[0].inputs[0].datatype: unknown datatype 'FLOAT'",
        ),
        ("shape: [4]", "shape: [0]", "models[0].inputs[0].shape: dimensions are positive"),
        (
            "topics: {input: [a], output: b, dead_letter: c}",
            "",
            "topo.yaml: topics: required, missing",
        ),
        ("name: m", "name: 'bad name'", "models[0].name: String should match pattern"),
        (
            "kafka:",
            "flow: {max_in_flight: 10, resume_below: 10}\nkafka:",
            "flow: resume_below (10) must be below max_in_flight (10)",
        ),
        (
            "artifact: model.onnx",
            "artifact: model.onnx\n    instances: zero",
            "models[0].instances: Input should be a valid integer",
        ),
    ],
)
def test_errors_name_the_file_and_the_field(old: str, new: str, message: str) -> None:
    assert old in GOOD
    assert message in _error(GOOD.replace(old, new))


def test_duplicate_model_names_are_refused() -> None:
    text = GOOD + GOOD[GOOD.index("  - name: m") :]
    assert "model name 'm' appears twice" in _error(text)


def test_not_yaml_and_not_a_mapping() -> None:
    assert _error("a: [").startswith("topo.yaml: not valid YAML")
    assert "expected a mapping" in _error("- 1")


def test_environment_interpolation() -> None:
    t = parse_topology(GOOD, "topo.yaml", {"BOOT": "k1:9092,k2:9092"})
    assert t.kafka.bootstrap_servers == "k1:9092,k2:9092"
    assert interpolate({"a": ["x-${A}-$${B}"]}, {"A": "1"}) == {"a": ["x-1-${B}"]}
    assert interpolate("${MISSING:-fallback}", {}) == "fallback"


def test_unset_variable_names_the_field() -> None:
    text = GOOD.replace("${BOOT:-embedded}", "${BOOT}")
    assert (
        _error(text) == "topo.yaml: kafka.bootstrap_servers: environment variable BOOT is not set"
    )


def test_numbers_from_the_environment_are_converted() -> None:
    text = GOOD.replace("kafka:", "flow: {max_in_flight: '${N}'}\nkafka:")
    assert parse_topology(text, "t", {"N": "77"}).flow.max_in_flight == 77


def test_secrets_are_not_printed() -> None:
    text = GOOD.replace(
        '{bootstrap_servers: "${BOOT:-embedded}"}', "{security: {sasl_password: '${PW}'}}"
    )
    t = parse_topology(text, "t", {"PW": "hunter2"})
    assert "hunter2" not in repr(t)
    assert t.kafka.security.sasl_password is not None
    assert t.kafka.security.sasl_password.get_secret_value() == "hunter2"


def test_artifacts_are_relative_to_the_topology_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "t.yaml"
    path.write_text(GOOD)
    assert load_topology(path, env={}).models[0].artifact == tmp_path / "sub" / "model.onnx"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_topology(tmp_path / "nope.yaml")
