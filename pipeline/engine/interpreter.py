"""The interpreter tuned for serving, and put back afterwards: its collector and its GIL.

Two CPython settings decide much of the host path's speed, and both are process-wide:

**The cyclic garbage collector.** The hot path makes a few short-lived container objects
per request (its envelope, its decoded request and tensors, its outcome) and keeps up to
``flow.max_in_flight`` of them alive at once. With CPython's default thresholds (a young
collection every 700 net allocations, an older one every 10 of those) the collector ran
tens of times per consumed batch and, as in-flight records survived into the older
generations, repeatedly walked every object the process holds: the loaded models' and
libraries' heaps included. Measured on the 2-core development machine (`python -m
load.collector`: a consumed batch decoded and wrapped in envelopes, 20,000 requests kept
alive): 2.5–3.2 µs a request with CPython's defaults, 0.9–1.0 µs with this policy; the
tiny model's pipeline served about a third more requests a second with it (several runs
of each, noisy). So, while serving:

- Everything alive when serving starts (modules, models, the topology) is moved out of the
  collector's sight with ``gc.freeze()``: none of it is garbage, and full collections no
  longer walk it.
- The youngest generation is collected every `YOUNG_THRESHOLD` allocations instead of
  700. The hot path's objects form no reference cycles (reference counting frees them),
  so collections rarely find anything; what little cyclic garbage appears waits a little
  longer, bounded by the same threshold.

**The GIL's switch interval.** The Kafka loop's thread holds the GIL for milliseconds at a
time (a consumed batch of 2,000 records is decoded, routed and batched in one stretch),
while each model's threads need it a few times per batch: to take the batch, after the
backend's run (which released it), to encode the outcomes. A thread that wants the GIL
waits until its holder blocks or the switch interval (CPython's: 5 ms) passes; on a small
model those waits, not work, set how many batches a second the model side finishes, the
in-flight window fills, and the consumer pauses. `SWITCH_INTERVAL_S` (1 ms) bounds each
wait five times tighter. Measured with `python -m load.switching` (the tiny model served
alternately under each interval, same broker): see docs/benchmarks.md for the figures.

Reference counting, which frees almost everything, is untouched. The process's previous
settings come back when the last replica of the process stops (`unfreeze` makes the frozen
objects collectable again), so a library user or a test that serves in its own process
keeps its own settings afterwards.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import threading
from collections.abc import Iterator

__all__ = ["SWITCH_INTERVAL_S", "YOUNG_THRESHOLD", "serving_interpreter"]

YOUNG_THRESHOLD = 50_000
"""Allocations between collections of the youngest generation while serving."""

SWITCH_INTERVAL_S = 0.001
"""The longest a thread that wants the GIL waits for its holder while serving (seconds).

Read each time serving starts (`load.switching` compares values by changing it)."""


class _Policy:
    """Who serves in this process, and the settings to restore when nobody does."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.serving = 0
        self.saved: tuple[tuple[int, int, int], float] | None = None

    def enter(self) -> None:
        with self.lock:
            if self.serving == 0:
                thresholds = gc.get_threshold()
                self.saved = (thresholds, sys.getswitchinterval())
                gc.collect()  # what is garbage now should not be frozen with the rest
                gc.freeze()
                gc.set_threshold(YOUNG_THRESHOLD, thresholds[1], thresholds[2])
                sys.setswitchinterval(SWITCH_INTERVAL_S)
            self.serving += 1

    def leave(self) -> None:
        with self.lock:
            self.serving -= 1
            if self.serving == 0 and self.saved is not None:
                thresholds, interval = self.saved
                gc.set_threshold(*thresholds)
                gc.unfreeze()
                sys.setswitchinterval(interval)
                self.saved = None


_policy = _Policy()


@contextlib.contextmanager
def serving_interpreter() -> Iterator[None]:
    """The serving policy inside the block; nested or concurrent blocks share it."""
    _policy.enter()
    try:
        yield
    finally:
        _policy.leave()
