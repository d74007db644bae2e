"""noida-db, a second real Kafka-protocol broker, run on loopback for the tests and benchmarks.

Beside the embedded Tansu (`pipeline.kafka.broker`), noida-db's Kafka service: it hides
aborted transactions from ``read_committed`` readers and fences zombie producers, which
Tansu does not (the exactly-once tests run on it), and its fetches do not slow down as a
partition's history grows, which Tansu's do (`load.broker_floor`). Its clients need
`NOIDA_CLIENT_SETTINGS`. What it does and does not do is proven by
``tests/e2e/test_brokers_pipe.py``; `tests/e2e/brokers.py` adds Tansu on s3.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from pipeline.kafka.broker import free_port
from schemas.errors import BrokerError

__all__ = [
    "NOIDA_CLIENT_SETTINGS",
    "NOIDA_INSTALL_HINT",
    "NoidaBroker",
    "noida_binary",
    "stop_group",
    "wait_listening",
    "wait_metadata",
]

NOIDA_INSTALL_HINT = "noida-db is not installed: pip install noida-db==0.2.3 (or -e '.[dev]')"
# noida-db ignores fetch.max.bytes: a fetch response carries everything from the fetch
# position to the end of every partition asked for (a 200,000 x 1 KiB backlog came back
# as one 208 MB response). librdkafka drops a response larger than
# receive.message.max.bytes (default 100 MB) and retries the same fetch for ever: the
# consumer hangs with "Invalid response size ... increase receive.message.max.bytes".
# Its maximum, 2 GiB - 1, is the only value that bounds nothing a test can produce.
NOIDA_CLIENT_SETTINGS: dict[str, str | int] = {
    "receive.message.max.bytes": 2_147_483_647,
    # Not the embedded broker's short session (Tansu's): with 3 s and 1 s heartbeats a
    # replica joining an exactly-once group on noida-db never got its partitions.
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 3000,
}


def noida_binary() -> list[str]:
    """The command that runs noida-db: its binary from the wheel, else the wrapper on PATH.

    The ``noida-db`` console script is a Python wrapper that runs the binary as a child;
    running the binary itself saves a Python start and a process.
    """
    spec = importlib.util.find_spec("noida_db")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "noida-db"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    for folder in (str(Path(sys.executable).parent), None):
        found = shutil.which("noida-db", path=folder)
        if found:
            return [found]
    raise BrokerError(NOIDA_INSTALL_HINT)


def wait_listening(
    port: int, proc: subprocess.Popen[bytes], what: str, log: Path, deadline: float
) -> None:
    """Wait until ``port`` accepts a TCP connection; fail early if ``proc`` exits."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrokerError(f"{what} exited with {proc.returncode}; see {log}")
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=0.2),
        ):
            return
        time.sleep(0.02)
    raise BrokerError(f"{what} did not listen on {port} in time; see {log}")


def wait_metadata(bootstrap: str, settings: dict[str, str | int], deadline: float) -> None:
    """Wait until the broker answers a metadata request that names itself."""
    admin = AdminClient({"bootstrap.servers": bootstrap, **settings})
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if admin.list_topics(timeout=max(0.1, min(2.0, deadline - time.monotonic()))).brokers:
                return
        except KafkaException as e:
            last = e
        time.sleep(0.05)
    raise BrokerError(f"no metadata from {bootstrap} in time: {last}")


def stop_group(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM a process's group (it leads its own session), then SIGKILL it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    # Children (the wrapper's binary, werkzeug's reloader) may outlive their parent.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


class NoidaBroker:
    """noida-db's Kafka service alone, on a free loopback port; a context manager.

    ``data_dir`` is where it keeps its data (and its control file); a fresh one per
    broker.
    """

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        """The address clients connect to."""
        return f"127.0.0.1:{self.port}"

    @property
    def client_settings(self) -> dict[str, str | int]:
        """Librdkafka settings every client of this broker needs (see the module)."""
        return dict(NOIDA_CLIENT_SETTINGS)

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 20.0) -> NoidaBroker:
        """Start it and wait until it answers a metadata request."""
        cmd = [
            *noida_binary(),
            "start",
            "--only",
            "kafka",
            "--host",
            "127.0.0.1",
            "--kafka-port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
        ]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # It prints a harmless GLIBC version warning on Debian 12, then runs.
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self._proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        try:
            wait_listening(self.port, self._proc, "noida-db", self.log_path, deadline)
            wait_metadata(self.bootstrap_servers, self.client_settings, deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop it and its children (SIGTERM to its process group, then SIGKILL)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_group(proc, timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """SIGKILL it and its children (tests of broker failure)."""
        self.stop(timeout=0.0)

    def __enter__(self) -> NoidaBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
