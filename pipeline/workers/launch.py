"""Starting a group of workers from a command, and being one of them.

The supervisor side (`supervise`): pick each worker a loopback port for its own
endpoints, serve the group's endpoints on the topology's metrics port (`GroupServer`),
start the workers (`subprocess`, a fresh interpreter each: never ``fork`` after
librdkafka's threads exist), forward SIGTERM/SIGINT and wait for every drain.

The worker side (`as_worker`, `watch_parent`): worker I of a group is the same command
with ``--worker I``. It serves its endpoints on 127.0.0.1 only (the group's port is the
public one), its replica id is the group's plus ``-wI``, so each worker has its own
static group member id and its own exactly-once transactional id (a configured
``kafka.transactional_id`` gets the same suffix: N producers sharing one id would fence
each other), and it drains and exits if its supervisor dies, rather than live on as an
orphan nobody stops. Its environment has ``KP_WORKER=I``, which topology.yaml can read
(``device: cuda:${KP_WORKER:-0}`` gives each worker its own GPU).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

from pipeline.app import OpenTopology
from pipeline.config.topology import MetricsSettings
from pipeline.kafka.broker import free_port
from pipeline.kafka.clients import replica_id as kafka_replica_id
from pipeline.workers.group import GroupServer
from pipeline.workers.supervisor import RestartPolicy, Supervisor, Worker

__all__ = ["as_worker", "supervise", "watch_parent", "worker_argv"]

log = logging.getLogger(__name__)


def worker_argv(command: list[str], index: int, port: int | None, verbose: bool) -> list[str]:
    """``python -m pipeline.cli [-v] COMMAND... --worker I [--metrics-port P]``."""
    argv = [sys.executable, "-m", "pipeline.cli", *(["-v"] if verbose else []), *command]
    argv += ["--worker", str(index)]
    if port is not None:
        argv += ["--metrics-port", str(port)]
    return argv


def supervise(
    count: int,
    command: list[str],
    metrics: MetricsSettings,
    *,
    policy: RestartPolicy,
    drain_timeout_s: float,
    verbose: bool = False,
    where: str = "metrics.port",
    on_ready: Callable[[GroupServer | None], None] | None = None,
) -> int:
    """Run ``count`` workers of ``command`` until they are done or a signal stops them.

    ``metrics`` is where the group's endpoints are served (``enabled: false``: none, and
    the workers serve none either). Returns the supervisor's exit code.
    """
    ports: list[int | None] = (
        [free_port() for _ in range(count)] if metrics.enabled else [None] * count
    )

    def spawn(w: Worker) -> subprocess.Popen[bytes]:
        env = {**os.environ, "KP_WORKER": str(w.index)}  # topology.yaml may read ${KP_WORKER}
        return subprocess.Popen(worker_argv(command, w.index, w.port, verbose), env=env)

    supervisor = Supervisor(count, spawn, policy, ports=ports)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("%s: forwarding to %d workers", signal.Signals(signum).name, count)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = None
    if metrics.enabled:
        server = GroupServer(
            metrics.host,
            metrics.port,
            lambda: supervisor.workers,
            lambda: supervisor.gave_up,
            where,
        ).start()
    try:
        if on_ready is not None:
            on_ready(server)
        code = supervisor.run(stop, drain_timeout_s)
    finally:
        supervisor.stop()
        supervisor.kill()
        if server is not None:
            server.close()
    if supervisor.gave_up is not None:
        print(f"kp-pipeline: {supervisor.gave_up}", file=sys.stderr, flush=True)
    restarts = sum(w.restarts for w in supervisor.workers)
    log.info(
        "%d workers stopped (%d restarts); exit codes %s",
        count,
        restarts,
        ", ".join(str(w.last_exit) for w in supervisor.workers),
    )
    return code


def as_worker(opened: OpenTopology, index: int, replica: str | None) -> tuple[OpenTopology, str]:
    """Worker ``index``'s topology and replica id (see the module docstring)."""
    t = opened.topology
    name = f"{kafka_replica_id(replica)}-w{index}"
    kafka = t.kafka
    if kafka.transactional_id:
        kafka = kafka.model_copy(update={"transactional_id": f"{kafka.transactional_id}-w{index}"})
    metrics = t.metrics.model_copy(update={"host": "127.0.0.1"})
    topology = t.model_copy(update={"kafka": kafka, "metrics": metrics})
    return OpenTopology(topology, opened.source, opened.base_dir), name


def watch_parent(stop: threading.Event, every_s: float = 1.0) -> threading.Thread:
    """Set ``stop`` when the process that started this one is gone (it was SIGKILLed)."""
    parent = os.getppid()

    def watch() -> None:
        while not stop.wait(every_s):
            if os.getppid() != parent:
                log.warning("supervisor (pid %d) is gone: draining and exiting", parent)
                stop.set()

    thread = threading.Thread(target=watch, name="watch-parent", daemon=True)
    thread.start()
    return thread
