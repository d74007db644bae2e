"""Per-partition offset tracking for at-least-once delivery, kept as ranges per batch.

A request's offset may be committed only when it, and every request before it in its
partition, has an outcome acknowledged by the broker (a result or a dead letter).
Outcomes arrive out of order (batches of different models, retries), so each partition
keeps what it consumed in arrival order and advances its commit position over the
contiguous prefix that is done.

What it consumed is kept per consumed batch, not per record: `track_many` adds one
segment (the batch's offsets of one partition, increasing, gaps allowed: compaction and
transaction markers leave holes), and `done_many` marks a batch of offsets done with a
slice of a per-segment byte map when they are a run, as they almost always are. So the
hot path costs a few calls per batch; `track` and `done` are one-record wrappers. The
commit position is the same as a per-record tracker's at every step (property-tested
against one, `tests/per_record_tracker.py`): one past the last offset of the
done prefix. In-flight bytes are released per consumed batch, once all of its records
are done: never below the per-record figure, so the byte bound holds at least as well.

Each assignment of a partition gets a new generation. An acknowledgement for an older
generation (the partition was revoked and came back while a result was in flight) is
ignored: the new owner re-reads from the last commit, so ignoring it is safe, and
counting it could commit past an offset the new assignment has not served. Offsets
this assignment never tracked (below its first, in a gap, marked twice) are ignored too.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field

from schemas.messages import Partition

__all__ = ["OffsetTracker"]


@dataclass(slots=True)
class _Segment:
    """The offsets of one consumed batch of one partition, and which of them are done."""

    first: int
    last: int
    offsets: Sequence[int] | None  # None: every offset from first to last (no gap)
    stamps: Sequence[int]  # record timestamps (ms), one per offset
    done: bytearray  # 1 per offset done
    left: int  # offsets not yet done
    size: int  # bytes of the batch's records: in flight until every one is done
    head: int = 0  # index of the first offset not done

    def index(self, offset: int) -> int:
        """Position of ``offset`` in this segment, or -1 when it is not one of its offsets."""
        if self.offsets is None:
            return offset - self.first
        i = bisect_left(self.offsets, offset)
        return i if i < len(self.offsets) and self.offsets[i] == offset else -1

    def offset_at(self, i: int) -> int:
        return self.first + i if self.offsets is None else self.offsets[i]


@dataclass(slots=True)
class _Partition:
    generation: int
    segments: list[_Segment] = field(default_factory=list)  # no fully done one first
    position: int | None = None  # next offset to commit (Kafka's "committed" convention)
    committed: int | None = None
    in_flight_bytes: int = 0
    outstanding: int = 0
    last_timestamp_ms: int | None = None  # of the newest record tracked

    def last_tracked(self) -> int:
        if self.segments:
            return self.segments[-1].last
        return (self.position or 0) - 1


class OffsetTracker:
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
        self.in_flight -= part.outstanding
        self.in_flight_bytes -= part.in_flight_bytes

    def generation(self, tp: Partition) -> int | None:
        """The current generation of ``tp``, or None when it is not assigned."""
        part = self._parts.get(tp)
        return None if part is None else part.generation

    def track(self, tp: Partition, offset: int, size: int = 0, timestamp_ms: int = 0) -> bool:
        """Record one consumed offset; False (nothing recorded) if it is not past the last."""
        return self.track_many(tp, [offset], [size], [timestamp_ms]) == 1

    def track_many(
        self, tp: Partition, offsets: Sequence[int], sizes: Sequence[int], stamps: Sequence[int]
    ) -> int:
        """Record a consumed batch of ``tp``: increasing offsets, their sizes and timestamps.

        Offsets of one assignment arrive in increasing order; those that do not go past
        the last one tracked (the client re-fetched after an offset reset) are already
        tracked, must not be served twice, and can only lead the batch: they are skipped.
        Returns how many were recorded: the batch's last ones.
        """
        part = self._parts[tp]
        skip = bisect_right(offsets, part.last_tracked())
        n = len(offsets) - skip
        if n <= 0:
            return 0
        if skip:
            offsets, sizes, stamps = offsets[skip:], sizes[skip:], stamps[skip:]
        size = sum(sizes)
        first, last = offsets[0], offsets[-1]
        gapless = last - first == n - 1
        part.segments.append(
            _Segment(first, last, None if gapless else offsets, stamps, bytearray(n), n, size)
        )
        part.last_timestamp_ms = stamps[-1]
        part.outstanding += n
        part.in_flight_bytes += size
        self.in_flight += n
        self.in_flight_bytes += size
        return n

    def done(self, tp: Partition, offset: int, generation: int) -> bool:
        """Mark one offset's outcome delivered; False if it is not one in flight."""
        return self.done_many(tp, [offset], generation) == 1

    def done_many(self, tp: Partition, offsets: Sequence[int], generation: int) -> int:
        """Mark the outcomes of ``offsets`` delivered; returns how many were newly done.

        None are when the partition is gone or ``generation`` is an older assignment's.
        Offsets in any order; those not in flight in this assignment are ignored. A
        consumed batch's bytes stop counting in flight once all its records are done.
        """
        part = self._parts.get(tp)
        if part is None or part.generation != generation or not part.segments:
            return 0
        segments = part.segments
        wanted = sorted(set(offsets))
        marked, i, n = 0, 0, len(wanted)
        s = max(0, bisect_right([g.first for g in segments], wanted[0]) - 1) if n else 0
        while i < n and s < len(segments):
            seg = segments[s]
            i = bisect_left(wanted, seg.first, i)  # below it: in no segment, or done before
            j = bisect_right(wanted, seg.last, i)  # wanted[i:j] fall in this segment's span
            newly = _mark(seg, wanted, i, j)
            if newly and not seg.left:
                part.in_flight_bytes -= seg.size
                self.in_flight_bytes -= seg.size
            marked += newly
            i = j
            s += 1
        if not marked:
            return 0
        part.outstanding -= marked
        self.in_flight -= marked
        self._advance(part)
        return marked

    @staticmethod
    def _advance(part: _Partition) -> None:
        """Move the commit position over the done prefix; drop segments left behind."""
        segments = part.segments
        gone = 0
        for seg in segments:
            head = seg.done.find(0, seg.head)
            if head < 0:  # all done
                part.position = seg.last + 1
                gone += 1
                continue
            if head > 0:
                seg.head = head
                part.position = seg.offset_at(head - 1) + 1
            break
        if gone:
            del segments[:gone]

    def outstanding(self, tp: Partition) -> int:
        """Records of ``tp`` consumed and not yet done."""
        part = self._parts.get(tp)
        return 0 if part is None else part.outstanding

    def oldest(self, tp: Partition) -> tuple[int, int] | None:
        """Offset and record timestamp (ms) of the oldest record not yet served, if tracked."""
        part = self._parts.get(tp)
        if part is None or not part.segments:
            return None
        seg = part.segments[0]
        return seg.offset_at(seg.head), seg.stamps[seg.head]

    def next_offset(self, tp: Partition) -> int | None:
        """The first offset not yet consumed in this assignment, when known."""
        part = self._parts.get(tp)
        if part is None:
            return None
        if part.segments:
            return part.segments[-1].last + 1
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


def _mark(seg: _Segment, wanted: list[int], i: int, j: int) -> int:
    """Mark ``wanted[i:j]`` (sorted, unique, within ``seg``'s first..last) done in it.

    A run of consecutive offsets in a gapless segment is one slice; anything else goes
    offset by offset. Returns how many were newly done.
    """
    if i >= j:
        return 0
    done = seg.done
    lo, hi = wanted[i], wanted[j - 1]
    if seg.offsets is None and hi - lo == j - i - 1:
        a, b = lo - seg.first, hi - seg.first + 1
        marked = (b - a) - done.count(1, a, b)
        done[a:b] = b"\x01" * (b - a)
    else:
        marked = 0
        for k in range(i, j):
            x = seg.index(wanted[k])
            if x >= 0 and not done[x]:
                done[x] = 1
                marked += 1
    seg.left -= marked
    return marked
