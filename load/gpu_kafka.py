"""The Kafka parts of `load.gpu`: kp-pipeline end to end, the naive consumer, the host path.

Topologies are written as YAML at run time into the run's temporary folder, naming
stages and backends by import string (the project is not pip-installed on the GPU
machines, so there are no entry points there). Written for the GPU machines and NOT yet
run on one; ``--cpu-dry-run`` runs it all on the CPU (Pillow decoding, a small CNN).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient

from load import variants
from load.gpu_measure import GPU_STAGE, MEAN, PARTITIONS, STD, Measured, Setup, decoder_for, sampled
from pipeline.app import OpenTopology
from pipeline.config.loader import load_topology
from pipeline.kafka.clients import ensure_topics, producer_config
from pipeline.tools.traffic import image_request, produce_requests, tensor_request
from schemas.codec import AvroCodec
from schemas.messages import Request

__all__ = [
    "host_path",
    "image_topology",
    "kp_end_to_end",
    "naive_consumer",
    "produce_images",
    "tiny_topology",
    "workers_supported",
]

ROOT = Path(__file__).resolve().parents[1]


# -- topologies --------------------------------------------------------------------------


def image_topology(
    setup: Setup, tag: str, input_topic: str, instances: int, precision: str, batch: int
) -> OpenTopology:
    """GPU decode + the torch backend on the setup's device, in its own group and output."""
    assert setup.bootstrap is not None
    text = f"""
kafka:
  bootstrap_servers: {setup.bootstrap}
  group_id: gpu.{tag}
  consumer: {{session.timeout.ms: 6000}}
topics:
  input: [{input_topic}]
  output: gpu.{tag}.results
  dead_letter: gpu.{tag}.dlq
  partitions: {PARTITIONS}
flow:
  max_in_flight: {max(512, 8 * batch * instances)}
  commit_interval_ms: 500
metrics: {{port: 0}}
models:
  - name: gpu-image
    backend: backends.torch_runtime:TorchBackend
    artifact: {setup.artifact}
    device: {setup.device}
    instances: {instances}
    options:
      precision: {precision}
      inputs: [{{name: input, datatype: FP32, shape: [3, 224, 224]}}]
      outputs: [{{name: logits, datatype: FP32, shape: [1000]}}]
    inputs:
      - {{name: image, datatype: BYTES, shape: [1]}}
    batching: {{max_batch_size: {batch}, max_delay_ms: 5}}
    preprocess:
      - {{stage: "{GPU_STAGE}", input: image, output: input, resize: 256, crop: 224,
          mean: {MEAN}, std: {STD}, decoder: {decoder_for(setup.device)}}}
    postprocess:
      - {{stage: "stages.postprocess.classification:TopK", input: logits, k: 5}}
"""
    path = setup.tmp / f"{tag}.yaml"
    path.write_text(text)
    return OpenTopology(load_topology(path, env={}), str(path), path.parent)


def tiny_topology(bootstrap: str, tmp: Path, tag: str, input_topic: str) -> Path:
    """The tiny MLP (ONNX, written here) on the CPU: the host path, per-request costs."""
    from pipeline.tools.zoo.tiny import export_tiny_mlp_onnx

    model = tmp / "tiny_mlp.onnx"
    if not model.exists():
        export_tiny_mlp_onnx(tmp)
    path = tmp / f"{tag}.yaml"
    path.write_text(f"""
kafka:
  bootstrap_servers: {bootstrap}
  group_id: host.{tag}
  consumer: {{session.timeout.ms: 6000}}
topics:
  input: [{input_topic}]
  output: host.{tag}.results
  dead_letter: host.{tag}.dlq
  partitions: 16
flow: {{max_in_flight: 20000, consume_batch: 2000}}
metrics: {{port: 0}}
models:
  - name: tiny-mlp
    backend: backends.onnx_runtime:OnnxRuntimeBackend
    artifact: {model}
    options: {{intra_op_threads: 1}}
    inputs: [{{name: x, datatype: FP32, shape: [64]}}]
    batching: {{max_batch_size: 512, max_delay_ms: 5}}
    postprocess:
      - {{stage: "stages.postprocess.classification:Softmax", input: logits, output: probs}}
      - {{stage: "stages.postprocess.classification:TopK", input: probs, k: 3}}
""")
    return path


def produce_images(setup: Setup, topic: str, n: int) -> list[Request]:
    """Produce ``n`` image requests (the photos, cycled) once, for every Kafka variant."""
    assert setup.bootstrap is not None
    reqs = [
        image_request(f"img-{i:06d}", "gpu-image", setup.photos[i % len(setup.photos)], "image")
        for i in range(n)
    ]
    ensure_topics(AdminClient({"bootstrap.servers": setup.bootstrap}), [topic], PARTITIONS, 1)
    codec = AvroCodec()
    conf = load_topology_kafka(setup)
    produce_requests(
        conf, setup.bootstrap, topic, ((r.id.encode(), codec.encode_request(r)) for r in reqs)
    )
    return reqs


