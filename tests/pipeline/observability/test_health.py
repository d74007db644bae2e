"""/metrics, /healthz and /readyz over real HTTP; a port in use is refused at start."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from pipeline.config.topology import MetricsSettings
from pipeline.observability.health import Health, MetricsServer
from pipeline.observability.metrics import Metrics
from schemas.errors import ConfigError


@pytest.fixture
def served() -> Iterator[tuple[MetricsServer, Health]]:
    health = Health(stale_after_s=5.0)
    with MetricsServer(MetricsSettings(host="127.0.0.1", port=0), Metrics(), health) as server:
        yield server, health


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_readyz_lists_what_is_missing_until_everything_is_there(
    served: tuple[MetricsServer, Health],
) -> None:
    server, health = served
    base = server.url.removesuffix("/metrics")
    status, body = _get(base + "/readyz")
    assert status == 503
    detail = json.loads(body)
    assert detail["ok"] is False
    assert detail["models_loaded"] is False
    health.models_loaded = True
    health.assignment = 3
    health.broker_up = True
    status, body = _get(base + "/readyz")
    assert status == 200
    assert json.loads(body)["partitions"] == 3
    health.broker_up = False  # the broker went away: alive, not ready
    assert _get(base + "/readyz")[0] == 503
    assert _get(base + "/healthz")[0] == 200


def test_healthz_fails_when_the_loop_stops_turning(served: tuple[MetricsServer, Health]) -> None:
    server, health = served
    base = server.url.removesuffix("/metrics")
    assert _get(base + "/healthz")[0] == 200
    health.heartbeat -= 10.0
    status, body = _get(base + "/healthz")
    assert status == 503
    assert json.loads(body)["loop_idle_s"] >= 10.0


def test_metrics_page_carries_the_catalog_and_the_ready_gauge(
    served: tuple[MetricsServer, Health],
) -> None:
    server, _ = served
    server.metrics.declare_model("m", ["cpu"])
    status, body = _get(server.url)
    assert status == 200
    text = body.decode()
    assert 'kp_results_total{model="m",status="OK"} 0.0' in text
    assert "kp_ready 0.0" in text
    assert "process_resident_memory_bytes" in text
    assert "_created" not in text
    assert _get(server.url.removesuffix("/metrics") + "/nope")[0] == 404


def test_a_port_in_use_is_refused_naming_where_it_was_set() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = MetricsSettings(host="127.0.0.1", port=port)
        with pytest.raises(
            ConfigError, match=rf"t.yaml: metrics.port: cannot listen on 127.0.0.1:{port}"
        ):
            MetricsServer(settings, Metrics(), Health(), where="t.yaml: metrics.port")
