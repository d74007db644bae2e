"""A real Prometheus server for tests: scrapes given targets every second, evaluates our rules.

The binaries come from Debian's ``prometheus`` package (``/usr/bin/prometheus`` and
``promtool``). A missing binary fails the test with the install command: CI installs it
in ``make setup``, and a test that silently skipped would prove nothing.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

__all__ = [
    "ALERTS",
    "DEPLOY",
    "INSTALL",
    "JOB",
    "Prometheus",
    "PrometheusError",
    "free_port",
    "tool",
]

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
INSTALL = "apt-get install -y --no-install-recommends prometheus"
JOB = "kp-pipeline"

Sample = dict[str, Any]


class PrometheusError(RuntimeError):
    """Prometheus did not start, or its API answered with an error."""


def tool(name: str) -> str:
    """The path of ``prometheus`` or ``promtool``; fails the test when it is not installed."""
    debian = Path("/usr/bin") / name  # where the package puts it, even off PATH
    path = shutil.which(name) or (str(debian) if debian.is_file() else None)
    if path is None:
        pytest.fail(
            f"`{name}` is not installed: install Debian's Prometheus package with "
            f"`{INSTALL}` (as root; `make setup` does it on CI)",
            pytrace=False,
        )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _target(url: str) -> tuple[str, str]:
    """``http://host:port/metrics`` → (``host:port``, ``/metrics``)."""
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    return parts.netloc, parts.path or "/metrics"


class Prometheus:
    """One Prometheus process scraping ``targets`` (metrics URLs or ``host:port``).

    Scrapes and rule evaluations run every ``interval_s``; rules come from ``rule_files``
    (default: deploy/prometheus/alerts.yml). Use as a context manager, or `start`/`stop`.
    """

    def __init__(
        self,
        targets: Sequence[str],
        workdir: Path,
        rule_files: Sequence[Path] = (ALERTS,),
        interval_s: float = 1.0,
        job: str = JOB,
    ) -> None:
        paths = {_target(t)[1] for t in targets}
        if len(paths) > 1:
            raise ValueError(f"targets must share one metrics path, got {sorted(paths)}")
        self.targets = [_target(t)[0] for t in targets]
        self.metrics_path = paths.pop() if paths else "/metrics"
        self.workdir = workdir
        self.rule_files = [Path(p).resolve() for p in rule_files]
        self.interval_s = interval_s
        self.job = job
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "prometheus.log"
        self._proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def write_config(self) -> Path:
        """The configuration file (JSON is YAML), scraping ``targets`` as job ``job``."""
        interval = f"{round(self.interval_s * 1000)}ms"
        config = {
            "global": {
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "evaluation_interval": interval,
            },
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [
                {
                    "job_name": self.job,
                    "metrics_path": self.metrics_path,
                    "static_configs": [{"targets": self.targets}],
                }
            ],
        }
        path = self.workdir / "prometheus.yml"
        path.write_text(json.dumps(config, indent=2))
        return path

    def start(self, timeout: float = 30.0) -> Prometheus:
        """Start the server and wait until ``/-/ready`` answers."""
        binary = tool("prometheus")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.write_config()
        with self.log.open("wb") as log:
            self._proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise PrometheusError(
                    f"prometheus exited with {self._proc.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.1)
        self.stop()
        raise PrometheusError(f"prometheus not ready within {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        """The last lines Prometheus logged."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- HTTP API -------------------------------------------------------------------------

    def api(self, path: str, params: Sequence[tuple[str, str]] = ()) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data``; raises on an error answer."""
        query = urllib.parse.urlencode(list(params))
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:  # 400/422/503 carry a JSON error body
            try:
                body = json.load(e)
            except ValueError:
                raise PrometheusError(f"GET {url}: HTTP {e.code}") from None
        if body.get("status") != "success":
            raise PrometheusError(f"GET {url}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[Sample]:
        """An instant query: the result list (vector samples, or one scalar/string)."""
        params = [("query", expr)] + ([] if at is None else [("time", f"{at:.3f}")])
        data = self.api("query", params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[Sample]:
        """A range query, as a Grafana panel runs it: one matrix series per label set."""
        data = self.api(
            "query_range",
            [
                ("query", expr),
                ("start", f"{start:.3f}"),
                ("end", f"{end:.3f}"),
                ("step", f"{step:g}"),
            ],
        )
        return list(data["result"])

    def label_values(self, label: str, match: str | None = None) -> list[str]:
        """What Grafana's ``label_values(match, label)`` lists."""
        params = [] if match is None else [("match[]", match)]
        return list(self.api(f"label/{urllib.parse.quote(label)}/values", params))

    def rules(self) -> list[dict[str, Any]]:
        """The loaded rule groups (``/api/v1/rules``), each with its rules' health."""
        return list(self.api("rules")["groups"])

    def targets_health(self) -> dict[str, str]:
        """Each active target's scrape URL and health ("up", "down", "unknown")."""
        active = self.api("targets", [("state", "active")])["activeTargets"]
        return {t["scrapeUrl"]: t["health"] for t in active}

    def wait_for_scrape(self, scrapes: int = 1, timeout: float = 30.0) -> None:
        """Wait until every target has been scraped successfully ``scrapes`` times."""
        expr = f'sum_over_time(up{{job="{self.job}"}}[1h])'
        deadline = time.monotonic() + timeout
        counts: dict[str, float] = {}
        while time.monotonic() < deadline:
            counts = {
                s["metric"].get("instance", "?"): float(s["value"][1]) for s in self.query(expr)
            }
            if len(counts) == len(self.targets) and all(c >= scrapes for c in counts.values()):
                return
            time.sleep(self.interval_s / 2)
        raise PrometheusError(
            f"targets not scraped {scrapes} times within {timeout}s: successful scrapes "
            f"{counts}, targets {self.targets_health()}\n{self.log_tail()}"
        )
