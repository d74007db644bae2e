"""A Faust worker serving a topology through `pipeline.integrations.faust`: bench and tests.

`make_app` is the Faust app a user of the adapter would write, with the settings Tansu
needs; `FaustWorkerThread` runs it in this process on a thread of its own (a real
`faust.Worker`, without its signal handlers, which only the main thread may install),
so the benchmark can read the adapter's clocks and a test can stop it. As a program it
is the same worker in the foreground, stopped with Ctrl-C or SIGTERM::

    KP_BOOTSTRAP=127.0.0.1:9092 python -m load.faust_app load/topologies/tiny-mlp.yaml
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import faust

from pipeline.integrations.faust import KpFaustModel, attach

__all__ = ["FaustWorkerThread", "make_app"]

log = logging.getLogger(__name__)


def make_app(
    app_id: str,
    bootstrap: str,
    datadir: Path,
    commit_interval_s: float = 2.8,
    **settings: Any,
) -> faust.App:
    """A Faust app on ``bootstrap`` with what Tansu and the adapter need, nothing more.

    ``app_id`` is the consumer group. Tansu takes ``session.timeout.ms / 2`` to complete
    a group join, hence the 6 s session (and a heartbeat well inside it). No tables, no
    web server, and no leader topic (``topic_disable_leader``): the adapter needs none,
    so the worker creates no internal topics. ``datadir`` is where Faust keeps its
    per-app folder (tables would live there). Faust's other defaults stay, so the
    benchmark measures Faust as users get it; ``settings`` override any of them.
    """
    conf: dict[str, Any] = {
        "broker": f"kafka://{bootstrap}",
        "broker_session_timeout": 6.0,
        "broker_heartbeat_interval": 1.0,
        "broker_commit_interval": commit_interval_s,
        "consumer_auto_offset_reset": "earliest",
        "topic_disable_leader": True,
        "web_enabled": False,
        "store": "memory://",
        "datadir": str(datadir),
        "autodiscover": False,
    }
    conf.update(settings)
    return faust.App(app_id, **conf)


class _ThreadWorker(faust.Worker):
    """A worker that leaves signals to the main thread (they cannot be set from others)."""

    def install_signal_handlers(self) -> None:
        """Nothing: `FaustWorkerThread.stop` stops it instead of a signal."""


class FaustWorkerThread:
    """A `faust.Worker` for ``app`` on a thread with its own event loop."""

    def __init__(self, app: faust.App, loglevel: str = "warning") -> None:
        self.app = app
        self.loglevel = loglevel
        self.assigned = threading.Event()
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: _ThreadWorker | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"faust-{app.conf.id}")

        async def on_assigned(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
            if args and args[0]:  # the set of partitions assigned
                self.assigned.set()

        # mode's SignalHandlerT accepts no function mypy can check against it (not even
        # one spelled exactly as it is), so the receiver's type is waived here.
        app.on_partitions_assigned.connect(on_assigned)  # type: ignore[arg-type]

    def start(self, timeout: float = 60.0) -> FaustWorkerThread:
        """Start the worker; return once the group gave it partitions."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.assigned.wait(0.1):
            if not self._thread.is_alive():
                raise RuntimeError(f"Faust worker stopped before it got partitions: {self.error!r}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"Faust worker got no partitions within {timeout}s")
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the worker as SIGTERM would (Faust commits what is acked), then join."""
        self._started.wait(timeout)
        loop, worker = self._loop, self._worker
        if loop is not None and worker is not None and self._thread.is_alive():
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(worker.stop(), loop=loop))
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"Faust worker did not stop within {timeout}s")

    @property
    def crashed(self) -> bool:
        """Whether the app crashed (e.g. the adapter's agent on a `DeliveryError`)."""
        return bool(self.app.crashed)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            self._worker = _ThreadWorker(
                self.app,
                loop=loop,
                loglevel=self.loglevel,
                quiet=True,
                stdout=io.StringIO(),  # the start-up spinner draws on a terminal
                redirect_stdouts=False,
                override_logging=False,
            )
            self._loop = loop
            self._started.set()
            self._worker.execute_from_commandline()
        except SystemExit as e:  # how execute_from_commandline returns, also on a crash
            if e.code not in (0, None):
                self.error = self.app.crash_reason or e
        except BaseException as e:
            self.error = e
        finally:
            self._started.set()


def main(argv: list[str] | None = None) -> int:
    """Serve a topology with a Faust worker until Ctrl-C or SIGTERM."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m load.faust_app TOPOLOGY (KP_BOOTSTRAP=host:port)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO)
    model = KpFaustModel.from_topology(args[0])
    bootstrap = os.environ.get("KP_BOOTSTRAP", "127.0.0.1:9092")
    group = model.opened.topology.kafka.group_id
    with tempfile.TemporaryDirectory() as datadir:
        app = make_app(f"{group}-faust", bootstrap, Path(datadir))
        attach(app, model)
        worker = faust.Worker(app, loglevel="info")
        try:
            worker.execute_from_commandline()
        except SystemExit as e:
            return int(e.code or 0)
        finally:
            model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
