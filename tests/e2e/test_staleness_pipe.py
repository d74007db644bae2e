"""Staleness by event time: ``max_age_ms`` on a backlog expires exactly the old requests.

A backlog of tiny-model requests whose record timestamps alternate between two minutes ago
and now is served with ``max_age_ms: 60000`` and a ``late_topic``: every old request gets
an EXPIRED result on the late topic without running, every fresh one is served on the
output topic, and ``kp_request_age_seconds`` counts the ones that reached the model.
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import numpy as np
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from e2e.kit import Topics, read_all, spawn_run, wait_for

from pipeline.kafka.broker import EmbeddedBroker, free_port
from pipeline.kafka.clients import ensure_topics
from pipeline.tools.traffic import tensor_request
from schemas.codec import AvroCodec
from schemas.messages import Status

N = 400


def test_max_age_expires_exactly_the_old_requests_of_a_backlog(
    broker: EmbeddedBroker, topics: Topics, tiny_topology: Path, tmp_path: Path
) -> None:
    late = f"{topics.output}-late"
    ensure_topics(AdminClient({"bootstrap.servers": broker.bootstrap_servers}), [late], 2, 1)
    text = tiny_topology.read_text().replace(
        "    options: {intra_op_threads: 1}\n",
        f"    options: {{intra_op_threads: 1}}\n    max_age_ms: 60000\n    late_topic: {late}\n",
    )
    tiny_topology.write_text(text)
    codec = AvroCodec()
    now_ms = int(time.time() * 1000)
    producer = Producer({"bootstrap.servers": broker.bootstrap_servers})
    old = set()
    for i in range(N):
        rid = f"s{i}"
        stamp = now_ms - 120_000 if i % 2 else now_ms  # every other one two minutes old
        if i % 2:
            old.add(rid)
        value = codec.encode_request(
            tensor_request(rid, "tiny-mlp", {"x": np.ones(64, np.float32)})
        )
        producer.produce(topics.input, value, rid.encode(), timestamp=stamp)
    assert producer.flush(30) == 0
    port = free_port()
    run = spawn_run(tiny_topology, broker, tmp_path / "run.log", metrics_port=port)
    try:
        served = read_all(broker, topics.output, N // 2)
        expired = read_all(broker, late, N // 2)

        def metrics() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return str(r.read().decode())

        wait_for(lambda: "kp_request_age_seconds_count" in metrics(), 30, "metrics")
        scraped = metrics()
    finally:
        run.terminate()
        run.wait(30)
    results = [codec.decode_result(m.value()) for m in served]
    stale = [codec.decode_result(m.value()) for m in expired]
    assert {r.id for r in results} == {f"s{i}" for i in range(N)} - old
    assert {r.status for r in results} == {Status.OK}
    assert {r.id for r in stale} == old
    assert {r.status for r in stale} == {Status.EXPIRED}
    assert all((r.error or "").startswith("older than max_age_ms 60000") for r in stale)
    assert all(r.batch_size == 0 for r in stale)  # none of them ran
    count = next(
        line for line in scraped.splitlines()
        if line.startswith('kp_request_age_seconds_count{model="tiny-mlp"}')
    )  # fmt: skip
    assert float(count.split()[-1]) == N // 2  # only the fresh ones reached the model
