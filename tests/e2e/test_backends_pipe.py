"""Every native backend served through the whole pipeline on the real broker.

Parity: the same network in ONNX, TorchScript, torch.export, a torch module factory and
a TensorFlow SavedModel gives the same numbers (tiny MLP: each within 1e-5 of the NumPy
reference; EfficientNet-Lite0: the torch formats within 1e-4 of ONNX Runtime's scores).
Instances: two copies of one model both take batches under a backlog. Plugins: a backend
from a separately installed package is listed, validated and served.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from e2e.kit import (
    MODELS,
    ROOT,
    Topics,
    read_all,
    spawn_run,
    start_background,
    tiny_vectors,
    wait_for,
)

from pipeline.config.topology import KafkaSettings
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.tools.samples import SAMPLES, sample_jpegs
from pipeline.tools.traffic import image_request, produce_requests, tensor_request
from pipeline.tools.zoo import tiny_mlp_reference
from schemas.codec import AvroCodec

TINY_MODELS = {
    "tiny-onnx": ("onnxruntime", "tiny_mlp.onnx", "{intra_op_threads: 1}"),
    "tiny-torchscript": ("torch", "tiny_mlp.pt", "{}"),
    "tiny-export": ("torch", "tiny_mlp.pt2", "{}"),
    "tiny-factory": (
        "torch",
        "tiny_mlp.pth",
        "{factory: 'pipeline.tools.zoo.tiny:tiny_mlp_module', "
        "inputs: [{name: x, datatype: FP32, shape: [64]}], "
        "outputs: [{name: logits, datatype: FP32, shape: [10]}]}",
    ),
    "tiny-tensorflow": ("tensorflow", "tiny_mlp.savedmodel", "{}"),
}


def _topology(path: Path, topics: Topics, models: str, max_in_flight: int = 4096) -> Path:
    path.write_text(
        f"""
kafka: {{bootstrap_servers: embedded, group_id: {topics.group}}}
topics: {{input: [{topics.input}], output: {topics.output}, dead_letter: {topics.dead_letter},
          create: false}}
flow: {{max_in_flight: {max_in_flight}, commit_interval_ms: 200}}
models:
{models}"""
    )
    return path


def _need(*files: str) -> None:
    missing = [f for f in files if not (MODELS / f).exists()]
    if missing:
        pytest.fail(f"models/ lacks {missing}: run `make models` (kp-pipeline models export)")


def test_the_tiny_mlp_in_every_format_gives_the_reference_numbers(
    broker: EmbeddedBroker, topics: Topics, tmp_path: Path
) -> None:
    _need(*(file for _, file, _ in TINY_MODELS.values()))
    models = "".join(
        f"""  - name: {name}
    backend: {backend}
    artifact: {MODELS / file}
    options: {options}
    inputs: [{{name: x, datatype: FP32, shape: [64]}}]
    batching: {{max_batch_size: 32, max_delay_ms: 5}}
"""
        for name, (backend, file, options) in TINY_MODELS.items()
    )
    topology = _topology(tmp_path / "tiny.yaml", topics, models)
    n = 150
    vectors = tiny_vectors(n, seed=11)
    codec = AvroCodec()
    records: list[tuple[bytes | None, bytes]] = []
    for i, v in enumerate(vectors):
        for name in TINY_MODELS:  # interleaved, so every model's batches share partitions
            rid = f"{name}/{i}"
            records.append(
                (rid.encode(), codec.encode_request(tensor_request(rid, name, {"x": v})))
            )
    produce_requests(KafkaSettings(), broker.bootstrap_servers, topics.input, records)

    served = start_background(topology, broker)
    msgs = read_all(broker, topics.output, count=len(records), timeout=120)
    stats = served.stop()

    assert stats.dead_letters == 0
    results = [codec.decode_result(m.value()) for m in msgs]
    assert sorted(r.id for r in results) == sorted(k.decode() for k, _ in records if k)
    reference = tiny_mlp_reference(vectors)
    by_model: dict[str, np.ndarray[Any, Any]] = {
        name: np.zeros((n, 10), np.float32) for name in TINY_MODELS
    }
    for r in results:
        name, i = r.id.split("/")
        assert r.model == name
        by_model[name][int(i)] = r.outputs["logits"]
    for name, logits in by_model.items():
        np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-5, err_msg=name)


@pytest.mark.image_model
def test_efficientnet_in_onnx_torchscript_and_torch_export_agree(
    broker: EmbeddedBroker, topics: Topics, tmp_path: Path
) -> None:
    formats = {
        "effnet-onnx": ("onnxruntime", "efficientnet_lite0.onnx"),
        "effnet-torchscript": ("torch", "efficientnet_lite0.pt"),
        "effnet-export": ("torch", "efficientnet_lite0.pt2"),
    }
    _need(*(file for _, file in formats.values()), "imagenet_labels.txt")
    models = "".join(
        f"""  - name: {name}
    backend: {backend}
    artifact: {MODELS / file}
    inputs: [{{name: image, datatype: BYTES, shape: [1]}}]
    batching: {{max_batch_size: 4, max_delay_ms: 10}}
    preprocess:
      - {{stage: decode_image, input: image}}
      - {{stage: resize, size: 256}}
      - {{stage: center_crop, size: 224}}
      - {{stage: normalize, mean: [127.0, 127.0, 127.0], std: [128.0, 128.0, 128.0], scale: 1.0}}
      - {{stage: to_nchw, output: input}}
    postprocess:
      - {{stage: softmax, input: logits}}
      - {{stage: topk, input: logits, k: 5, labels: {MODELS / "imagenet_labels.txt"}}}
