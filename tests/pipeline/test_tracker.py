from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pipeline.tracker import OffsetTracker

TP = ("topic", 0)


@given(
    st.lists(st.integers(0, 5), min_size=1, max_size=60).map(
        lambda gaps: [sum(gaps[: i + 1]) + i for i in range(len(gaps))]
    ),
    st.randoms(),
)
def test_commits_only_the_contiguous_delivered_prefix(offsets: list[int], rnd) -> None:  # type: ignore[no-untyped-def]
    t = OffsetTracker()
    gen = t.assign(TP)
    for o in offsets:
        t.track(TP, o)
    order = offsets[:]
    rnd.shuffle(order)
    done: set[int] = set()
    for o in order:
        assert t.done(TP, o, gen)
        done.add(o)
        prefix = 0
        while prefix < len(offsets) and offsets[prefix] in done:
            prefix += 1
        expected = offsets[prefix - 1] + 1 if prefix else None
        assert t.committable().get(TP) == expected
        assert t.in_flight == len(offsets) - len(done)


def test_out_of_order_completion_waits_for_the_gap() -> None:
    t = OffsetTracker()
    gen = t.assign(TP)
    for o in (10, 11, 12, 13):
        t.track(TP, o)
    t.done(TP, 12, gen)
    t.done(TP, 13, gen)
    assert t.committable() == {}
    t.done(TP, 10, gen)
    assert t.committable() == {TP: 11}
    t.mark_committed({TP: 11})
    assert t.committable() == {}
    t.done(TP, 11, gen)
    assert t.committable() == {TP: 14}


def test_acks_of_an_old_assignment_are_ignored() -> None:
    t = OffsetTracker()
    old = t.assign(TP)
    t.track(TP, 0)
    t.track(TP, 1)
    t.done(TP, 0, old)
    assert t.revoke(TP) == 1
    assert t.in_flight == 0
    new = t.assign(TP)
    assert new != old
    t.track(TP, 1)
    assert not t.done(TP, 1, old)  # the old owner's late result must not count
    assert t.committable() == {}
    assert t.done(TP, 1, new)
    assert t.committable() == {TP: 2}


def test_unknown_partition_duplicate_and_early_acks_are_ignored() -> None:
    t = OffsetTracker()
    gen = t.assign(TP)
    t.track(TP, 5)
    assert not t.done(("other", 0), 5, gen)
    assert not t.done(TP, 4, gen)
    assert t.done(TP, 5, gen)
    assert not t.done(TP, 5, gen)
    assert t.in_flight == 0


def test_offsets_that_do_not_increase_are_not_tracked_twice() -> None:
    t = OffsetTracker()
    gen = t.assign(TP)
    assert t.track(TP, 3)
    assert not t.track(TP, 3)
    assert not t.track(TP, 1)
    assert t.done(TP, 3, gen)
    assert not t.track(TP, 2)  # below the committable position, even with nothing pending
    assert t.in_flight == 0
    assert t.committable() == {TP: 4}


def test_revoke_of_unknown_partition_is_none() -> None:
    assert OffsetTracker().revoke(TP) is None
