"""Python's cyclic garbage collector, tuned for serving and put back afterwards.

The hot path makes a few short-lived container objects per request (its envelope, its
decoded request and tensors, its outcome) and keeps up to ``flow.max_in_flight`` of them
alive at once. With CPython's default thresholds (a young collection every 700 net
allocations, an older one every 10 of those) the collector ran tens of times per consumed
batch and, as in-flight records survived into the older generations, repeatedly walked
every object the process holds: the loaded models' and libraries' heaps included.
Measured on the 2-core development machine (`python -m load.collector`: a consumed batch
decoded and wrapped in envelopes, 20,000 requests kept alive): 2.5–3.2 µs a request with
CPython's defaults, 0.9–1.0 µs with this policy; the tiny model's pipeline served about a
third more requests a second with it (several runs of each, noisy).

The policy, for as long as a replica serves:

- Everything alive when serving starts (modules, models, the topology) is moved out of the
  collector's sight with ``gc.freeze()``: none of it is garbage, and full collections no
  longer walk it.
- The youngest generation is collected every `YOUNG_THRESHOLD` allocations instead of
  700. The hot path's objects form no reference cycles (reference counting frees them),
  so collections rarely find anything; what little cyclic garbage appears waits a little
  longer, bounded by the same threshold.

Reference counting, which frees almost everything, is untouched. The process's previous
settings come back when the last replica of the process stops (`unfreeze` makes the frozen
objects collectable again), so a library user or a test that serves in its own process
keeps its own GC settings afterwards.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

__all__ = ["YOUNG_THRESHOLD", "serving_collector"]

YOUNG_THRESHOLD = 50_000
"""Allocations between collections of the youngest generation while serving."""


class _Policy:
    """Who serves in this process, and the settings to restore when nobody does."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.serving = 0
        self.saved: tuple[int, int, int] | None = None

    def enter(self) -> None:
        with self.lock:
            if self.serving == 0:
                saved = self.saved = gc.get_threshold()
                gc.collect()  # what is garbage now should not be frozen with the rest
                gc.freeze()
                gc.set_threshold(YOUNG_THRESHOLD, saved[1], saved[2])
            self.serving += 1

    def leave(self) -> None:
        with self.lock:
            self.serving -= 1
            if self.serving == 0 and self.saved is not None:
                gc.set_threshold(*self.saved)
                gc.unfreeze()
                self.saved = None


_policy = _Policy()


@contextlib.contextmanager
def serving_collector() -> Iterator[None]:
    """The serving GC policy inside the block; nested or concurrent blocks share it."""
    _policy.enter()
    try:
        yield
    finally:
        _policy.leave()