"""
        for name, (backend, file) in formats.items()
    )
    topology = _topology(tmp_path / "effnet.yaml", topics, models, max_in_flight=64)
    codec = AvroCodec()
    photos = sample_jpegs()
    records: list[tuple[bytes | None, bytes]] = [
        (rid.encode(), codec.encode_request(image_request(rid, name, photos[s.name])))
        for s in SAMPLES
        for name in formats
        for rid in [f"{name}/{s.name}"]
    ]
    produce_requests(KafkaSettings(), broker.bootstrap_servers, topics.input, records)

    served = start_background(topology, broker)
    msgs = read_all(broker, topics.output, count=len(records), timeout=120)
    served.stop()

    results = {r.id: r for r in (codec.decode_result(m.value()) for m in msgs)}
    assert len(results) == len(records)
    expected = {s.name: s.expected for s in SAMPLES}
    for s in SAMPLES:
        onnx = results[f"effnet-onnx/{s.name}"]
        assert int(onnx.outputs["classes"][0]) in expected[s.name]
        for name in ("effnet-torchscript", "effnet-export"):
            other = results[f"{name}/{s.name}"]
            assert other.outputs["classes"].tolist() == onnx.outputs["classes"].tolist(), name
            np.testing.assert_allclose(
                other.outputs["scores"], onnx.outputs["scores"], rtol=0, atol=1e-4, err_msg=name
            )


def test_two_instances_both_take_batches_under_a_backlog(
    broker: EmbeddedBroker, topics: Topics, tmp_path: Path
) -> None:
    """Observed from the instances' own counters, not assumed from the configuration."""
    _need("tiny_mlp.pt")
    models = f"""  - name: tiny-mlp
    backend: torch
    artifact: {MODELS / "tiny_mlp.pt"}
    instances: 2
    inputs: [{{name: x, datatype: FP32, shape: [64]}}]
    batching: {{max_batch_size: 16, max_delay_ms: 5}}
"""
    topology = _topology(tmp_path / "two.yaml", topics, models)
    n = 4000
    codec = AvroCodec()
    vectors = tiny_vectors(n, seed=5)
    produce_requests(
        KafkaSettings(),
        broker.bootstrap_servers,
        topics.input,
        (
            (
                f"r-{i}".encode(),
                codec.encode_request(tensor_request(f"r-{i}", "tiny-mlp", {"x": v})),
            )
            for i, v in enumerate(vectors)
        ),
    )
    served = start_background(topology, broker)
    msgs = read_all(broker, topics.output, count=n, timeout=120)
    assert served.pipeline is not None
    runtime = served.pipeline.runtimes["tiny-mlp"]
    wait_for(lambda: runtime.busy == 0, 10, "the instances to go idle")
    instances = runtime.instance_stats()
    served.stop()

    assert len(msgs) == n
    assert [s.device for s in instances] == ["cpu", "cpu"]
    assert sum(s.rows for s in instances) == n
    for s in instances:
        assert s.batches > 0, instances
        assert s.rows >= n // 10, instances  # each carried a real share, not a stray batch


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test plugin package, installed by pip into a folder of its own.

    Built from a copy, so the build leaves nothing in the source tree.
    """
    source = tmp_path_factory.mktemp("src") / "kp_scale_backend"
    shutil.copytree(ROOT / "tests" / "plugins" / "kp_scale_backend", source)
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-cache-dir",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        timeout=300,
    )
    return target


def _plugin_env(plugin: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin), str(ROOT)])}


def _cli(args: list[str], plugin: Path, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env=_plugin_env(plugin),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        **kw,
    )


def test_a_backend_from_an_installed_package_is_found_and_serves(
    broker: EmbeddedBroker, topics: Topics, tmp_path: Path, plugin_path: Path
) -> None:
    listed = _cli(["backends"], plugin_path)
    assert listed.returncode == 0, listed.stderr
    line = next(x for x in listed.stdout.splitlines() if x.startswith("scale "))
    assert "yes" in line
    assert "kp_scale_backend:ScaleBackend" in line

    (tmp_path / "factor.txt").write_text("2.5\n")
    models = f"""  - name: scaler
    backend: scale
    artifact: {tmp_path / "factor.txt"}
    options: {{width: 4}}
    inputs: [{{name: x, datatype: FP32, shape: [4]}}]
"""
    topology = _topology(tmp_path / "plugin.yaml", topics, models)
    checked = _cli(["validate", str(topology)], plugin_path)
    assert checked.returncode == 0, checked.stderr
    assert "scaler v1 (scale on cpu): x FP32[4] → y FP32[4]" in checked.stdout

    codec = AvroCodec()
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    produce_requests(
        KafkaSettings(),
        broker.bootstrap_servers,
        topics.input,
        (
            (f"s-{i}".encode(), codec.encode_request(tensor_request(f"s-{i}", "scaler", {"x": v})))
            for i, v in enumerate(x)
        ),
    )
    log = tmp_path / "run.log"
    run = spawn_run(topology, broker, log, env=_plugin_env(plugin_path))
    try:
        msgs = read_all(broker, topics.output, count=10, timeout=90)
    finally:
        run.terminate()
        run.wait(timeout=60)
    assert run.returncode == 0, log.read_text()
    results = {r.id: r for r in (codec.decode_result(m.value()) for m in msgs)}
    for i in range(10):
        np.testing.assert_array_equal(results[f"s-{i}"].outputs["y"], x[i] * 2.5)
