"""One HTTP port for operators: ``/metrics``, ``/healthz`` and ``/readyz``.

``/healthz`` (liveness) fails only when the main loop has stopped turning: a restart
would help then, and nothing else. ``/readyz`` (readiness) says whether this replica is
serving: its models are loaded, the consumer group has given it an assignment, and a
broker is reachable. While the broker is away a replica is alive but not ready, which is
what an orchestrator should see: restarting it would not bring the broker back.

The server runs on its own daemon thread (`http.server.ThreadingHTTPServer`) and reads
state the Kafka thread writes: plain attribute reads and writes, no locks needed.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pipeline.config.topology import MetricsSettings
from pipeline.observability.metrics import Metrics
from schemas.errors import ConfigError

__all__ = ["Health", "MetricsServer", "probe_handler"]

log = logging.getLogger(__name__)


class Health:
    """Liveness and readiness, updated by the pipeline's Kafka thread."""

    def __init__(self, stale_after_s: float = 30.0) -> None:
        self.stale_after_s = stale_after_s
        self.heartbeat = time.monotonic()
        self.models_loaded = False
        self.assignment: int | None = None  # partitions, once the group has assigned any
        self.broker_up = False
        self.stopping = False
        # Models whose latest control record this replica cannot apply, and why
        # (`pipeline.lifecycle.follower`): the group would be half switched.
        self.versions_behind: dict[str, str] = {}

    def beat(self) -> None:
        """The main loop turned."""
        self.heartbeat = time.monotonic()

    def alive(self) -> tuple[bool, dict[str, Any]]:
        """Whether the main loop turned recently."""
        idle = time.monotonic() - self.heartbeat
        return idle < self.stale_after_s, {"loop_idle_s": round(idle, 3)}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Whether this replica is serving, and what is missing if not."""
        checks = {
            "models_loaded": self.models_loaded,
            "assigned": self.assignment is not None,
            "broker_reachable": self.broker_up,
            "not_stopping": not self.stopping,
            "versions_in_step": not self.versions_behind,
        }
        detail: dict[str, Any] = {**checks, "partitions": self.assignment or 0}
        if self.versions_behind:
            detail["versions_behind"] = dict(self.versions_behind)
        return all(checks.values()), detail


class MetricsServer:
    """Serves a `Metrics` registry and a `Health` on ``host:port``."""

    def __init__(
        self,
        settings: MetricsSettings,
        metrics: Metrics,
        health: Health,
        where: str = "metrics.port",
    ) -> None:
        self.metrics = metrics
        self.health = health
        handler = _handler(self)
        try:
            self._server = ThreadingHTTPServer((settings.host, settings.port), handler)
        except OSError as e:
            raise ConfigError(
                f"{where}: cannot listen on {settings.host}:{settings.port}: "
                f"{e.strerror or e}; pick another port (--metrics-port) or disable metrics"
            ) from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )

    @property
    def port(self) -> int:
        """The port actually bound (settings may ask for 0: any free port)."""
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Where ``/metrics`` is served (loopback form, for tools and tests)."""
        host = str(self._server.server_address[0])
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://{host}:{self.port}/metrics"

    def start(self) -> MetricsServer:
        """Start serving; returns self."""
        self._thread.start()
        log.info("metrics, /healthz and /readyz on port %d", self.port)
        return self

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _handler(server: MetricsServer) -> type[BaseHTTPRequestHandler]:
    def metrics() -> bytes:
        server.metrics.ready.set(1 if server.health.ready()[0] else 0)
        return generate_latest(server.metrics.registry)

    def probe(path: str) -> tuple[bool, dict[str, Any]]:
        return server.health.alive() if path == "/healthz" else server.health.ready()

    return probe_handler(metrics, probe)


def probe_handler(
    metrics: Callable[[], bytes], probe: Callable[[str], tuple[bool, dict[str, Any]]]
) -> type[BaseHTTPRequestHandler]:
    """The HTTP face of a process (or a process group): /metrics, /healthz and /readyz.

    ``probe`` answers ``/healthz`` or ``/readyz`` (its argument) with whether it holds
    and the details shown as JSON.
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(HTTPStatus.OK, metrics(), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/readyz"):
                ok, detail = probe(path)
                body = json.dumps({"ok": ok, **detail}).encode()
                status = HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE
                self._send(status, body, "application/json")
            else:
                self._send(
                    HTTPStatus.NOT_FOUND, b"try /metrics, /healthz or /readyz\n", "text/plain"
                )

        def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("http: " + format, *args)

    return Handler