def load_topology_kafka(setup: Setup) -> Any:
    """Kafka settings of a throwaway image topology (for the producer's configuration)."""
    return image_topology(setup, "producer", "unused", 1, "fp32", 1).topology.kafka


def kp_end_to_end(
    setup: Setup, topic: str, n: int, instances: int, precision: str, batch: int, timeout: float
) -> Measured:
    """kp-pipeline as users run it (one process, a thread here), NVML sampled as it serves."""
    tag = f"kp.i{instances}.{precision}.b{batch}"
    opened = image_topology(setup, tag, topic, instances, precision, batch)
    row = Measured(f"kp-pipeline, {instances} instance(s), {precision}, batch ≤ {batch}", 0, 0.0)
    sampler = setup.sampler
    # NVML from partitions assigned to the last result delivered: the group join (seconds
    # of an idle GPU) is outside the timed window too.
    t = variants.kp_pipeline(
        opened,
        setup.bootstrap or "",
        n,
        timeout,
        on_started=None if sampler is None else sampler.start,
        before_stop=None if sampler is None else lambda: sampler.stop(row),
    )
    row.requests, row.seconds, row.note = t.requests, t.seconds, t.note
    return row


def naive_consumer(setup: Setup, topic: str, n: int, timeout: float) -> Measured:
    """One message, one GPU decode + inference, one flushed produce, one sync commit."""
    opened = image_topology(setup, "naive", topic, 1, "fp32", 1)
    m = opened.topology.models[0]
    graph = variants.reference_graph(opened, dict(m.options))
    src = variants.Source(
        setup.bootstrap or "",
        topic,
        producer_config(opened.topology.kafka, setup.bootstrap or ""),
        timeout,
        opened.topology.flow.poll_timeout_ms / 1000.0,
    )
    row = Measured("naive consumer (same GPU, fp32, batch 1)", 0, 0.0)
    try:
        with sampled(setup, row):
            t = variants.naive(graph, src, n)
    finally:
        graph.close()
    row.requests, row.seconds = t.requests, t.seconds
    return row


def workers_supported() -> bool:
    """Whether this tree's ``kp-pipeline run`` takes ``--workers`` (the host-path issue)."""
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
        timeout=60,
    )
    return "--workers" in out.stdout


def host_path(
    bootstrap: str, tmp: Path, n: int, workers: list[int], timeout: float
) -> list[Measured]:
    """The tiny model through ``kp-pipeline run`` (its own process), per worker count.

    Timed from outside, from the first result read to the last, so start-up and group
    joins are not counted. Without ``--workers`` in this tree, one process only.
    """
    topic = "host.requests"
    x = np.random.default_rng(20261124).standard_normal((n, 64), dtype=np.float32)
    reqs = [tensor_request(f"tiny-{i:06d}", "tiny-mlp", {"x": x[i]}) for i in range(n)]
    ensure_topics(AdminClient({"bootstrap.servers": bootstrap}), [topic], 16, 1)
    codec = AvroCodec()
    kafka = load_topology(tiny_topology(bootstrap, tmp, "producer", topic), env={}).kafka
    produce_requests(
        kafka, bootstrap, topic, ((r.id.encode(), codec.encode_request(r)) for r in reqs)
    )
    supported = workers_supported()
    rows = []
    for w in workers if supported else [1]:
        path = tiny_topology(bootstrap, tmp, f"w{w}", topic)
        cmd = [sys.executable, "-m", "pipeline.cli", "run", str(path), "--bootstrap", bootstrap]
        if supported:
            cmd += ["--workers", str(w)]
        rows.append(_served_from_outside(cmd, bootstrap, f"host.w{w}.results", n, timeout, w))
    return rows


def _served_from_outside(
    cmd: list[str], bootstrap: str, out_topic: str, n: int, timeout: float, workers: int
) -> Measured:
    ensure_topics(AdminClient({"bootstrap.servers": bootstrap}), [out_topic], 16, 1)
    reader = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"{out_topic}.reader",
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
        }
    )
    reader.subscribe([out_topic])
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen, first, last = 0, 0.0, 0.0
    deadline = time.monotonic() + timeout
    try:
        while seen < n and time.monotonic() < deadline:
            msgs = reader.consume(1000, 0.5)
            now = time.monotonic()
            got = sum(1 for m in msgs if m.error() is None)
            if got and not seen:
                first = now
            if got:
                seen, last = seen + got, now
            if proc.poll() is not None:
                err = (proc.stderr.read() if proc.stderr else b"").decode()[-300:]
                raise variants.BenchError(f"kp-pipeline exited {proc.returncode}: {err}")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        reader.close()
    label = f"host path, tiny model, kp-pipeline run, {workers} worker(s)"
    note = "" if seen >= n else f"only {seen} of {n} within {timeout:.0f} s"
    return Measured(label, seen, max(last - first, 1e-9), note)
