"""Loading topology.yaml: validation errors that name the file and the field, ${VAR}s."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config.loader import interpolate, load_topology, parse_topology
from schemas.errors import ConfigError, format_path

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


def _edit(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new)


def test_good_topology_and_defaults() -> None:
    t = parse_topology(GOOD, "topo.yaml", {})
    assert t.kafka.embedded
    assert t.topics.input == ["a"]
    assert (t.topics.output, t.topics.dead_letter, t.topics.partitions) == ("b", "c", 4)
    [m] = t.models
    assert (m.name, m.version, m.backend, m.artifact) == (
        "m",
        "1",
        "onnxruntime",
        Path("model.onnx"),
    )
    assert (m.batching.max_batch_size, m.batching.max_delay_ms) == (32, 5.0)
    assert str(m.inputs[0].spec()) == "FP32[4]"
    assert t.flow.low_mark == t.flow.max_in_flight // 2


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "backend: onnxruntime",
            "backend: onnxruntime\n    batching: {max_batchsize: 3}",
            "topo.yaml: models[0].batching.max_batchsize: unknown key",
        ),
        ("shape: [4]", "shape: [4], dims: 2", "topo.yaml: models[0].inputs[0].dims: unknown key"),
        ("kafka:", "kafak: {}\nkafka:", "topo.yaml: kafak: unknown key"),
        (
            "artifact: model.onnx",
            "artifact: model.onnx\n    instances: zero",
            "topo.yaml: models[0].instances: Input should be a valid integer",
        ),
        (
            "backend: onnxruntime",
            "backend: onnxruntime\n    batching: {max_batch_size: [1]}",
            "topo.yaml: models[0].batching.max_batch_size: Input should be a valid integer",
        ),
        ("input: [a]", "input: a", "topo.yaml: topics.input: Input should be a valid list"),
        ("input: [a]", "input: []", "topo.yaml: topics.input: List should have at least 1 item"),
        (
            "topics: {input: [a], output: b, dead_letter: c}",
            "",
            "topo.yaml: topics: required, missing",
        ),
        (
            "output: b, dead_letter: c",
            "output: b",
            "topo.yaml: topics.dead_letter: required, missing",
        ),
        (
            "datatype: FP32",
            "datatype: FLOAT",
            "models[0].inputs[0].datatype: unknown datatype 'FLOAT'",
        ),
        ("shape: [4]", "shape: [0]", "models[0].inputs[0].shape: dimensions are positive"),
        ("name: m", "name: 'bad name'", "topo.yaml: models[0].name: String should match pattern"),
        (
            "artifact: model.onnx",
            "artifact: model.onnx\n    device: tpu",
            "topo.yaml: models[0].device: 'tpu' is not a device: cpu, auto, cuda, cuda:N, a GPU",
        ),
        (
            "artifact: model.onnx",
            "artifact: model.onnx\n    device: [cuda:0, gpu1]",
            "topo.yaml: models[0].device: 'gpu1' is not a device",
        ),
        (
            "artifact: model.onnx",
            "artifact: model.onnx\n    device: []",
            "topo.yaml: models[0].device: name at least one device",
        ),
        (
            "kafka:",
            "flow: {max_in_flight: 10, resume_below: 10}\nkafka:",
            "topo.yaml: flow: resume_below (10) must be below max_in_flight (10)",
        ),
        (
            "kafka:",
            "flow: {max_in_flight: 10, resume_below: 11}\nkafka:",
            "resume_below (11) must be below max_in_flight (10)",
        ),
        ("kafka:", "delivery: exactly_twice\nkafka:", "topo.yaml: delivery: Input should be"),
    ],
)
def test_errors_name_the_file_and_the_field(old: str, new: str, message: str) -> None:
    assert message in _error(_edit(old, new))


@pytest.mark.parametrize(
    ("device", "instances", "expected"),
    [
        ("cpu", 2, ["cpu", "cpu"]),
        ("cuda:1", 1, ["cuda:1"]),
        ("[cuda:0, cuda:1]", 4, ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]),
        ("[auto, cpu, cuda]", 2, ["auto", "cpu"]),
    ],
)
def test_instances_take_a_device_list_in_turn(
    device: str, instances: int, expected: list[str]
) -> None:
    text = _edit(
        "artifact: model.onnx",
        f"artifact: model.onnx\n    device: {device}\n    instances: {instances}",
    )
    topology = parse_topology(text, "topo.yaml", env={})
    assert topology.models[0].instance_devices() == expected


def test_every_error_is_reported_on_its_own_line() -> None:
    text = _edit("shape: [4]", "shape: [4], dims: 2").replace("output: b, ", "")
    lines = _error(text).splitlines()
    assert sorted(lines) == [
        "topo.yaml: models[0].inputs[0].dims: unknown key",
        "topo.yaml: topics.output: required, missing",
    ]


def test_a_model_listed_twice_in_the_same_version_is_refused() -> None:
    text = GOOD + GOOD[GOOD.index("  - name: m") :]
    message = _error(text)
    assert message.startswith("topo.yaml: ")
    assert message.endswith(
        "models[1]: model 'm' version '1' appears twice (a name may repeat only with another "
        "version)"
    )


def test_invalid_yaml_and_a_document_that_is_not_a_mapping() -> None:
    assert _error("a: [").startswith("topo.yaml: not valid YAML")
    assert _error("models:\n  - a\n - b").startswith("topo.yaml: not valid YAML")
    assert _error("- 1") == "topo.yaml: expected a mapping at the top level"
    assert _error("") == "topo.yaml: expected a mapping at the top level"


def test_resume_below_sets_the_low_mark() -> None:
    text = _edit("kafka:", "flow: {max_in_flight: 10, resume_below: 3}\nkafka:")
    assert parse_topology(text, "t", {}).flow.low_mark == 3


def test_variable_set_in_the_environment_replaces_the_default() -> None:
    t = parse_topology(GOOD, "topo.yaml", {"BOOT": "k1:9092,k2:9092"})
    assert t.kafka.bootstrap_servers == "k1:9092,k2:9092"
    assert not t.kafka.embedded


def test_process_environment_is_used_when_no_env_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOOT", "from-env:9092")
    assert parse_topology(GOOD, "t").kafka.bootstrap_servers == "from-env:9092"


@pytest.mark.parametrize(
    ("value", "env", "expected"),
    [
        ("${A}", {"A": "1"}, "1"),
        ("x-${A}-${B}-y", {"A": "1", "B": "two"}, "x-1-two-y"),
        ("${MISSING:-fallback}", {}, "fallback"),
        ("${MISSING:-}", {}, ""),
        ("${A:-fallback}", {"A": ""}, ""),  # set but empty is still set
        ("${A:-a b:c}", {}, "a b:c"),
        ("$${A}", {"A": "1"}, "${A}"),
        ("$${A} and ${A}", {"A": "1"}, "${A} and 1"),
        ("cost: $5 ${A}", {"A": "1"}, "cost: $5 1"),
        ("$A", {"A": "1"}, "$A"),
    ],
)
def test_interpolation(value: str, env: dict[str, str], expected: str) -> None:
    assert interpolate(value, env) == expected


def test_interpolation_walks_lists_and_maps_but_leaves_other_values() -> None:
    doc = {"a": ["x-${A}", {"b": "${A}"}], "n": 3, "f": True, "none": None}
    assert interpolate(doc, {"A": "1"}) == {
        "a": ["x-1", {"b": "1"}],
        "n": 3,
        "f": True,
        "none": None,
    }


def test_unset_variable_names_the_file_and_the_field() -> None:
    text = _edit("${BOOT:-embedded}", "${BOOT}")
    assert (
        _error(text) == "topo.yaml: kafka.bootstrap_servers: environment variable BOOT is not set"
    )
    text = _edit("input: [a]", "input: [a, '${IN}']")
    assert _error(text) == "topo.yaml: topics.input[1]: environment variable IN is not set"


def test_escaped_reference_reaches_the_topology_literally() -> None:
    text = _edit("output: b", "output: 'out-$${NOT_A_VAR}'")
    assert parse_topology(text, "t", {}).topics.output == "out-${NOT_A_VAR}"


def test_numbers_from_the_environment_are_converted() -> None:
    text = _edit("kafka:", "flow: {max_in_flight: '${N}'}\nkafka:")
    assert parse_topology(text, "t", {"N": "77"}).flow.max_in_flight == 77
    assert "flow.max_in_flight: Input should be a valid integer" in _error(text, {"N": "many"})


def test_secrets_are_not_printed() -> None:
    text = _edit(
        '{bootstrap_servers: "${BOOT:-embedded}"}',
        "{security: {protocol: SASL_SSL, sasl_mechanism: PLAIN, sasl_username: u, "
        "sasl_password: '${PW}'}}",
    )
    t = parse_topology(text, "t", {"PW": "hunter2"})
    assert "hunter2" not in repr(t)
    assert "hunter2" not in str(t.model_dump())
    assert t.kafka.security.sasl_password is not None
    assert t.kafka.security.sasl_password.get_secret_value() == "hunter2"


def test_relative_artifacts_resolve_against_the_topology_folder(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "t.yaml"
    path.write_text(_edit("artifact: model.onnx", "artifact: ../models/m.onnx"))
    artifact = load_topology(path, env={}).models[0].artifact
    assert artifact.is_absolute()
    assert artifact.resolve() == (tmp_path / "models" / "m.onnx").resolve()


def test_relative_topology_path_still_gives_absolute_artifacts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "t.yaml").write_text(GOOD)
    monkeypatch.chdir(tmp_path)
    assert load_topology("t.yaml", env={}).models[0].artifact == tmp_path.resolve() / "model.onnx"


def test_absolute_artifacts_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(_edit("artifact: model.onnx", "artifact: /opt/models/m.onnx"))
    assert load_topology(path, env={}).models[0].artifact == Path("/opt/models/m.onnx")


def test_file_errors_name_the_path(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(_edit("input: [a]", "input: [a], partitions: 0"))
    with pytest.raises(ConfigError) as e:
        load_topology(path, env={})
    assert str(e.value).startswith(f"{path}: topics.partitions: Input should be greater than")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'nope.yaml'}: cannot read"):
        load_topology(tmp_path / "nope.yaml")


def test_format_path() -> None:
    assert (
        format_path(("models", 0, "batching", "max_batch_size"))
        == "models[0].batching.max_batch_size"
    )
    assert format_path((0,)) == "[0]"
    assert format_path(()) == "(top level)"


def test_byte_marks_default_to_half_and_a_low_mark_above_the_high_one_is_refused() -> None:
    text = _edit("kafka:", "flow: {max_in_flight_bytes: 4096}\nkafka:")
    assert parse_topology(text, "t", {}).flow.low_mark_bytes == 2048
    bad = _edit("kafka:", "flow: {max_in_flight_bytes: 4096, resume_below_bytes: 5000}\nkafka:")
    message = _error(bad)
    assert message.startswith("topo.yaml: flow: ")
    assert "resume_below_bytes (5000) must be below max_in_flight_bytes (4096)" in message


def test_metrics_section_is_checked_by_field() -> None:
    message = _error(_edit("kafka:", "metrics: {port: 70000}\nkafka:"))
    assert message.startswith("topo.yaml: metrics.port: ")
    message = _error(_edit("kafka:", "metrics: {prot: 9000}\nkafka:"))
    assert message.startswith("topo.yaml: metrics.prot: ")


def test_lag_control_ceilings_below_the_configured_batching_are_refused() -> None:
    text = _edit(
        "backend: onnxruntime",
        "backend: onnxruntime\n    batching: {max_batch_size: 8, lag_control: {max_batch_size: 2}}",
    )
    message = _error(text)
    assert message.startswith("topo.yaml: models[0].batching: ")
    assert "lag_control.max_batch_size (2) is below max_batch_size (8)" in message


def test_topic_encodings_name_input_topics_and_known_encodings() -> None:
    t = parse_topology(
        _edit("dead_letter: c}", "dead_letter: c, encoding: {a: json}, result_encoding: avro}"),
        "topo.yaml",
        {},
    )
    assert (t.topics.encoding, t.topics.result_encoding) == ({"a": "json"}, "avro")
    assert parse_topology(GOOD, "topo.yaml", {}).topics.result_encoding == "request"
    wrong = _error(_edit("dead_letter: c}", "dead_letter: c, encoding: {z: json}}"))
    assert "topo.yaml" in wrong
    assert "topics" in wrong
    assert "encoding names ['z'], which are not input topics" in wrong
    kind = _error(_edit("dead_letter: c}", "dead_letter: c, encoding: {a: xml}}"))
    assert "topics.encoding.a" in kind
    headers = parse_topology(
        _edit("dead_letter: c}", "dead_letter: c, propagate_headers: [x-t]}"), "t", {}
    )
    assert headers.topics.propagate_headers == ["x-t"]
