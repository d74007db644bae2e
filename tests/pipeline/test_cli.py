"""The command line: exit codes and messages a user sees for good and bad topologies, and
the cluster settings every command that talks to Kafka takes from its topology."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.cli import main
from schemas.codec import COMPILED

ROOT = Path(__file__).resolve().parents[2]
TINY = (ROOT / "load" / "topologies" / "tiny-mlp.yaml").read_text()


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "topology.yaml"
    path.write_text(text.replace("../../models/", f"{ROOT}/models/"))
    return path


def test_validate_prints_the_signature(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(_write(tmp_path, TINY))]) == 0
    out = capsys.readouterr().out
    assert "tiny-mlp v1 (onnxruntime on cpu): x FP32[64] → classes INT64[3], scores FP32[3]" in out


def test_validate_shows_the_scheduler_and_each_models_place_in_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = TINY.replace(
        "flow:", "scheduling: {enabled: true, concurrency: 1, devices: {cpu: 2}}\nflow:"
    ).replace(
        "    options: {intra_op_threads: 1}\n",
        "    options: {intra_op_threads: 1}\n    scheduling: {priority: 4, weight: 2}\n"
        "    ordering: key\n",
    )
    assert main(["validate", str(_write(tmp_path, text))]) == 0
    out = capsys.readouterr().out
    assert "  priority 4, weight 2, max_concurrent none, ordering key" in out
    assert "device scheduler: 1 batches per device (cpu 2), fair share by model" in out


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ("max_batch_size: 512", "max_batchsize: 512"),
            "models[0].batching.max_batchsize: unknown key",
        ),
        (
            ("shape: [64]", "shape: [63]"),
            "input 'x' is FP32[63] after preprocessing; the model wants FP32[64]",
        ),
        (("k: 3", "k: 3, top: 1"), "models[0].postprocess[1].top: unknown parameter"),
        (("tiny_mlp.onnx", "missing.onnx"), "models[0].artifact: no such file"),
        (
            ("stage: softmax", "stage: sofmax"),
            "models[0].postprocess[0].stage: unknown stage 'sofmax'",
        ),
        (
            ("max_in_flight: 20000", "max_in_flight: lots"),
            "flow.max_in_flight: Input should be a valid integer",
        ),
    ],
)
def test_bad_topology_is_refused_naming_file_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: tuple[str, str], message: str
) -> None:
    assert edit[0] in TINY
    path = _write(tmp_path, TINY.replace(*edit))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err
    assert message in err


def test_run_refuses_a_bad_topology_before_consuming(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, TINY.replace("backend: onnxruntime", "backend: onnxrt"))
    assert main(["run", str(path), "--bootstrap", "127.0.0.1:1"]) == 2
    assert "unknown backend 'onnxrt'" in capsys.readouterr().err


def test_produce_to_an_embedded_topology_explains_where_the_broker_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KP_BOOTSTRAP", raising=False)
    assert main(["produce", str(_write(tmp_path, TINY))]) == 2
    assert "kp-pipeline broker" in capsys.readouterr().err


def test_backends_lists_each_installed_backend_and_whether_it_runs_here(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["backends"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) >= {"onnxruntime", "torch", "tensorflow", "tensorrt"}
    assert rows["codec:"].split()[1] == ("compiled" if COMPILED else "pure")
    assert rows["onnxruntime"].split()[1] == "yes"
    assert "[backends.torch_runtime:TorchBackend]" in rows["torch"]
    assert "CUDA devices:" in rows["torch"]  # the backend's own probe() speaks, not a default
    tensorrt = rows["tensorrt"].split(None, 2)
    if importlib.util.find_spec("tensorrt") is None:  # the project's machines
        assert tensorrt[1] == "no"
        assert "No module named 'tensorrt'" in tensorrt[2]


def test_validate_shows_each_versions_share(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = TINY[TINY.index("  - name: tiny-mlp") :]
    text = TINY.replace(
        "models:", 'versions: {tiny-mlp: {default: "1", canary: {"2": 0.1}}}\nmodels:'
    ) + model.replace("name: tiny-mlp", "name: tiny-mlp\n    version: '2'")
    assert main(["validate", str(_write(tmp_path, text))]) == 0
    out = capsys.readouterr().out
    assert "tiny-mlp v2 (onnxruntime on cpu)" in out
    assert (
        "versions of tiny-mlp, for requests naming none (by record key): v1 90% (default), v2 10%"
        in out
    )


def test_validate_names_every_instance_device(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = TINY.replace(
        "    options: {intra_op_threads: 1}", "    instances: 3\n    device: [cpu, auto]"
    )
    assert main(["validate", str(_write(tmp_path, text))]) == 0
    assert "tiny-mlp v1 (onnxruntime on cpu, cpu, cpu)" in capsys.readouterr().out


def test_a_gpu_the_runtime_cannot_see_is_refused_naming_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    text = TINY.replace("    options: {intra_op_threads: 1}", "    device: cuda:0")
    assert main(["validate", str(_write(tmp_path, text))]) == 2
    err = capsys.readouterr().err
    assert (
        "models[0] (tiny-mlp): device 'cuda:0': onnxruntime (no CUDA provider) sees no CUDA" in err
    )


# -- every command reaches a secured cluster -------------------------------------------------

SECURED = """  bootstrap_servers: broker.example:9093
  security:
    protocol: SASL_SSL
    sasl_mechanism: PLAIN
    sasl_username: u
    sasl_password: p
    ssl_ca_location: /x
  producer:
    compression.type: lz4
