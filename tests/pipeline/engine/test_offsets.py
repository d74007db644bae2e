"""OffsetTracker: commit only the delivered prefix, per partition and per assignment."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from pipeline.engine.offsets import OffsetTracker

TP = ("topic", 0)
OTHER = ("topic", 1)

# Increasing offsets with gaps (compacted topics and transaction markers leave holes).
increasing_offsets = st.lists(st.integers(1, 6), min_size=1, max_size=60).map(
    lambda gaps: [sum(gaps[: i + 1]) for i in range(len(gaps))]
)


def _expected_position(tracked: list[int], done: set[int]) -> int | None:
    """1 + the largest offset o such that every tracked offset <= o is done."""
    best = None
    for o in tracked:
        if o not in done:
            break
        best = o + 1
    return best


@given(increasing_offsets, st.randoms(use_true_random=False))
def test_commits_only_the_contiguous_delivered_prefix(
    offsets: list[int], rnd: random.Random
) -> None:
    t = OffsetTracker()
    gen = t.assign(TP)
    for o in offsets:
        assert t.track(TP, o)
    assert t.in_flight == len(offsets)
    order = offsets[:]
    rnd.shuffle(order)
    done: set[int] = set()
    for o in order:
        assert t.done(TP, o, gen)
        done.add(o)
        assert t.committable().get(TP) == _expected_position(offsets, done)
        assert t.in_flight == len(offsets) - len(done)
    assert t.committable() == {TP: offsets[-1] + 1}
    assert t.revoke(TP) == offsets[-1] + 1


@given(increasing_offsets, increasing_offsets, st.randoms(use_true_random=False))
def test_partitions_advance_independently(a: list[int], b: list[int], rnd: random.Random) -> None:
    t = OffsetTracker()
    gens = {TP: t.assign(TP), OTHER: t.assign(OTHER)}
    work = [(TP, o) for o in a] + [(OTHER, o) for o in b]
    for tp, o in work:
        t.track(tp, o)
    rnd.shuffle(work)
    done: dict[tuple[str, int], set[int]] = {TP: set(), OTHER: set()}
    for tp, o in work:
        t.done(tp, o, gens[tp])
        done[tp].add(o)
        expected = {
            tp: pos
            for tp, offs in ((TP, a), (OTHER, b))
            if (pos := _expected_position(offs, done[tp])) is not None
        }
        assert t.committable() == expected
    assert t.in_flight == 0


def test_out_of_order_completion_waits_for_the_gap() -> None:
    t = OffsetTracker()
    gen = t.assign(TP)
    for o in (10, 11, 12, 13):
        t.track(TP, o)
    t.done(TP, 12, gen)
    t.done(TP, 13, gen)
    assert t.committable() == {}
    assert t.in_flight == 2
    t.done(TP, 10, gen)
    assert t.committable() == {TP: 11}
    t.done(TP, 11, gen)
    assert t.committable() == {TP: 14}
    assert t.in_flight == 0


def test_committable_reports_only_positions_that_moved_since_the_last_commit() -> None:
    t = OffsetTracker()
    g0, g1 = t.assign(TP), t.assign(OTHER)
    for o in range(3):
        t.track(TP, o)
        t.track(OTHER, o)
    t.done(TP, 0, g0)
    t.done(OTHER, 0, g1)
    assert t.committable() == {TP: 1, OTHER: 1}
    t.mark_committed({TP: 1, OTHER: 1})
    assert t.committable() == {}
    t.done(TP, 1, g0)
    assert t.committable() == {TP: 2}
    t.mark_committed({TP: 1})  # an older commit does not hide the newer position
    assert t.committable() == {TP: 2}
    t.mark_committed({("gone", 9): 5})  # a partition no longer tracked is ignored
    assert t.partitions() == [TP, OTHER]


def test_acks_of_an_old_assignment_are_ignored() -> None:
    t = OffsetTracker()
    old = t.assign(TP)
    t.track(TP, 0)
    t.track(TP, 1)
    t.done(TP, 0, old)
    assert t.revoke(TP) == 1
    assert t.in_flight == 0
    assert t.generation(TP) is None
    new = t.assign(TP)
    assert new > old
    assert t.generation(TP) == new
    t.track(TP, 1)
    assert not t.done(TP, 1, old)  # the old owner's late result must not count
    assert t.committable() == {}
    assert t.in_flight == 1
    assert t.done(TP, 1, new)
    assert t.committable() == {TP: 2}


def test_revoke_returns_the_position_and_releases_in_flight() -> None:
    t = OffsetTracker()
    g0 = t.assign(TP)
    t.assign(OTHER)
    for o in range(5):
        t.track(TP, o)
        t.track(OTHER, o)
    t.done(TP, 0, g0)
    t.done(TP, 1, g0)
    t.done(TP, 3, g0)
    assert t.in_flight == 7
    assert t.revoke(TP) == 2
    assert t.in_flight == 5  # only the other partition's records are left
    assert t.revoke(OTHER) is None  # nothing delivered yet: nothing to commit
    assert t.in_flight == 0
    assert t.revoke(TP) is None
    assert t.partitions() == []


def test_reassign_without_revoke_drops_the_old_in_flight() -> None:
    t = OffsetTracker()
    g0 = t.assign(TP)
    for o in range(4):
        t.track(TP, o)
    t.done(TP, 2, g0)
    g1 = t.assign(TP)
    assert g1 != g0
    assert t.in_flight == 0
    assert t.committable() == {}


def test_unknown_partition_duplicate_and_early_acks_are_ignored() -> None:
    t = OffsetTracker()
    gen = t.assign(TP)
    t.track(TP, 5)
    t.track(TP, 6)
    assert not t.done(("other", 0), 5, gen)
    assert not t.done(TP, 4, gen)  # before the first tracked offset
    assert t.done(TP, 6, gen)
    assert not t.done(TP, 6, gen)  # a second ack for the same record
    assert t.in_flight == 1
    assert t.done(TP, 5, gen)
    assert not t.done(TP, 5, gen)  # already committed past
    assert t.in_flight == 0
    assert t.committable() == {TP: 7}


def test_offsets_that_do_not_increase_are_not_tracked_twice() -> None:
    t = OffsetTracker()
    gen = t.assign(TP)
    assert t.track(TP, 3)
    assert not t.track(TP, 3)
    assert not t.track(TP, 1)
    assert t.in_flight == 1
    assert t.done(TP, 3, gen)
    assert not t.track(TP, 2)  # below the committable position, even with nothing pending
    assert not t.track(TP, 3)
    assert t.track(TP, 4)
    assert t.in_flight == 1
    assert t.committable() == {TP: 4}


def test_generations_are_unique_across_partitions() -> None:
    t = OffsetTracker()
    gens = [t.assign(TP), t.assign(OTHER), t.assign(TP)]
    assert len(set(gens)) == 3
    assert t.generation(OTHER) == gens[1]


def test_bytes_and_the_oldest_unserved_record_follow_track_done_and_revoke() -> None:
    t = OffsetTracker()
    tp = ("t", 0)
    gen = t.assign(tp)
    for off, ts in ((5, 1000), (6, 2000), (7, 3000)):
        assert t.track(tp, off, size=100, timestamp_ms=ts)
    assert (t.in_flight, t.in_flight_bytes) == (3, 300)
    assert t.oldest(tp) == (5, 1000)
    assert t.next_offset(tp) == 8
    t.done(tp, 6, gen)
    assert t.oldest(tp) == (5, 1000)  # 6 is done, but 5 is still unserved
    t.done(tp, 5, gen)
    assert t.oldest(tp) == (7, 3000)
    assert t.in_flight_bytes == 100  # each record tracked alone is its own consumed batch
    assert t.last_timestamp_ms(tp) == 3000
    t.revoke(tp)
    assert (t.in_flight, t.in_flight_bytes) == (0, 0)
    assert t.oldest(tp) is None


def test_a_failed_commit_is_offered_again_only_while_it_is_the_latest() -> None:
    t = OffsetTracker()
    g = t.assign(TP)
    for o in range(4):
        t.track(TP, o)
    t.done(TP, 0, g)
    t.mark_committed(t.committable())
    assert t.commit_failed(TP, 1)
    assert t.committable() == {TP: 1}
    t.mark_committed({TP: 1})
    t.done(TP, 1, g)
    t.mark_committed(t.committable())
    assert not t.commit_failed(TP, 1)  # position 2 was handed over since: it covers 1
    assert t.committable() == {}
    assert not t.commit_failed(OTHER, 1)  # not tracked
