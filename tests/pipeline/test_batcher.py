from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.batcher import MicroBatcher

# (key, time step) pairs: items arrive in time order, keyed like (model, signature).
arrivals = st.lists(st.tuples(st.sampled_from("abc"), st.floats(0, 0.02)), max_size=200)


@given(arrivals, st.integers(1, 16), st.floats(0, 0.05))
@settings(max_examples=200)
def test_nothing_lost_nothing_duplicated_bounded_and_ordered(
    items: list[tuple[str, float]], size: int, delay: float
) -> None:
    b: MicroBatcher[str, tuple[str, int]] = MicroBatcher(size, delay)
    out = []
    now = 0.0
    for i, (key, step) in enumerate(items):
        now += step
        out.extend(b.due(now))
        flushed = b.add(key, (key, i), now)
        if flushed is not None:
            out.append(flushed)
        assert len(b) == i + 1 - sum(len(f.items) for f in out)
    out.extend(b.drain())
    assert len(b) == 0
    seen = [item for f in out for item in f.items]
    assert sorted(seen) == sorted((k, i) for i, (k, _) in enumerate(items))  # none lost or doubled
    for f in out:
        assert 1 <= len(f.items) <= size
        assert {k for k, _ in f.items} == {f.key}  # one key per batch: shapes never mix
        indices = [i for _, i in f.items]
        assert indices == sorted(indices)  # arrival order kept inside a batch
        if f.reason == "full":
            assert len(f.items) == size


@given(st.floats(0, 1), st.floats(0.001, 1))
def test_flushed_exactly_when_the_oldest_item_reaches_its_deadline(t0: float, delay: float) -> None:
    b: MicroBatcher[str, int] = MicroBatcher(100, delay)
    b.add("k", 1, t0)
    b.add("k", 2, t0 + delay / 2)
    assert b.next_deadline() == t0 + delay
    assert b.due(t0 + delay * 0.999) == []
    [batch] = b.due(t0 + delay)
    assert (batch.items, batch.reason) == ([1, 2], "deadline")
    assert b.next_deadline() is None


def test_size_one_flushes_every_item_and_delay_zero_is_due_at_once() -> None:
    assert MicroBatcher[str, int](1, 10).add("k", 7, 0.0).items == [7]  # type: ignore[union-attr]
    b: MicroBatcher[str, int] = MicroBatcher(5, 0)
    assert b.add("k", 1, 3.0) is None
    assert [f.items for f in b.due(3.0)] == [[1]]


def test_keys_have_independent_batches_and_deadlines() -> None:
    b: MicroBatcher[str, int] = MicroBatcher(2, 1.0)
    b.add("a", 1, 0.0)
    b.add("b", 2, 0.5)
    assert [f.key for f in b.due(1.0)] == ["a"]
    assert b.add("b", 3, 1.1).items == [2, 3]  # type: ignore[union-attr]


@pytest.mark.parametrize(("size", "delay"), [(0, 1.0), (1, -1.0)])
def test_bad_policy_is_refused(size: int, delay: float) -> None:
    with pytest.raises(ValueError, match="max_"):
        MicroBatcher(size, delay)
