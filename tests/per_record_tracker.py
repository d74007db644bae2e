"""The per-record offset tracker the engine used before ranges: the reference model.

Kept verbatim (renamed) so `test_offsets_ranges` can check the range tracker in
`pipeline.engine.offsets` against it step by step. Its original docstring follows.

Per-partition offset tracking for at-least-once delivery.

A request's offset may be committed only when it, and every request before it in its
partition, has an outcome acknowledged by the broker (a result or a dead letter).
Outcomes arrive out of order (batches of different models, retries), so each partition
keeps its tracked offsets in arrival order and advances its commit position over the
contiguous prefix that is done.

Each assignment of a partition gets a new generation. An acknowledgement for an older
generation (the partition was revoked and came back while a result was in flight) is
ignored: the new owner re-reads from the last commit, so ignoring it is safe, and
counting it could commit past an offset the new assignment has not served.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from schemas.messages import Partition

__all__ = ["PerRecordTracker"]


@dataclass(slots=True)
class _Partition:
    generation: int
    pending: deque[int] = field(default_factory=deque)
    stamps: deque[int] = field(default_factory=deque)  # record timestamps (ms) of pending
    done: set[int] = field(default_factory=set)
    position: int | None = None  # next offset to commit (Kafka's "committed" convention)
    committed: int | None = None
    in_flight_bytes: int = 0
    last_timestamp_ms: int | None = None  # of the newest record tracked


class PerRecordTracker:
    """What may be committed, per partition; single-threaded (the Kafka thread owns it)."""

    def __init__(self) -> None:
        self._parts: dict[Partition, _Partition] = {}
        self._generation = 0
        self.in_flight = 0
        self.in_flight_bytes = 0

    def assign(self, tp: Partition) -> int:
        """Start tracking a newly assigned partition; returns its generation."""
        old = self._parts.get(tp)
        if old is not None:
            self._forget(old)
        self._generation += 1
        self._parts[tp] = _Partition(self._generation)
        return self._generation

    def revoke(self, tp: Partition) -> int | None:
        """Stop tracking ``tp``; returns its last committable position, if any."""
        part = self._parts.pop(tp, None)
        if part is None:
            return None
        self._forget(part)
        return part.position

    def _forget(self, part: _Partition) -> None:
        self.in_flight -= len(part.pending) - len(part.done)
        self.in_flight_bytes -= part.in_flight_bytes

    def generation(self, tp: Partition) -> int | None:
        """The current generation of ``tp``, or None when it is not assigned."""
        part = self._parts.get(tp)
        return None if part is None else part.generation

    def track(self, tp: Partition, offset: int, size: int = 0, timestamp_ms: int = 0) -> bool:
        """Record a consumed offset; False (and nothing recorded) if it is not past the last.

        Offsets of one assignment arrive in increasing order; one that does not (the client
        re-fetched after an offset reset) is already tracked and must not be served twice.
        """
        part = self._parts[tp]
        last = part.pending[-1] if part.pending else (part.position or 0) - 1
        if offset <= last:
            return False
        part.pending.append(offset)
        part.stamps.append(timestamp_ms)
        part.last_timestamp_ms = timestamp_ms
        part.in_flight_bytes += size
        self.in_flight += 1
        self.in_flight_bytes += size
        return True

    def done(self, tp: Partition, offset: int, generation: int, size: int = 0) -> bool:
        """Mark an offset's outcome delivered; False if it belongs to an old assignment.

        ``size`` is the record size given to `track`, so the in-flight bytes fall with it.
        """
        part = self._parts.get(tp)
        if part is None or part.generation != generation or offset in part.done:
            return False
        if not part.pending or offset < part.pending[0]:
            return False
        part.done.add(offset)
        self.in_flight -= 1
        part.in_flight_bytes -= size
        self.in_flight_bytes -= size
        pending, done, stamps = part.pending, part.done, part.stamps
        while pending and pending[0] in done:
            first = pending.popleft()
            stamps.popleft()
            done.discard(first)
            part.position = first + 1
        return True

    def outstanding(self, tp: Partition) -> int:
        """Records of ``tp`` consumed and not yet done."""
        part = self._parts.get(tp)
        return 0 if part is None else len(part.pending) - len(part.done)

    def oldest(self, tp: Partition) -> tuple[int, int] | None:
        """Offset and record timestamp (ms) of the oldest record not yet served, if tracked."""
        part = self._parts.get(tp)
        if part is None or not part.pending:
            return None
        return part.pending[0], part.stamps[0]

    def next_offset(self, tp: Partition) -> int | None:
        """The first offset not yet consumed in this assignment, when known."""
        part = self._parts.get(tp)
        if part is None:
            return None
        if part.pending:
            return part.pending[-1] + 1
        return part.position

    def last_timestamp_ms(self, tp: Partition) -> int | None:
        """Record timestamp of the newest record consumed in this assignment."""
        part = self._parts.get(tp)
        return None if part is None else part.last_timestamp_ms

    def committable(self) -> dict[Partition, int]:
        """Positions that advanced since the last `mark_committed`."""
        return {
            tp: p.position
            for tp, p in self._parts.items()
            if p.position is not None and p.position != p.committed
        }

    def mark_committed(self, positions: dict[Partition, int]) -> None:
        """Record that ``positions`` were handed to the consumer's commit."""
        for tp, pos in positions.items():
            part = self._parts.get(tp)
            if part is not None:
                part.committed = pos

    def commit_failed(self, tp: Partition, position: int) -> bool:
        """An asynchronous commit of ``position`` failed: offer it again to the next commit.

        False when nothing changes: the partition is gone, or a later commit was handed
        over since (it covers this one).
        """
        part = self._parts.get(tp)
        if part is None or part.committed != position:
            return False
        part.committed = None
        return True

    def partitions(self) -> list[Partition]:
        """The partitions being tracked."""
        return list(self._parts)
