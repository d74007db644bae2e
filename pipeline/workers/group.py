"""One ``/metrics``, ``/healthz`` and ``/readyz`` for a process group of workers.

Each worker serves its own endpoints on a loopback port; the supervisor serves the
topology's metrics port and answers from the workers' answers, asked at request time:

* ``/metrics`` merges the workers' expositions, every sample labelled ``worker="I"``.
  Why an aggregating endpoint, not prometheus_client's multiprocess mode: that mode
  keeps only counters and histograms exact. Its gauges need a per-metric merge mode
  (``livesum``, ``max``…), it cannot carry custom collectors (our `BulkHistogram` and
  the process collector are ones), and it sums a restarted worker's counters back from
  zero into the total, which reads as a counter reset of the whole group. With a
  ``worker`` label every series stays what it was in one process: a partition's lag
  gauge comes from the worker that owns the partition, a restarted worker's counters
  reset on their own series (which `rate()` handles), ``process_*`` are per process,
  and every existing query that sums (``sum by (instance)``, ``sum by (topic)``) or
  takes the worst (``max by (topic, partition)``) reads the same as before.
  The exception is what is not the worker's own: ``kp_gpu_*`` gauges are NVML's
  readings of a whole device, the same for every worker on it, so they are exported
  once per device (the highest reading), without a ``worker`` label: a ``sum`` over
  them would otherwise count one GPU N times.
* ``/readyz`` is 200 only when every worker answers 200 on its own ``/readyz``; a worker
  being restarted is not ready.
* ``/healthz`` is 200 while the supervisor has not given up and every running worker's
  loop turns; a worker waiting to be restarted counts as alive (the supervisor is
  already restarting it; restarting the whole pod would not help more).

The supervisor's own series: ``kp_workers`` (how many are configured),
``kp_worker_up{worker}`` (1 when its scrape answered) and
``kp_worker_restarts_total{worker}``.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from http.server import ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from pipeline.observability.health import probe_handler
from pipeline.workers.supervisor import Worker
from schemas.errors import ConfigError

__all__ = [
    "DEVICE_WIDE",
    "GroupServer",
    "group_exposition",
    "group_health",
    "group_ready",
    "merge_metrics",
]

log = logging.getLogger(__name__)

# Gauges that read a whole device, not the worker: exported once (see the docstring).
DEVICE_WIDE = frozenset({"kp_gpu_memory_used_bytes", "kp_gpu_utilization_ratio"})


def merge_metrics(scrapes: Mapping[str, str]) -> list[Metric]:
    """The families of every worker's exposition, each sample labelled with its worker."""
    families: dict[str, Metric] = {}
    device_wide: dict[tuple[str, tuple[tuple[str, str], ...]], Sample] = {}
    for worker, text in scrapes.items():
        for fam in text_string_to_metric_families(text):
            merged = families.get(fam.name)
            if merged is None:
                merged = families[fam.name] = Metric(fam.name, fam.documentation, fam.type)
            for s in fam.samples:
                if fam.name in DEVICE_WIDE:
                    key = (s.name, tuple(sorted(s.labels.items())))
                    if key not in device_wide or s.value > device_wide[key].value:
                        device_wide[key] = s
                    continue
                merged.samples.append(
                    Sample(s.name, {**s.labels, "worker": worker}, s.value, s.timestamp)
                )
    for (name, _), s in sorted(device_wide.items(), key=lambda kv: kv[0]):
        families[name].samples.append(Sample(s.name, s.labels, s.value, s.timestamp))
    return list(families.values())


def group_exposition(scrapes: Mapping[str, str], workers: Iterable[Worker]) -> bytes:
    """The group's ``/metrics`` page from the pages of the workers that answered.

    The supervisor's own series (`_group_series`) count every worker, answering or not.
    """
    up = {w: True for w in scrapes}
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(merge_metrics(scrapes) + _group_series(workers, up)))
    return generate_latest(registry)


def _group_series(workers: Iterable[Worker], up: Mapping[str, bool]) -> list[Metric]:
    listed = list(workers)
    count = Metric("kp_workers", "Worker processes configured (--workers).", "gauge")
    count.add_sample("kp_workers", {}, float(len(listed)))
    alive = Metric("kp_worker_up", "1 when the worker answered this scrape.", "gauge")
    restarts = Metric(
        "kp_worker_restarts", "Times the supervisor started the worker again.", "counter"
    )
    for w in listed:
        alive.add_sample(
            "kp_worker_up", {"worker": str(w.index)}, 1.0 if up.get(str(w.index)) else 0.0
        )
        restarts.add_sample("kp_worker_restarts_total", {"worker": str(w.index)}, float(w.restarts))
    return [count, alive, restarts]


