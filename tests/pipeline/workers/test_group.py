"""The group's endpoints: merged metrics with a worker label, readiness and health of all.

`GroupServer` is tested against real worker endpoints (`MetricsServer` on loopback ports,
each with its own `Metrics` and `Health`), as a supervisor scrapes its workers.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.config.topology import MetricsSettings
from pipeline.observability.health import Health, MetricsServer
from pipeline.observability.metrics import Metrics
from pipeline.workers.group import GroupServer, group_health, group_ready, merge_metrics
from pipeline.workers.supervisor import Worker


def _exposition(consumed: float, lag: float, gpu_used: float) -> str:
    r = CollectorRegistry()
    Counter("kp_consumed_records", "c", ["topic", "partition"], registry=r).labels("in", "0").inc(
        consumed
    )
    Gauge("kp_consumer_lag_messages", "l", ["topic", "partition"], registry=r).labels(
        "in", "0"
    ).set(lag)
    Gauge("kp_gpu_memory_used_bytes", "g", ["device"], registry=r).labels("cuda:0").set(gpu_used)
    Histogram("kp_batch_size_requests", "h", ["model"], buckets=[1, 8], registry=r).labels(
        "m"
    ).observe(4)
    return generate_latest(r).decode()


def _samples(families: list) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:  # type: ignore[type-arg]
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def test_merge_labels_every_sample_with_its_worker_and_keeps_one_family_each() -> None:
    families = merge_metrics({"0": _exposition(5, 10, 100), "1": _exposition(7, 0, 300)})
    names = [f.name for f in families]
    assert len(names) == len(set(names))  # one family per name, samples of both inside
    samples = _samples(families)
    assert (
        samples["kp_consumed_records_total", (("partition", "0"), ("topic", "in"), ("worker", "0"))]
        == 5
    )
    assert (
        samples["kp_consumed_records_total", (("partition", "0"), ("topic", "in"), ("worker", "1"))]
        == 7
    )
    assert (
        samples["kp_consumer_lag_messages", (("partition", "0"), ("topic", "in"), ("worker", "0"))]
        == 10
    )
    assert samples["kp_batch_size_requests_count", (("model", "m"), ("worker", "1"))] == 1
    assert (
        samples["kp_batch_size_requests_bucket", (("le", "8.0"), ("model", "m"), ("worker", "0"))]
        == 1
    )


def test_device_wide_gpu_gauges_are_exported_once_per_device_not_per_worker() -> None:
    families = merge_metrics({"0": _exposition(0, 0, 100), "1": _exposition(0, 0, 300)})
    gpu = [s for f in families if f.name == "kp_gpu_memory_used_bytes" for s in f.samples]
    assert [(s.labels, s.value) for s in gpu] == [({"device": "cuda:0"}, 300)]


def test_the_group_is_ready_only_when_every_worker_is() -> None:
    ready = (200, {"ok": True})
    assert group_ready({"0": ready, "1": ready})[0]
    assert not group_ready({"0": ready, "1": (503, {"ok": False})})[0]
    ok, detail = group_ready({"0": ready, "1": None})  # being restarted
    assert not ok
    assert detail["workers"]["1"]["running"] is False
    assert not group_ready({})[0]


def test_the_group_is_alive_unless_a_loop_is_stuck_or_the_supervisor_gave_up() -> None:
    alive = (200, {"ok": True})
    assert group_health({"0": alive, "1": None}, None)[0]  # one restarting: still alive
    assert not group_health({"0": alive, "1": (503, {"ok": False})}, None)[0]
    ok, detail = group_health({"0": alive}, "worker 1 keeps failing")
    assert not ok
    assert detail["gave_up"] == "worker 1 keeps failing"


@pytest.fixture
def two_workers() -> Iterator[tuple[list[Worker], list[Health], list[Metrics]]]:
    settings = MetricsSettings(host="127.0.0.1", port=0)
    healths = [Health(), Health()]
    metrics = [Metrics(), Metrics()]
    servers = [MetricsServer(settings, m, h).start() for m, h in zip(metrics, healths, strict=True)]
    workers = [Worker(i, s.port, proc=object()) for i, s in enumerate(servers)]  # type: ignore[arg-type]
    try:
        yield workers, healths, metrics
    finally:
        for s in servers:
            s.close()


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_group_server_answers_for_real_worker_endpoints(
    two_workers: tuple[list[Worker], list[Health], list[Metrics]],
) -> None:
    workers, healths, metrics = two_workers
    for h in healths:
        h.models_loaded, h.assignment, h.broker_up = True, 2, True
    healths[1].assignment = None  # not assigned yet
    metrics[0].assigned.set(2)
    server = GroupServer("127.0.0.1", 0, lambda: workers, lambda: None).start()
    try:
        status, body = _get(server.port, "/readyz")
        assert status == 503
        assert json.loads(body)["workers"]["1"]["assigned"] is False
        healths[1].assignment = 2
        assert _get(server.port, "/readyz")[0] == 200
        assert _get(server.port, "/healthz")[0] == 200

        healths[0].heartbeat = time.monotonic() - 3600  # worker 0's loop stopped turning
        assert _get(server.port, "/healthz")[0] == 503

        status, text = _get(server.port, "/metrics")
        assert status == 200
        samples = _samples(list(text_string_to_metric_families(text)))
        assert samples["kp_assigned_partitions", (("worker", "0"),)] == 2
        assert samples["kp_ready", (("worker", "1"),)] == 1
        assert samples["kp_worker_up", (("worker", "1"),)] == 1
        assert samples["kp_workers", ()] == 2

        workers[1].proc = None  # died: waiting to be restarted
        workers[1].restarts = 1
        samples = _samples(list(text_string_to_metric_families(_get(server.port, "/metrics")[1])))
        assert samples["kp_worker_up", (("worker", "1"),)] == 0
        assert samples["kp_worker_restarts_total", (("worker", "1"),)] == 1
        assert ("kp_ready", (("worker", "1"),)) not in samples
        assert _get(server.port, "/readyz")[0] == 503
    finally:
        server.close()
