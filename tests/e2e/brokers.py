"""More real Kafka-protocol brokers for the tests, beside the embedded Tansu (memory).

- `NoidaBroker`: noida-db's Kafka service. It hides aborted transactions from
  ``read_committed`` readers and fences zombie producers, which Tansu does not, so the
  exactly-once tests run on it. Its clients need `NOIDA_CLIENT_SETTINGS`.
- `TansuS3Broker`: Tansu on its s3 storage engine, backed by a moto S3 server. Its data
  outlives the broker process, so a test can kill the broker and start it again on the
  same port and storage (`stop_broker`, `start_broker`).

Both are context managers and expose ``bootstrap_servers`` like
`pipeline.kafka.broker.EmbeddedBroker`. What each broker does and does not do is proven by
``test_brokers_pipe.py``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from pipeline.kafka.broker import EmbeddedBroker, free_port
from schemas.errors import BrokerError

__all__ = [
    "NOIDA_CLIENT_SETTINGS",
    "NOIDA_INSTALL_HINT",
    "TANSU_S3_INSTALL_HINT",
    "NoidaBroker",
    "TansuS3Broker",
    "noida_binary",
]

NOIDA_INSTALL_HINT = "noida-db is not installed: pip install noida-db==0.2.3 (or -e '.[dev]')"
TANSU_S3_INSTALL_HINT = "moto is not installed: pip install 'moto[server]' (or -e '.[dev]')"

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


def _wait_listening(
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


def _wait_metadata(bootstrap: str, settings: dict[str, str | int], deadline: float) -> None:
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


def _stop_group(proc: subprocess.Popen[bytes], timeout: float) -> None:
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
        """librdkafka settings every client of this broker needs (see the module)."""
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
            _wait_listening(self.port, self._proc, "noida-db", self.log_path, deadline)
            _wait_metadata(self.bootstrap_servers, self.client_settings, deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop it and its children (SIGTERM to its process group, then SIGKILL)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _stop_group(proc, timeout)
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


class TansuS3Broker(EmbeddedBroker):
    """Tansu with ``--storage-engine s3://tansu/`` on a moto S3 server; a context manager.

    It is an `EmbeddedBroker` (same binary, same port handling) whose storage lives in a
    moto server this object also runs. `stop_broker` and `start_broker` stop and start
    the Tansu process only, on the same port and storage: moto keeps the data meanwhile.
    """

    BUCKET = "tansu"

    def __init__(self, tmp_dir: Path, port: int | None = None) -> None:
        self.tmp_dir = Path(tmp_dir)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.moto_port = free_port()
        super().__init__(
            port=port,
            storage=f"s3://{self.BUCKET}/",
            log_path=self.tmp_dir / "tansu.log",
            env={
                "AWS_ENDPOINT": self.s3_endpoint,
                "AWS_ALLOW_HTTP": "true",
                "AWS_ACCESS_KEY_ID": "test",
                "AWS_SECRET_ACCESS_KEY": "test",
                "AWS_DEFAULT_REGION": "us-east-1",
            },
        )
        self.moto_log_path = self.tmp_dir / "moto.log"
        self._moto: subprocess.Popen[bytes] | None = None
        self._moto_log: IO[bytes] | None = None

    @property
    def s3_endpoint(self) -> str:
        """The moto server's URL."""
        return f"http://127.0.0.1:{self.moto_port}"

    @property
    def client_settings(self) -> dict[str, str | int]:
        """librdkafka settings that suit this broker (Tansu's group joins, as embedded)."""
        return {}

    def start(self, timeout: float = 30.0) -> TansuS3Broker:
        """Start moto (once), create the bucket, then start Tansu on it."""
        if self._moto is None:
            self._start_moto(timeout)
        try:
            self.start_broker(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def start_broker(self, timeout: float = 30.0) -> None:
        """Start the Tansu process on the same port and storage; wait for metadata."""
        if self.running:
            raise BrokerError("tansu is already running")
        deadline = time.monotonic() + timeout
        EmbeddedBroker.start(self, timeout)
        _wait_metadata(self.bootstrap_servers, self.client_settings, deadline)

    def stop_broker(self, kill: bool) -> None:
        """Stop the Tansu process only: SIGKILL if ``kill``, else SIGTERM (then SIGKILL)."""
        if kill:
            EmbeddedBroker.kill(self)
        EmbeddedBroker.stop(self)  # SIGTERM if still running; closes its log either way

    def stop(self, timeout: float = 2.0) -> None:
        """Stop Tansu, then moto (the data goes with it)."""
        EmbeddedBroker.stop(self, timeout)
        moto, self._moto = self._moto, None
        if moto is not None:
            _stop_group(moto, 5.0)
        if self._moto_log is not None:
            self._moto_log.close()
            self._moto_log = None

    def _start_moto(self, timeout: float) -> None:
        if importlib.util.find_spec("moto") is None or importlib.util.find_spec("boto3") is None:
            raise BrokerError(TANSU_S3_INSTALL_HINT)
        self._moto_log = open(self.moto_log_path, "ab")  # noqa: SIM115 - lives with moto
        self._moto = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "moto.server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.moto_port),
            ],
            stdout=self._moto_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        try:
            _wait_listening(self.moto_port, self._moto, "moto", self.moto_log_path, deadline)
            self._wait_http(deadline)
            self._create_bucket()
        except BaseException:
            self.stop()
            raise

    def _wait_http(self, deadline: float) -> None:
        while True:
            try:
                with urllib.request.urlopen(self.s3_endpoint + "/", timeout=2):
                    return
            except urllib.error.HTTPError:  # it answers: good enough
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _create_bucket(self) -> None:
        boto3: Any = importlib.import_module("boto3")  # untyped; a moto dependency
        s3 = boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
        )
        s3.create_bucket(Bucket=self.BUCKET)

    def __enter__(self) -> TansuS3Broker:
        return self.start()
