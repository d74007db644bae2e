"""MicroBatcher invariants: nothing lost or doubled, one key per batch, bounded, on time."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from pipeline.engine.batcher import Flushed, MicroBatcher

KEYS = st.sampled_from(["a", "b", ("m", (3, 224)), ("m", (5, 224))])


class BatcherMachine(RuleBasedStateMachine):
    """Drives a MicroBatcher with a clock; a plain dict of lists is the reference model."""

    @initialize(size=st.integers(1, 6), delay=st.sampled_from([0.0, 0.001, 0.01, 0.5]))
    def start(self, size: int, delay: float) -> None:
        self.batcher: MicroBatcher[object, int] = MicroBatcher(size, delay)
        self.size, self.delay = size, delay
        self.now = 0.0
        self.next_item = 0
        self.model: dict[object, tuple[float, list[int]]] = {}  # key → (first time, items)
        self.added: list[int] = []
        self.flushed: list[Flushed[object, int]] = []

    def _check(self, batch: Flushed[object, int]) -> None:
        assert 1 <= len(batch.items) <= self.size
        assert batch.items == sorted(batch.items)  # insertion order kept
        self.flushed.append(batch)

    @rule(step=st.floats(0, 0.02))
    def tick(self, step: float) -> None:
        self.now += step

    @rule(key=KEYS)
    def add(self, key: object) -> None:
        item = self.next_item
        self.next_item += 1
        self.added.append(item)
        _, items = self.model.setdefault(key, (self.now, []))
        items.append(item)
        out = self.batcher.add(key, item, self.now)
        if len(items) == self.size:
            assert out is not None
            assert (out.key, out.items, out.reason) == (key, items, "full")
            self._check(out)
            del self.model[key]
        else:
            assert out is None

    @rule(key=KEYS, n=st.integers(0, 15))
    def add_many(self, key: object, n: int) -> None:
        """Many items at once: the same batches as adding them one by one."""
        items = list(range(self.next_item, self.next_item + n))
        self.next_item += n
        self.added.extend(items)
        expected = []
        for item in items:
            _, model = self.model.setdefault(key, (self.now, []))
            model.append(item)
            if len(model) == self.size:
                expected.append(model)
                del self.model[key]
        out = self.batcher.add_many(key, items, self.now)
        assert [(b.key, b.items, b.reason) for b in out] == [(key, e, "full") for e in expected]
        for b in out:
            self._check(b)

    @rule()
    def due(self) -> None:
        expired = {
            k: items for k, (first, items) in self.model.items() if first + self.delay <= self.now
        }
        out = self.batcher.due(self.now)
        assert {b.key: b.items for b in out} == expired
        assert all(b.reason == "deadline" for b in out)
        for b in out:
            self._check(b)
            del self.model[b.key]

    @precondition(lambda self: self.model)
    @rule()
    def drain(self) -> None:
        out = self.batcher.drain()
        assert {b.key: b.items for b in out} == {k: items for k, (_, items) in self.model.items()}
        assert all(b.reason == "drain" for b in out)
        for b in out:
            self._check(b)
        self.model.clear()

    @invariant()
    def counts_and_deadline_match_the_model(self) -> None:
        assert len(self.batcher) == sum(len(items) for _, items in self.model.values())
        expected = min((first + self.delay for first, _ in self.model.values()), default=None)
        assert self.batcher.next_deadline() == expected

    @invariant()
    def every_added_item_is_waiting_or_flushed_exactly_once(self) -> None:
        flushed = [i for b in self.flushed for i in b.items]
        waiting = [i for _, items in self.model.values() for i in items]
        assert sorted(flushed + waiting) == self.added

    def teardown(self) -> None:
        if not hasattr(self, "batcher"):
            return
        for b in self.batcher.drain():
            self._check(b)
        assert len(self.batcher) == 0
        assert sorted(i for b in self.flushed for i in b.items) == self.added


TestBatcherMachine = BatcherMachine.TestCase
TestBatcherMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# (key, time step) pairs: items arrive in time order, keyed like (model, signature).
arrivals = st.lists(st.tuples(st.sampled_from("abc"), st.floats(0, 0.02)), max_size=200)


@given(arrivals, st.integers(1, 16), st.floats(0, 0.05))
@settings(max_examples=200)
def test_per_key_order_holds_across_all_flushed_batches(
    items: list[tuple[str, float]], size: int, delay: float
) -> None:
    b: MicroBatcher[str, int] = MicroBatcher(size, delay)
    out: list[Flushed[str, int]] = []
    now = 0.0
    for i, (key, step) in enumerate(items):
        now += step
        out.extend(b.due(now))
        flushed = b.add(key, i, now)
        if flushed is not None:
            out.append(flushed)
    out.extend(b.drain())
    assert sorted(i for f in out for i in f.items) == list(range(len(items)))
    for key in "abc":
        # Batches of one key leave in order, so a partition's records stay in order.
        served = [i for f in out if f.key == key for i in f.items]
        assert served == [i for i, (k, _) in enumerate(items) if k == key]
    for f in out:
        assert {items[i][0] for i in f.items} == {f.key}
        assert len(f.items) <= size
        if f.reason == "full":
            assert len(f.items) == size


@given(st.floats(0, 1000), st.floats(0.001, 1))
def test_flushed_exactly_when_the_oldest_item_reaches_its_deadline(t0: float, delay: float) -> None:
    b: MicroBatcher[str, int] = MicroBatcher(100, delay)
    b.add("k", 1, t0)
    b.add("k", 2, t0 + delay / 2)  # a later item does not move the deadline
    assert b.next_deadline() == t0 + delay
    assert b.due(t0 + delay * 0.999) == []
    assert len(b) == 2
    [batch] = b.due(t0 + delay)
    assert (batch.key, batch.items, batch.reason) == ("k", [1, 2], "deadline")
    assert b.next_deadline() is None
    assert len(b) == 0


def test_size_one_flushes_every_item_at_once() -> None:
    b: MicroBatcher[str, int] = MicroBatcher(1, 10)
    for i in range(3):
        assert b.add("k", i, float(i)) == Flushed("k", [i], "full")
    assert len(b) == 0
    assert b.next_deadline() is None
    assert b.drain() == []


def test_delay_zero_is_due_at_the_same_instant() -> None:
    b: MicroBatcher[str, int] = MicroBatcher(5, 0)
    assert b.add("k", 1, 3.0) is None
    assert b.next_deadline() == 3.0
    assert b.due(3.0) == [Flushed("k", [1], "deadline")]


def test_a_full_batch_starts_a_new_one_with_its_own_deadline() -> None:
    b: MicroBatcher[str, int] = MicroBatcher(2, 1.0)
    b.add("k", 1, 0.0)
    assert b.add("k", 2, 0.5) == Flushed("k", [1, 2], "full")
    b.add("k", 3, 0.9)
    assert b.next_deadline() == pytest.approx(1.9)
    assert b.due(1.5) == []


def test_keys_have_independent_batches_and_deadlines() -> None:
    b: MicroBatcher[str, int] = MicroBatcher(2, 1.0)
    b.add("a", 1, 0.0)
    b.add("b", 2, 0.5)
    assert b.next_deadline() == 1.0
    assert b.due(1.0) == [Flushed("a", [1], "deadline")]
    assert b.next_deadline() == 1.5
    assert b.add("b", 3, 1.1) == Flushed("b", [2, 3], "full")


def test_drain_returns_every_open_batch() -> None:
    b: MicroBatcher[str, int] = MicroBatcher(10, 60)
    for i, key in enumerate("abab"):
        b.add(key, i, 0.0)
    assert sorted((f.key, f.items, f.reason) for f in b.drain()) == [
        ("a", [0, 2], "drain"),
        ("b", [1, 3], "drain"),
    ]
    assert len(b) == 0


@pytest.mark.parametrize(("size", "delay"), [(0, 1.0), (-3, 1.0), (1, -1.0)])
def test_bad_policy_is_refused(size: int, delay: float) -> None:
    with pytest.raises(ValueError, match="max_"):
        MicroBatcher(size, delay)