def group_ready(
    answers: Mapping[str, tuple[int, dict[str, Any]] | None],
) -> tuple[bool, dict[str, Any]]:
    """Ready when every worker answered its ``/readyz`` with 200."""
    ok = bool(answers) and all(a is not None and a[0] == 200 for a in answers.values())
    detail = {
        w: (a[1] if a is not None else {"ok": False, "running": False}) for w, a in answers.items()
    }
    return ok, {"workers": detail}


def group_health(
    answers: Mapping[str, tuple[int, dict[str, Any]] | None], gave_up: str | None
) -> tuple[bool, dict[str, Any]]:
    """Alive unless the supervisor gave up or a running worker's loop stopped turning.

    ``None`` is a worker with no process (waiting to be restarted) or one whose HTTP server
    is not up yet (starting): alive. A worker whose loop stopped turning still answers,
    with 503, from its own server thread.
    """
    stuck = [w for w, a in answers.items() if a is not None and a[0] != 200]
    detail: dict[str, Any] = {
        "workers": {
            w: (a[1] if a is not None else {"restarting": True}) for w, a in answers.items()
        }
    }
    if gave_up is not None:
        detail["gave_up"] = gave_up
    return gave_up is None and not stuck, detail


def _get(port: int, path: str, timeout: float) -> tuple[int, bytes] | None:
    """Status and body of ``GET http://127.0.0.1:port/path``; None when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()
    except (OSError, ValueError):
        return None


class GroupServer:
    """Serves the group's endpoints on ``host:port``, asking the workers at request time."""

    def __init__(
        self,
        host: str,
        port: int,
        workers: Callable[[], list[Worker]],
        gave_up: Callable[[], str | None],
        where: str = "metrics.port",
        timeout_s: float = 2.0,
    ) -> None:
        self.workers, self.gave_up, self.timeout_s = workers, gave_up, timeout_s
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="scrape")
        try:
            handler = probe_handler(self.metrics, self.probe)
            self._server = ThreadingHTTPServer((host, port), handler)
        except OSError as e:
            raise ConfigError(
                f"{where}: cannot listen on {host}:{port}: {e.strerror or e}; "
                "pick another port (--metrics-port) or disable metrics"
            ) from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="group-http", daemon=True
        )

    @property
    def port(self) -> int:
        """The port actually bound."""
        return int(self._server.server_address[1])

    def start(self) -> GroupServer:
        """Start serving; returns self."""
        self._thread.start()
        log.info("group metrics, /healthz and /readyz on port %d", self.port)
        return self

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._pool.shutdown(wait=False)

    def ask(self, path: str) -> dict[str, tuple[int, bytes] | None]:
        """Every worker's answer to ``path`` (None: not running or not answering)."""
        listed = self.workers()

        def one(w: Worker) -> tuple[int, bytes] | None:
            if w.port is None or not w.running:
                return None
            return _get(w.port, path, self.timeout_s)

        return {str(w.index): a for w, a in zip(listed, self._pool.map(one, listed), strict=True)}

    def metrics(self) -> bytes:
        """The merged exposition."""
        answers = self.ask("/metrics")
        texts = {w: a[1].decode() for w, a in answers.items() if a is not None and a[0] == 200}
        return group_exposition(texts, self.workers())

    def probe(self, path: str) -> tuple[bool, dict[str, Any]]:
        """The group's answer to ``/readyz`` or ``/healthz``."""
        answers = {w: _json(a) for w, a in self.ask(path).items()}
        if path == "/readyz":
            return group_ready(answers)
        return group_health(answers, self.gave_up())


class _Fixed:
    """A collector that yields families already built."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def _json(answer: tuple[int, bytes] | None) -> tuple[int, dict[str, Any]] | None:
    if answer is None:
        return None
    try:
        body = json.loads(answer[1])
    except ValueError:
        body = {"body": answer[1][:200].decode(errors="replace")}
    return answer[0], body if isinstance(body, dict) else {"body": body}