"""
READERS = (
    "pipeline.tools.traffic.Consumer",
    "pipeline.tools.replay.Consumer",
    "pipeline.tools.dlq.reading.Consumer",
)
PRODUCERS = ("pipeline.tools.traffic.Producer",)


class RefusedError(Exception):
    """Raised by a recorded client: the command stops at its first Kafka client."""


@pytest.fixture
def clients(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """Every Consumer and Producer the commands make records its settings, then refuses."""
    made: list[tuple[str, dict[str, Any]]] = []

    def recorder(kind: str) -> Any:
        def record(conf: dict[str, Any], **_: Any) -> Any:
            made.append((kind, dict(conf)))
            raise RefusedError

        return record

    for target in READERS:
        monkeypatch.setattr(target, recorder("consumer"))
    for target in PRODUCERS:
        monkeypatch.setattr(target, recorder("producer"))

    def preflight(settings: Any, bootstrap: str, where: str, *_: Any, **__: Any) -> None:
        """The one connection before any work (pipeline.kafka.preflight), recorded."""
        made.append(("preflight", {"security": settings.security, "bootstrap": bootstrap}))

    for target in ("pipeline.kafka.preflight.check_access", "pipeline.tools.replay.check_access"):
        monkeypatch.setattr(target, preflight)
    return made


@pytest.mark.parametrize(
    "argv",
    [
        ("results", "{topology}"),
        ("results", "{topology}", "--dead-letters"),
        ("produce", "{topology}", "--tensor", "x={tensor}"),
        ("replay", "{topology}", "--output", "replayed", "--no-progress"),
        ("dlq", "inspect", "{topology}"),
        ("dlq", "redrive", "{topology}", "--all", "--yes"),
    ],
    ids=["results", "results-dead-letters", "produce", "replay", "dlq-inspect", "dlq-redrive"],
)
def test_commands_reach_the_cluster_with_the_topologys_security_and_client_settings(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    clients: list[tuple[str, dict[str, Any]]],
    argv: tuple[str, ...],
) -> None:
    monkeypatch.delenv("KP_BOOTSTRAP", raising=False)
    line = "  bootstrap_servers: ${KP_BOOTSTRAP:-embedded}\n"
    assert line in TINY
    text = TINY.replace(line, SECURED).replace(
        "    session.timeout.ms:", "    client.rack: rack-1\n    session.timeout.ms:"
    )
    topology = _write(tmp_path, text)
    np.save(tmp_path / "x.npy", np.zeros(64, np.float32))
    given = [a.format(topology=topology, tensor=tmp_path / "x.npy") for a in argv]
    with pytest.raises(RefusedError):
        main(given)
    [(first, checked), (kind, conf)] = clients
    assert first == "preflight"  # the one connection before any work comes first
    assert checked["bootstrap"] == "broker.example:9093"
    assert checked["security"].sasl_username == "u"
    assert conf["bootstrap.servers"] == "broker.example:9093"
    assert conf["security.protocol"] == "SASL_SSL"
    assert conf["sasl.mechanism"] == "PLAIN"
    assert (conf["sasl.username"], conf["sasl.password"]) == ("u", "p")
    assert conf["ssl.ca.location"] == "/x"
    if kind == "consumer":  # the topology's kafka.consumer, on a reader that commits nothing
        assert conf["client.rack"] == "rack-1"
        assert conf["enable.auto.commit"] is False
        assert "compression.type" not in conf
    else:
        assert conf["compression.type"] == "lz4"
        assert "client.rack" not in conf


def test_run_refuses_zero_workers(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["run", "topology.yaml", "--workers", "0"])
    assert e.value.code == 2
    assert "--workers: '0' is not a whole number of 1 or more" in capsys.readouterr().err


def test_models_sha256_prints_what_a_models_sha256_setting_takes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import hashlib

    path = tmp_path / "m.onnx"
    path.write_bytes(b"weights")
    assert main(["models", "sha256", str(path)]) == 0
    assert capsys.readouterr().out.strip() == f"{hashlib.sha256(b'weights').hexdigest()}  {path}"
    assert main(["models", "sha256", str(tmp_path / "nope")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
