"""The range tracker against the per-record tracker it replaced, step by step.

A hypothesis state machine drives both trackers (`pipeline.engine.offsets.OffsetTracker`
and the reference `per_record_tracker.PerRecordTracker`) with the same calls: consumed
batches with gaps in their offsets (compaction, transaction markers) and re-delivered
records leading them, completions of any subset of what was consumed in any order (in
batches, with duplicates, for the current assignment or an older one), revocations,
reassignments, commits handed over and commits failing. After every step the committable
positions, what is in flight and the oldest record must be the same; in-flight bytes
may only be higher in the range tracker (released per consumed batch), and equal once
nothing of a partition is in flight.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from per_record_tracker import PerRecordTracker

from pipeline.engine.offsets import OffsetTracker

PARTS = [("t", 0), ("t", 1), ("u", 0)]
Offsets = tuple[tuple[str, int], int, int]  # (partition, generation, offset)


class Trackers(RuleBasedStateMachine):
    """Both trackers, and every (partition, generation, offset) ever consumed."""

    def __init__(self) -> None:
        super().__init__()
        self.ranges = OffsetTracker()
        self.ref = PerRecordTracker()
        self.consumed: list[Offsets] = []
        self.sizes: dict[Offsets, int] = {}
        self.next: dict[tuple[str, int], int] = {tp: 0 for tp in PARTS}

    @rule(tp=st.sampled_from(PARTS))
    def assign(self, tp: tuple[str, int]) -> None:
        assert self.ranges.assign(tp) == self.ref.assign(tp)

    @rule(tp=st.sampled_from(PARTS))
    def revoke(self, tp: tuple[str, int]) -> None:
        assert self.ranges.revoke(tp) == self.ref.revoke(tp)

    @precondition(lambda self: any(self.ref.generation(tp) is not None for tp in PARTS))
    @rule(
        data=st.data(),
        gaps=st.lists(st.integers(1, 4), min_size=1, max_size=12),
        again=st.integers(0, 3),
        back=st.integers(0, 6),
        gapless=st.booleans(),
    )
    def consume(
        self, data: st.DataObject, gaps: list[int], again: int, back: int, gapless: bool
    ) -> None:
        """A consumed batch of one partition: ``again`` re-delivered records lead it.

        ``gapless``: consecutive offsets, the usual case (and the tracker's fast one).

        ``back`` moves the start back (a re-fetch after an offset reset), so records
        already consumed come again, some of them possibly done and committed.
        """
        assigned = [tp for tp in PARTS if self.ref.generation(tp) is not None]
        tp = data.draw(st.sampled_from(assigned))
        start = max(0, self.next[tp] - back)
        offsets = []
        at = start
        for gap in gaps:
            offsets.append(at)
            at += 1 if gapless else gap
        offsets = sorted(set(range(max(0, start - again), start)) | set(offsets))
        sizes = [data.draw(st.integers(0, 50)) for _ in offsets]
        stamps = [1000 + o for o in offsets]
        generation = self.ref.generation(tp)
        assert generation is not None
        accepted = [
            self.ref.track(tp, o, s, t) for o, s, t in zip(offsets, sizes, stamps, strict=True)
        ]
        n = self.ranges.track_many(tp, offsets, sizes, stamps)
        assert n == sum(accepted)
        assert accepted == [False] * (len(offsets) - n) + [True] * n  # the tail is taken
        for o, s, ok in zip(offsets, sizes, accepted, strict=True):
            if ok:
                self.consumed.append((tp, generation, o))
                self.sizes[(tp, generation, o)] = s
        self.next[tp] = max(self.next[tp], offsets[-1] + 1)

    @precondition(lambda self: bool(self.consumed))
    @rule(data=st.data(), stale=st.booleans(), run=st.booleans())
    def complete(self, data: st.DataObject, stale: bool, run: bool) -> None:
        """Outcomes of one model batch delivered: any of what was consumed, any order.

        ``run``: a stretch of consecutive consumed records, as model batches mostly are
        (done before or not, committed or not).
        """
        if run:
            start = data.draw(st.integers(0, len(self.consumed) - 1))
            picked = self.consumed[start : start + data.draw(st.integers(1, 20))]
        else:
            picked = data.draw(st.lists(st.sampled_from(self.consumed), min_size=1, max_size=20))
        by_key: dict[tuple[tuple[str, int], int], list[int]] = {}
        for tp, generation, o in picked:
            by_key.setdefault((tp, generation - 1 if stale else generation), []).append(o)
        for (tp, generation), offsets in by_key.items():
            marked = 0
            for o in offsets:
                marked += self.ref.done(tp, o, generation, self.sizes.get((tp, generation, o), 0))
            assert self.ranges.done_many(tp, offsets, generation) == marked

    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        positions = self.ref.committable()
        assert self.ranges.committable() == positions
        handed = {tp: p for tp, p in positions.items() if data.draw(st.booleans())}
        self.ref.mark_committed(handed)
        self.ranges.mark_committed(handed)

    @precondition(lambda self: bool(self.ref.partitions()))
    @rule(data=st.data(), delta=st.integers(-1, 1))
    def commit_fails(self, data: st.DataObject, delta: int) -> None:
        tp = data.draw(st.sampled_from(self.ref.partitions()))
        position = (self.ref.committable().get(tp) or 0) + delta
        assert self.ranges.commit_failed(tp, position) == self.ref.commit_failed(tp, position)

    @invariant()
    def same_view(self) -> None:
        r, ref = self.ranges, self.ref
        assert r.committable() == ref.committable()
        assert r.partitions() == ref.partitions()
        assert r.in_flight == ref.in_flight
        assert r.in_flight_bytes >= ref.in_flight_bytes
        if r.in_flight == 0:
            assert r.in_flight_bytes == ref.in_flight_bytes == 0
        for tp in PARTS:
            assert r.generation(tp) == ref.generation(tp)
            assert r.outstanding(tp) == ref.outstanding(tp)
            assert r.oldest(tp) == ref.oldest(tp)
            assert r.next_offset(tp) == ref.next_offset(tp)
            assert r.last_timestamp_ms(tp) == ref.last_timestamp_ms(tp)


Trackers.TestCase.settings = settings(
    max_examples=300, stateful_step_count=60, deadline=None, derandomize=True, database=None
)
test_range_tracker_matches_the_per_record_tracker = Trackers.TestCase


def test_a_consumed_batch_with_gaps_commits_past_them() -> None:
    """Offsets 10, 11, 14 (12–13 compacted away): done out of order, then the whole run."""
    t = OffsetTracker()
    gen = t.assign(("t", 0))
    assert t.track_many(("t", 0), [10, 11, 14], [1, 2, 3], [5, 6, 7]) == 3
    assert t.done_many(("t", 0), [14], gen) == 1
    assert t.committable() == {}
    assert t.oldest(("t", 0)) == (10, 5)
    assert t.done_many(("t", 0), [11, 10, 12], gen) == 2  # 12 was never consumed
    assert t.committable() == {("t", 0): 15}
    assert (t.in_flight, t.in_flight_bytes) == (0, 0)


def test_bytes_stay_in_flight_until_the_whole_consumed_batch_is_done() -> None:
    t = OffsetTracker()
    gen = t.assign(("t", 0))
    t.track_many(("t", 0), [0, 1, 2], [10, 20, 30], [0, 0, 0])
    t.done_many(("t", 0), [0, 2], gen)
    assert (t.in_flight, t.in_flight_bytes) == (1, 60)
    t.done_many(("t", 0), [1], gen)
    assert (t.in_flight, t.in_flight_bytes) == (0, 0)
