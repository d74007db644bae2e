"""N worker processes started, restarted and stopped by one command (``--workers N``).

A worker is a whole replica in its own process: `kp-pipeline run` (or ``replay``) started
again with ``--worker I``. Processes, not threads, because the host path is Python and one
GIL: decode, encode and the loop's bookkeeping get a core each. Workers are started with
`subprocess` (a fresh interpreter, never ``fork`` after librdkafka's threads exist).

The policy, in one place (`RestartPolicy`):

* A worker that dies (a non-zero exit, or killed by a signal) is started again after a
  backoff that doubles with each consecutive quick failure (``backoff_s`` up to
  ``max_backoff_s``). A worker that ran ``healthy_after_s`` or longer before dying starts
  again after the first backoff: one crash an hour is not a crash loop.
* A worker that fails ``max_quick_failures`` times in a row, each time within
  ``healthy_after_s`` of its start, is crash-looping (a bad model, a broken node): the
  supervisor gives up, stops the others (they drain) and exits 1 with the reason.
  A worker that exits with `ExitCode.BAD_INPUT` (a bad topology or graph) gives up at
  once, and the supervisor exits 2 too: the same command cannot succeed on a second try.
* A worker that exits 0 by itself is done when ``clean_exit_is_done`` (a replay worker whose
  share of the range is served); a serving worker only exits 0 when told to stop, so an
  unasked clean exit is restarted like a crash.
* `Supervisor.stop` (SIGTERM/SIGINT to the supervisor) sends SIGTERM to every live worker:
  each stops pulling, drains, commits and exits. Nothing is restarted after that. The
  supervisor's exit code is 0 only when every worker's last exit was 0.

The supervisor holds no Kafka client: Kafka's group protocol moves a dead worker's
partitions to the others (and back, once it has restarted).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from schemas.errors import ExitCode

__all__ = ["Proc", "RestartPolicy", "Supervisor", "Worker", "worker_count"]

log = logging.getLogger(__name__)


class Proc(Protocol):
    """What the supervisor needs of a process (`subprocess.Popen` has it; tests fake it)."""

    pid: int

    def poll(self) -> int | None: ...  # noqa: D102

    def send_signal(self, sig: int) -> None: ...  # noqa: D102

    def kill(self) -> None: ...  # noqa: D102


@dataclass(frozen=True)
class RestartPolicy:
    """When a dead worker is started again, and when the supervisor gives up."""

    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    healthy_after_s: float = 30.0
    max_quick_failures: int = 5
    clean_exit_is_done: bool = False

    def delay(self, quick_failures: int) -> float:
        """The wait before the next start, after ``quick_failures`` in a row (at least 1)."""
        return min(self.max_backoff_s, self.backoff_s * 2.0 ** max(0, quick_failures - 1))


@dataclass
class Worker:
    """One worker slot: its current process, if any, and its history."""

    index: int
    port: int | None = None  # its own /metrics, /healthz, /readyz (loopback)
    proc: Proc | None = None
    started_at: float = 0.0
    restart_at: float | None = None  # when a dead worker is due to start again
    quick_failures: int = 0
    restarts: int = 0
    last_exit: int | None = None
    done: bool = False  # exited 0 by itself where that means finished (replays)

    @property
    def running(self) -> bool:
        """Whether a process of this worker is alive (as of the last `Supervisor.poll`)."""
        return self.proc is not None


@dataclass
class Supervisor:
    """Keeps ``count`` workers running; see the module docstring for the policy.

    ``spawn(index)`` starts worker ``index``'s process. ``clock`` is injectable so the
    policy is tested without sleeping. All methods are called from one thread (the
    command's main thread); the metrics server thread only reads `workers`.
    """

    count: int
    spawn: Callable[[Worker], Proc]
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    clock: Callable[[], float] = time.monotonic
    ports: list[int | None] | None = None

    def __post_init__(self) -> None:
        ports = self.ports or [None] * self.count
        self.workers = [Worker(i, ports[i]) for i in range(self.count)]
        self.stopping = False
        self.gave_up: str | None = None
        self.gave_up_code = ExitCode.FAILED

    def start(self) -> None:
        """Start every worker."""
        for w in self.workers:
            self._start(w)

    def _start(self, w: Worker) -> None:
        w.proc = self.spawn(w)
        w.started_at = self.clock()
        w.restart_at = None
        log.info("worker %d started (pid %d)", w.index, w.proc.pid)

    def poll(self) -> None:
        """Reap dead workers, decide their fate, start the ones that are due."""
        now = self.clock()
        for w in self.workers:
            if w.proc is not None:
                code = w.proc.poll()
                if code is not None:
                    self._exited(w, code, now)
            if w.restart_at is not None and now >= w.restart_at and not self.stopping:
                w.restarts += 1
                self._start(w)

    def _exited(self, w: Worker, code: int, now: float) -> None:
        w.proc, w.last_exit = None, code
        how = f"killed by {_signal_name(-code)}" if code < 0 else f"exit {code}"
        if self.stopping:
            log.log(logging.INFO if code == 0 else logging.WARNING, "worker %d: %s", w.index, how)
            return
        if code == 0 and self.policy.clean_exit_is_done:
            w.done = True
            log.info("worker %d finished", w.index)
            return
        if code == ExitCode.BAD_INPUT:
            self._give_up(f"worker {w.index} refused its topology or command line ({how})")
            self.gave_up_code = ExitCode.BAD_INPUT
            return
        quick = now - w.started_at < self.policy.healthy_after_s
        w.quick_failures = w.quick_failures + 1 if quick else 1
        if quick and w.quick_failures >= self.policy.max_quick_failures:
            self._give_up(
                f"worker {w.index} keeps failing at start: {w.quick_failures} times in a row "
                f"within {self.policy.healthy_after_s:g} s of starting (last: {how}); "
                "see its log above"
            )
            return
        delay = self.policy.delay(w.quick_failures)
        w.restart_at = now + delay
        log.warning("worker %d %s; starting it again in %.1f s", w.index, how, delay)

    def _give_up(self, reason: str) -> None:
        log.error("giving up: %s", reason)
        self.gave_up = reason
        self.stop()

    def stop(self) -> None:
        """Ask every live worker to drain and exit (SIGTERM); restart nothing from now on."""
        self.stopping = True
        for w in self.workers:
            w.restart_at = None
            if w.proc is not None:
                w.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the workers still alive (a drain that outlived its deadline)."""
        for w in self.workers:
            if w.proc is not None:
                log.error("worker %d did not stop in time: killing it", w.index)
                w.proc.kill()

    @property
    def finished(self) -> bool:
        """Nothing runs and nothing will: all stopped after `stop`, or all done."""
        if any(w.proc is not None for w in self.workers):
            return False
        return self.stopping or all(w.done for w in self.workers)

    def exit_code(self) -> int:
        """0 when every worker's last exit was 0 and the supervisor did not give up.

        A worker that refused its topology makes it 2 (`ExitCode.BAD_INPUT`), as the same
        command without ``--workers`` would have exited.
        """
        if self.gave_up is not None:
            return int(self.gave_up_code)
        return 0 if all(w.last_exit == 0 for w in self.workers) else int(ExitCode.FAILED)

    def run(self, stop: threading.Event, drain_timeout_s: float, tick_s: float = 0.2) -> int:
        """Supervise until ``stop`` is set (then drain all) or all are done; the exit code.

        Workers get ``drain_timeout_s`` (plus a margin for their own shutdown) to exit
        after SIGTERM; one that is still alive then is killed, and the exit code is 1.
        """
        self.start()
        deadline: float | None = None
        while not self.finished:
            if stop.is_set() and not self.stopping:
                log.info("stopping %d workers (each drains its in-flight requests)", self.count)
                self.stop()
            if self.stopping and deadline is None:
                deadline = self.clock() + drain_timeout_s + 10.0
            if deadline is not None and self.clock() > deadline:
                self.kill()
                deadline = float("inf")
            if stop.is_set():  # already set: wait() would not wait
                time.sleep(tick_s)
            else:
                stop.wait(tick_s)
            self.poll()
        return self.exit_code()


def worker_count(text: str) -> int:
    """``--workers``' argparse type: a whole number of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return value


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
