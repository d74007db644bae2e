"""CPU time of processes and threads, read from /proc (Linux), for the benchmarks.

On a 2-core machine the broker, the pipeline's Kafka work and the model share the same
cores; splitting a run's CPU time by who spent it shows how much of the model's machine
the rest took. Thread times are read while the threads exist, by their native ids.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CpuSplit", "process_seconds", "split_now"]

_TICK = os.sysconf("SC_CLK_TCK")


def _stat_seconds(path: Path) -> float:
    """Utime + stime of a /proc .../stat file, in seconds (0 if it is gone)."""
    try:
        text = path.read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / _TICK


def process_seconds(pid: int) -> float:
    """CPU seconds a whole process has used (all its threads, live and ended)."""
    return _stat_seconds(Path(f"/proc/{pid}/stat"))


@dataclass(frozen=True)
class CpuSplit:
    """CPU seconds so far: threads whose name starts with a prefix, the process, a peer."""

    matched: float
    process: float
    peer: float


def split_now(prefix: str, peer_pid: int | None) -> CpuSplit:
    """CPU of this process, of its live threads named ``prefix*``, and of a peer process."""
    me = os.getpid()
    matched = sum(
        _stat_seconds(Path(f"/proc/{me}/task/{t.native_id}/stat"))
        for t in threading.enumerate()
        if t.name.startswith(prefix) and t.native_id is not None
    )
    peer = process_seconds(peer_pid) if peer_pid is not None else 0.0
    return CpuSplit(matched, process_seconds(me), peer)
