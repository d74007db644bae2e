"""Throughput over TLS and SASL against plaintext, side by side in one run.

The tiny model serves a backlog of requests (``kp-pipeline run`` in its own process,
load/topologies/tiny-mlp.yaml) four ways: straight to the broker, and through the test
proxy (`load.netproxy`) in plaintext, with TLS, and with SASL_SSL (SCRAM-SHA-512). Tansu
0.6.0 serves neither TLS nor SCRAM, so the proxy terminates both: its TLS is Python's
``ssl`` module on one asyncio thread, which costs more than a broker's own TLS would,
so the TLS figures bound librdkafka's TLS cost from above. The plaintext-through-proxy
run is the fair baseline for them; the direct run shows what the proxy itself costs.

    python -m load.tls [--requests 200000]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from load.bench import topic_env
from load.certs import Pki, make_pki
from load.netproxy import KafkaProxy
from pipeline.kafka.broker import EmbeddedBroker, free_port
from pipeline.tools.traffic import tensor_request
from schemas.codec import AvroCodec

__all__ = ["main", "measure"]

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGY = ROOT / "load" / "topologies" / "tiny-mlp.yaml"
PASSWORD = "bench-password"
MODES = ("direct", "plaintext", "tls", "sasl_ssl")


def _security(mode: str, pki: Pki) -> dict[str, str]:
    if mode in ("direct", "plaintext"):
        return {}
    out = {"protocol": "SSL", "ssl_ca_location": pki.ca_pem}
    if mode == "sasl_ssl":
        out |= {"protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_username": "bench", "sasl_password": PASSWORD}  # fmt: skip
    return out


def _librdkafka(security: dict[str, str]) -> dict[str, Any]:
    names = {"protocol": "security.protocol", "ssl_ca_location": "ssl.ca.location",
             "sasl_mechanism": "sasl.mechanism", "sasl_username": "sasl.username",
             "sasl_password": "sasl.password"}  # fmt: skip
    return {names[k]: v for k, v in security.items()}


def _backlog(conf: dict[str, Any], topic: str, n: int) -> None:
    producer = Producer({**conf, "linger.ms": 20, "log_level": 3})
    codec = AvroCodec()
    x = np.ones(64, np.float32)
    for i in range(n):
        value = codec.encode_request(tensor_request(f"r{i}", "tiny-mlp", {"x": x}))
        while True:
            try:
                producer.produce(topic, value)
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(120):
        raise RuntimeError("the backlog did not reach the broker")


def _served(conf: dict[str, Any], topic: str, n: int, timeout: float) -> float:
    """Results per second, from the first result read to the n-th."""
    consumer = Consumer({**conf, "group.id": "tls-bench", "fetch.wait.max.ms": 10, "log_level": 3})
    meta = consumer.list_topics(topic, timeout=15).topics[topic]
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
    seen, first = 0, None
    deadline = time.monotonic() + timeout
    try:
        while seen < n and time.monotonic() < deadline:
            got = [m for m in consumer.consume(5000, 0.2) if m.error() is None]
            if got and first is None:
                first = time.monotonic()
            seen += len(got)
    finally:
        consumer.close()
    if seen < n or first is None:
        raise RuntimeError(f"{seen} of {n} results within {timeout:g} s")
    return n / (time.monotonic() - first)


def measure(mode: str, n: int, pki: Pki) -> float:
    """Requests per second served in ``mode``."""
    proxy_port = free_port()
    security = _security(mode, pki)
    advertised = None if mode == "direct" else f"127.0.0.1:{proxy_port}"
    with EmbeddedBroker(advertised=advertised) as broker:
        proxy = None
        if mode != "direct":
            proxy = KafkaProxy(
                broker.bootstrap_servers,
                port=proxy_port,
                cert=(pki.broker_pem, pki.broker_key) if mode != "plaintext" else None,
                users={"bench": PASSWORD} if mode == "sasl_ssl" else None,
            ).start()
        try:
            address = proxy.address if proxy else broker.bootstrap_servers
            env = topic_env(f"tls.{mode}.{os.getpid()}", address)
            conf = {"bootstrap.servers": address, **_librdkafka(security)}
            from confluent_kafka.admin import AdminClient

            from pipeline.kafka.clients import ensure_topics

            ensure_topics(
                AdminClient(conf), [env["KP_INPUT"], env["KP_OUTPUT"], env["KP_DLQ"]], 4, 1
            )
            _backlog(conf, env["KP_INPUT"], n)
            text = TOPOLOGY.read_text().replace(
                "kafka:\n", f"kafka:\n  security: {json.dumps(security)}\n", 1
            )
            with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=TOPOLOGY.parent) as f:
                f.write(text)
                f.flush()
                run = subprocess.Popen(
                    [sys.executable, "-m", "pipeline.cli", "run", f.name, "--bootstrap",
                     address, "--metrics-port", str(free_port())],
                    env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, cwd=ROOT,
                )  # fmt: skip
                try:
                    return _served(conf, env["KP_OUTPUT"], n, 300)
                finally:
                    run.send_signal(signal.SIGTERM)
                    run.wait(60)
        finally:
            if proxy is not None:
                proxy.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m load.tls", description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=200_000)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        pki = make_pki(Path(tmp))
        rates = {mode: measure(mode, args.requests, pki) for mode in MODES}
    base = rates["plaintext"]
    print("| path | requests/s | ÷ plaintext through the proxy |")
    print("|---|---:|---:|")
    for mode, rate in rates.items():
        print(f"| {mode} | {rate:,.0f} | {rate / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
