"""The tiny model's throughput per request encoding, side by side in one run.

    python -m load.encodings [--requests 50000]

One embedded broker; the same FP32[64] requests produced once per encoding to a topic of
their own: Avro (the compiled codec's path), the Open Inference Protocol's v2 JSON body
with the tensor as a JSON list, the JSON body with the binary-data extension (the
tensor's bytes after the JSON, as Triton's clients send them), and the v2 protobuf
ModelInferRequest with typed contents and with raw_input_contents. kp-pipeline serves each
topic with the tiny topology (results in the request's encoding), timed by its own
clocks from the first record consumed to the last outcome delivered. Prints requests/s
and each encoding's ratio to Avro; compare only figures from one run.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from load import variants
from load.bench import ROOT, SEED, topic_env
from pipeline.app import OpenTopology
from pipeline.config.loader import load_topology
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.kafka.clients import ensure_topics
from schemas import oip_protobuf
from schemas.codec import AvroCodec
from schemas.messages import Request

ENCODINGS = ("avro", "json", "json+binary", "protobuf", "protobuf+raw")


Headers = list[tuple[str, str | bytes | None]]


def _values(encoding: str, x: np.ndarray[Any, Any]) -> list[tuple[bytes, Headers | None]]:
    """Each row of ``x`` as a request value (and the headers it needs) in ``encoding``."""
    if encoding == "avro":
        codec = AvroCodec()
        return [
            (codec.encode_request(Request(f"r{i}", "tiny-mlp", {"x": row})), None)
            for i, row in enumerate(x)
        ]
    out: list[tuple[bytes, Headers | None]] = []
    if encoding.startswith("protobuf"):
        message = oip_protobuf.messages["ModelInferRequest"]
        for i, row in enumerate(x):
            request = message(id=f"r{i}")
            t = request.inputs.add(name="x", datatype="FP32")
            t.shape.append(64)
            if encoding == "protobuf":
                t.contents.fp32_contents.extend(row.tolist())
            else:
                request.raw_input_contents.append(row.tobytes())
            out.append((request.SerializeToString(), None))
        return out
    for i, row in enumerate(x):
        tensor: dict[str, Any] = {"name": "x", "datatype": "FP32", "shape": [64]}
        if encoding == "json":
            body = {"id": f"r{i}", "inputs": [{**tensor, "data": row.tolist()}]}
            out.append((json.dumps(body).encode(), None))
        else:
            tensor["parameters"] = {"binary_data_size": 256}
            head = json.dumps({"id": f"r{i}", "inputs": [tensor]}).encode()
            length = str(len(head)).encode()
            out.append((head + row.tobytes(), [("Inference-Header-Content-Length", length)]))
    return out


def _run(broker: EmbeddedBroker, encoding: str, x: np.ndarray[Any, Any]) -> float:
    """Requests/s of kp-pipeline serving ``x`` in ``encoding`` on topics of its own."""
    bootstrap = broker.bootstrap_servers
    env = topic_env(f"enc.{encoding.replace('+', '-')}", bootstrap)
    path = ROOT / "load/topologies/tiny-mlp.yaml"
    topology = load_topology(path, env=env)
    if encoding != "avro":
        kind = encoding.split("+", maxsplit=1)[0]
        topics = topology.topics.model_copy(update={"encoding": {env["KP_INPUT"]: kind}})
        topology = topology.model_copy(update={"topics": topics})
    t = topology.topics
    ensure_topics(
        AdminClient({"bootstrap.servers": bootstrap}), [*t.input, t.output, t.dead_letter], 4, 1
    )
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for value, headers in _values(encoding, x):
        while True:
            try:
                producer.produce(env["KP_INPUT"], value, headers=headers)
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(60) == 0
    opened = OpenTopology(topology, str(path), path.parent)
    timing = variants.kp_pipeline(opened, bootstrap, len(x), 300.0)
    if timing.note:
        raise variants.BenchError(f"{encoding}: {timing.note}")
    return timing.requests / timing.seconds


def main(argv: list[str] | None = None) -> int:
    """Serve the same requests in each encoding; print the rates and ratios."""
    p = argparse.ArgumentParser(prog="python -m load.encodings", description=__doc__)
    p.add_argument("--requests", type=int, default=50_000)
    args = p.parse_args(argv)
    x = np.random.default_rng(SEED).standard_normal((args.requests, 64), dtype=np.float32)
    rates = {}
    with EmbeddedBroker() as broker:
        for encoding in ENCODINGS:
            rates[encoding] = _run(broker, encoding, x)
            print(f"{encoding:<12} {rates[encoding]:>10,.0f} requests/s", flush=True)
    print(f"\nTiny model, {args.requests:,} requests per encoding, one run:\n")
    print("| encoding | requests/s | ÷ Avro |")
    print("|---|---:|---:|")
    for encoding, rate in rates.items():
        print(f"| {encoding} | {rate:,.0f} | {rate / rates['avro']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
