"""Backlog drain with and without ``max_age_ms``: old backlog as fast answers, not late ones.

The image model (EfficientNet-Lite0 on ONNX Runtime, the demo topology's settings, ~100
photos/s on 2 cores) finds a backlog of photo requests, half of them stamped ten minutes
ago. Served twice from the same backlog, in one run: without ``max_age_ms`` every request
runs; with ``max_age_ms: 60000`` the old half gets EXPIRED results without running.
Printed: how long until every request had an outcome, and until every fresh one had its
result.

    python -m load.staleness [--requests 1000]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from pipeline.kafka.broker import EmbeddedBroker, free_port
from pipeline.kafka.clients import ensure_topics
from pipeline.tools.samples import sample_jpegs
from pipeline.tools.traffic import image_request
from schemas.codec import AvroCodec
from schemas.messages import Status

__all__ = ["drain", "main"]

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGY = """
kafka: {{bootstrap_servers: embedded, group_id: {group}, consumer: {{session.timeout.ms: 6000}}}}
topics: {{input: [{input}], output: {output}, dead_letter: {dlq}, create: false}}
flow: {{max_in_flight: 512}}
models:
  - name: efficientnet-lite0
    backend: onnxruntime
    artifact: {models}/efficientnet_lite0.onnx
    instances: 2
    options: {{intra_op_threads: 1}}
    inputs: [{{name: image, datatype: BYTES, shape: [1]}}]
    batching: {{max_batch_size: 4, max_delay_ms: 10}}{max_age}
    preprocess:
      - {{stage: decode_image, input: image}}
      - {{stage: resize, size: 256, interpolation: bilinear}}
      - {{stage: center_crop, size: 224}}
      - {{stage: normalize, mean: [127.0, 127.0, 127.0], std: [128.0, 128.0, 128.0], scale: 1.0}}
      - {{stage: to_nchw, output: input}}
    postprocess:
      - {{stage: softmax, input: logits}}
      - {{stage: topk, input: logits, k: 5}}
"""


def drain(requests: int, max_age_ms: float | None) -> tuple[float, float, int]:
    """Seconds until every outcome, until every fresh result; how many expired."""
    tag = f"stale.{os.getpid()}.{time.monotonic_ns()}"
    names = {"input": f"{tag}.in", "output": f"{tag}.out", "dlq": f"{tag}.dlq", "group": tag}
    with EmbeddedBroker() as broker:
        address = broker.bootstrap_servers
        admin = AdminClient({"bootstrap.servers": address})
        ensure_topics(admin, [names["input"], names["output"], names["dlq"]], 4, 1)
        photos = list(sample_jpegs().values())
        codec = AvroCodec()
        producer = Producer({"bootstrap.servers": address, "linger.ms": 20, "log_level": 3})
        now_ms = int(time.time() * 1000)
        for i in range(requests):
            value = codec.encode_request(
                image_request(f"p{i}", "efficientnet-lite0", photos[i % len(photos)])
            )
            stamp = now_ms - 600_000 if i % 2 else now_ms
            producer.produce(names["input"], value, f"p{i}".encode(), timestamp=stamp)
        producer.flush(60)
        age = "" if max_age_ms is None else f"\n    max_age_ms: {max_age_ms:g}"
        text = TOPOLOGY.format(models=ROOT / "models", max_age=age, **names)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            f.write(text)
            f.flush()
            run = subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", "run", f.name, "--bootstrap", address,
                 "--metrics-port", str(free_port())],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
            )  # fmt: skip
            try:
                return _read(address, names["output"], requests)
            finally:
                run.send_signal(signal.SIGTERM)
                run.wait(60)


def _read(address: str, topic: str, requests: int) -> tuple[float, float, int]:
    consumer = Consumer({"bootstrap.servers": address, "group.id": "stale-reader",
                         "fetch.wait.max.ms": 10, "log_level": 3})  # fmt: skip
    meta = consumer.list_topics(topic, timeout=15).topics[topic]
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
    codec = AvroCodec()
    started = time.monotonic()
    seen: set[str] = set()
    fresh_done = None
    expired = 0
    fresh = {f"p{i}" for i in range(0, requests, 2)}
    try:
        while len(seen) < requests and time.monotonic() - started < 900:
            for m in consumer.consume(500, 0.2):
                value = m.value()
                if m.error() is not None or value is None:
                    continue
                result = codec.decode_result(value)
                seen.add(result.id)
                expired += result.status == Status.EXPIRED
                if fresh_done is None and fresh <= seen:
                    fresh_done = time.monotonic() - started
    finally:
        consumer.close()
    return time.monotonic() - started, fresh_done or float("nan"), expired


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m load.staleness", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--requests", type=int, default=1000)
    args = ap.parse_args(argv)
    print("| max_age_ms | every outcome after | every fresh result after | expired |")
    print("|---|---:|---:|---:|")
    for max_age in (None, 60_000.0):
        total, fresh, expired = drain(args.requests, max_age)
        label = "none" if max_age is None else f"{max_age:g}"
        print(f"| {label} | {total:.1f} s | {fresh:.1f} s | {expired} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
