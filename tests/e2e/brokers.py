"""More real Kafka-protocol brokers for the tests, beside the embedded Tansu (memory).

- `NoidaBroker` (from `load.brokers`, which the benchmarks use too): noida-db's Kafka
  service. It hides aborted transactions from ``read_committed`` readers and fences
  zombie producers, which Tansu does not, so the exactly-once tests run on it. Its
  clients need `NOIDA_CLIENT_SETTINGS`.
- `TansuS3Broker`: Tansu on its s3 storage engine, backed by a moto S3 server. Its data
  outlives the broker process, so a test can kill the broker and start it again on the
  same port and storage (`stop_broker`, `start_broker`).

Both are context managers and expose ``bootstrap_servers`` like
`pipeline.kafka.broker.EmbeddedBroker`. What each broker does and does not do is proven by
``test_brokers_pipe.py``.
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any

from load.brokers import (
    NOIDA_CLIENT_SETTINGS,
    NOIDA_INSTALL_HINT,
    NoidaBroker,
    noida_binary,
    stop_group,
    wait_listening,
    wait_metadata,
)
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

TANSU_S3_INSTALL_HINT = "moto is not installed: pip install 'moto[server]' (or -e '.[dev]')"


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
        wait_metadata(self.bootstrap_servers, self.client_settings, deadline)

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
            stop_group(moto, 5.0)
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
            wait_listening(self.moto_port, self._moto, "moto", self.moto_log_path, deadline)
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
