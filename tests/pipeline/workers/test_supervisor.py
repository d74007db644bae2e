"""The supervisor's policy with fake processes and a fake clock: restarts, giving up, signals."""

from __future__ import annotations

import argparse
import signal
import threading

import pytest

from pipeline.workers.supervisor import RestartPolicy, Supervisor, Worker, worker_count
from schemas.errors import ExitCode


class FakeProc:
    """A process that runs until the test ends it, and records the signals it got."""

    pids = iter(range(1000, 10_000))

    def __init__(self) -> None:
        self.pid = next(self.pids)
        self.code: int | None = None
        self.signals: list[int] = []
        self.exit_on_term = 0  # what it exits with once it has drained after SIGTERM

    def poll(self) -> int | None:
        return self.code

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)
        if sig == signal.SIGTERM and self.code is None:
            self.code = self.exit_on_term

    def kill(self) -> None:
        self.code = -signal.SIGKILL


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _group(
    count: int = 2, policy: RestartPolicy | None = None
) -> tuple[Supervisor, dict[int, list[FakeProc]], Clock]:
    spawned: dict[int, list[FakeProc]] = {i: [] for i in range(count)}
    clock = Clock()

    def spawn(w: Worker) -> FakeProc:
        proc = FakeProc()
        spawned[w.index].append(proc)
        return proc

    sup = Supervisor(count, spawn, policy or RestartPolicy(), clock=clock)
    sup.start()
    return sup, spawned, clock


def test_a_killed_worker_is_started_again_after_the_backoff() -> None:
    sup, spawned, clock = _group(policy=RestartPolicy(backoff_s=1.0))
    spawned[1][0].code = -signal.SIGKILL
    clock.now += 5
    sup.poll()
    assert not sup.workers[1].running
    assert len(spawned[1]) == 1  # not before the backoff
    clock.now += 0.9
    sup.poll()
    assert len(spawned[1]) == 1
    clock.now += 0.2
    sup.poll()
    assert len(spawned[1]) == 2
    assert sup.workers[1].restarts == 1
    assert len(spawned[0]) == 1  # the other one untouched
    assert sup.gave_up is None


def test_quick_failures_double_the_backoff_and_a_long_life_resets_it() -> None:
    policy = RestartPolicy(
        backoff_s=1.0, max_backoff_s=5.0, healthy_after_s=30, max_quick_failures=99
    )
    sup, spawned, clock = _group(1, policy)
    waits = []
    for _ in range(5):
        spawned[0][-1].code = 1
        clock.now += 1
        sup.poll()
        restart_at = sup.workers[0].restart_at
        assert restart_at is not None
        waits.append(restart_at - clock.now)
        clock.now = restart_at
        sup.poll()
    assert waits == [1.0, 2.0, 4.0, 5.0, 5.0]
    clock.now += 60  # ran for a minute: its next failure is not a quick one
    spawned[0][-1].code = 1
    sup.poll()
    assert sup.workers[0].restart_at == clock.now + 1.0


def test_a_worker_that_keeps_failing_at_start_makes_the_supervisor_give_up() -> None:
    policy = RestartPolicy(backoff_s=0.1, healthy_after_s=30, max_quick_failures=3)
    sup, spawned, clock = _group(2, policy)
    for _ in range(3):
        spawned[0][-1].code = -signal.SIGSEGV
        clock.now += 1
        sup.poll()
        clock.now += 1
        sup.poll()
    assert sup.gave_up is not None
    assert "worker 0 keeps failing at start: 3 times" in sup.gave_up
    assert "SIGSEGV" in sup.gave_up
    assert len(spawned[0]) == 3  # not started a fourth time
    assert spawned[1][0].signals == [signal.SIGTERM]  # the healthy one is told to drain
    sup.poll()
    assert sup.finished
    assert sup.exit_code() == ExitCode.FAILED


def test_a_refused_topology_gives_up_at_once() -> None:
    sup, spawned, _ = _group()
    spawned[0][0].code = ExitCode.BAD_INPUT
    sup.poll()
    assert sup.gave_up is not None
    assert "worker 0 refused its topology" in sup.gave_up
    assert len(spawned[0]) == 1
    sup.poll()
    assert sup.finished
    assert sup.exit_code() == ExitCode.BAD_INPUT  # as without --workers


def test_stop_forwards_sigterm_restarts_nothing_and_exits_0_when_all_drained() -> None:
    sup, spawned, clock = _group(3)
    spawned[2][0].code = -signal.SIGKILL  # died just before the stop: waits for a restart
    sup.poll()
    sup.stop()
    assert [p.signals for p in (spawned[0][0], spawned[1][0])] == [[signal.SIGTERM]] * 2
    clock.now += 60
    sup.poll()
    assert len(spawned[2]) == 1  # never restarted after the stop
    assert sup.finished
    # Worker 2's last exit was a SIGKILL, not a drain.
    assert sup.exit_code() == ExitCode.FAILED


def test_exit_code_is_0_only_when_every_worker_exited_0() -> None:
    sup, spawned, _ = _group(2)
    sup.stop()
    sup.poll()
    assert sup.exit_code() == 0

    sup, spawned, _ = _group(2)
    spawned[1][0].exit_on_term = 1  # its drain failed (a broker error)
    sup.stop()
    sup.poll()
    assert sup.finished
    assert sup.exit_code() == ExitCode.FAILED


def test_a_serving_worker_that_exits_0_unasked_is_restarted_a_replay_worker_is_done() -> None:
    sup, spawned, clock = _group(1, RestartPolicy(backoff_s=0.5))
    spawned[0][0].code = 0
    clock.now += 40
    sup.poll()
    assert sup.workers[0].restart_at is not None
    assert not sup.finished

    sup, spawned, clock = _group(2, RestartPolicy(clean_exit_is_done=True))
    spawned[0][0].code = 0
    sup.poll()
    assert sup.workers[0].done
    assert not sup.finished  # worker 1 still has its share
    spawned[1][0].code = 0
    sup.poll()
    assert sup.finished
    assert sup.exit_code() == 0


def test_run_returns_once_the_stop_event_has_drained_every_worker() -> None:
    spawned: list[FakeProc] = []

    def spawn(w: Worker) -> FakeProc:
        spawned.append(FakeProc())
        return spawned[-1]

    sup = Supervisor(2, spawn)
    stop = threading.Event()
    stop.set()
    assert sup.run(stop, drain_timeout_s=5, tick_s=0.001) == 0
    assert [p.signals for p in spawned] == [[signal.SIGTERM]] * 2


def test_a_worker_that_outlives_its_drain_deadline_is_killed() -> None:
    clock = Clock()
    spawned: list[FakeProc] = []

    class Stubborn(FakeProc):
        def send_signal(self, sig: int) -> None:
            self.signals.append(sig)  # ignores SIGTERM

    def spawn(w: Worker) -> FakeProc:
        spawned.append(Stubborn())
        return spawned[-1]

    sup = Supervisor(1, spawn, clock=clock)
    stop = threading.Event()
    stop.set()
    ticks = iter(range(100))

    def tick() -> float:
        clock.now += 10 * next(ticks)
        return clock.now

    sup.clock = tick
    assert sup.run(stop, drain_timeout_s=1, tick_s=0.001) == ExitCode.FAILED
    assert spawned[0].code == -signal.SIGKILL


@pytest.mark.parametrize("text", ["0", "-2", "two", ""])
def test_workers_must_be_a_whole_number_of_1_or_more(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        worker_count(text)
    assert worker_count("4") == 4
