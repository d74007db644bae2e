"""Shape-aware micro-batching: one open batch per key, flushed by size or by age.

The key is the model's name and the request's input signature (names, datatypes,
shapes), so a batch never mixes shapes. A batch is flushed when it reaches
``max_batch_size`` or when its oldest item has waited ``max_delay_s``. Items keep their
arrival order inside a batch, so per-partition order holds within it.

Pure and single-threaded: the caller passes the clock, which is what makes the invariants
(nothing lost, nothing duplicated, bounded sizes, flush on deadline) testable.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["Flushed", "MicroBatcher"]

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)


@dataclass(slots=True)
class _Open(Generic[T]):
    deadline: float
    items: list[T] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Flushed(Generic[K, T]):
    """A batch leaving the batcher: its key, its items, and why it left."""

    key: K
    items: list[T]
    reason: str  # "full" | "deadline" | "drain"


class MicroBatcher(Generic[K, T]):
    """Open batches keyed by ``K``; one size and delay policy for all keys."""

    def __init__(self, max_batch_size: int, max_delay_s: float) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_delay_s < 0:
            raise ValueError("max_delay_s must not be negative")
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self._open: dict[K, _Open[T]] = {}
        self._count = 0

    def __len__(self) -> int:
        """Items waiting in open batches."""
        return self._count

    def add(self, key: K, item: T, now: float) -> Flushed[K, T] | None:
        """Add one item; returns the batch if this item filled it."""
        full = self.add_many(key, [item], now)
        return full[0] if full else None

    def add_many(self, key: K, items: Sequence[T], now: float) -> list[Flushed[K, T]]:
        """Add items of one key in order; returns the batches they filled, oldest first.

        The same as adding them one by one at ``now``: the open batch is topped up to
        ``max_batch_size`` and flushed, the next ones fill new batches, and the rest stay
        open with a deadline of ``now + max_delay_s`` (the open batch keeps its own).
        """
        if not items:
            return []
        size = self.max_batch_size
        batch = self._open.get(key)
        if batch is None:
            batch = self._open[key] = _Open(now + self.max_delay_s)
        had = len(batch.items)
        room = size - had
        self._count += len(items)
        if len(items) < room:  # the usual case: the open batch takes them all
            batch.items.extend(items)
            return []
        batch.items.extend(items[:room])
        del self._open[key]
        full = [Flushed(key, batch.items, "full")]
        start = room
        while len(items) - start >= size:
            full.append(Flushed(key, list(items[start : start + size]), "full"))
            start += size
        self._count -= had + start
        if start < len(items):
            self._open[key] = _Open(now + self.max_delay_s, list(items[start:]))
        return full

    def due(self, now: float) -> list[Flushed[K, T]]:
        """Remove and return every batch whose oldest item's deadline has passed."""
        keys = [k for k, b in self._open.items() if b.deadline <= now]
        return [self._take(k, "deadline") for k in keys]

    def next_deadline(self) -> float | None:
        """The earliest deadline among open batches, if any."""
        return min((b.deadline for b in self._open.values()), default=None)

    def drain(self) -> list[Flushed[K, T]]:
        """Remove and return every open batch (shutdown)."""
        return [self._take(k, "drain") for k in list(self._open)]

    def _take(self, key: K, reason: str) -> Flushed[K, T]:
        batch = self._open.pop(key)
        self._count -= len(batch.items)
        return Flushed(key, batch.items, reason)
