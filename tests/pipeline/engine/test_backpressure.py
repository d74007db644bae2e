"""Backpressure: pause at the high mark, resume at the low mark, nothing in between."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.engine.backpressure import Backpressure


def test_pauses_at_the_high_mark_and_resumes_at_the_low_mark() -> None:
    bp = Backpressure(high=10, low=4)
    assert [bp.update(n) for n in (0, 9)] == [None, None]
    assert bp.update(10) is True
    assert bp.paused
    assert [bp.update(n) for n in (12, 9, 5)] == [None, None, None]  # hysteresis
    assert bp.paused
    assert bp.update(4) is False
    assert not bp.paused
    assert bp.update(9) is None
    assert bp.update(11) is True


def test_capacity_is_the_room_below_the_high_mark_and_zero_while_paused() -> None:
    bp = Backpressure(high=10, low=4)
    assert [bp.capacity(n) for n in (0, 3, 10, 15)] == [10, 7, 0, 0]
    bp.update(10)
    assert bp.capacity(0) == 0
    bp.update(0)
    assert bp.capacity(0) == 10


def test_low_mark_zero_resumes_only_when_empty() -> None:
    bp = Backpressure(high=1, low=0)
    assert bp.update(1) is True
    assert bp.update(1) is None
    assert bp.update(0) is False


@pytest.mark.parametrize(("high", "low"), [(4, 4), (4, 5), (4, -1), (0, 0)])
def test_marks_out_of_order_are_refused(high: int, low: int) -> None:
    with pytest.raises(ValueError, match=r"need 0 <= low"):
        Backpressure(high, low)


@given(st.integers(1, 50), st.data())
def test_decisions_follow_the_marks_for_any_sequence(high: int, data: st.DataObject) -> None:
    low = data.draw(st.integers(0, high - 1))
    bp = Backpressure(high, low)
    for n in data.draw(st.lists(st.integers(0, 2 * high), max_size=50)):
        was = bp.paused
        decision = bp.update(n)
        if decision is True:
            assert not was
            assert n >= high
        elif decision is False:
            assert was
            assert n <= low
        else:
            assert (was and n > low) or (not was and n < high)
        assert bp.paused == (decision if decision is not None else was)


def test_the_byte_mark_pauses_alone_and_resume_waits_for_both_marks() -> None:
    bp = Backpressure(high=100, low=50, high_bytes=1000, low_bytes=400)
    assert bp.update(3, 999) is None
    assert bp.update(3, 1000) is True  # few requests, but large ones
    assert bp.update(3, 401) is None  # count is low, bytes are not yet
    assert bp.update(60, 100) is None  # bytes are low, count is not
    assert bp.update(50, 400) is False


def test_byte_marks_out_of_order_are_refused() -> None:
    with pytest.raises(ValueError, match=r"need 0 <= low_bytes"):
        Backpressure(10, 5, high_bytes=100, low_bytes=100)


@given(st.integers(1, 50), st.integers(1, 5000), st.data())
def test_paused_exactly_while_either_mark_was_crossed(
    high: int, high_bytes: int, data: st.DataObject
) -> None:
    low = data.draw(st.integers(0, high - 1))
    low_bytes = data.draw(st.integers(0, high_bytes - 1))
    bp = Backpressure(high, low, high_bytes, low_bytes)
    pairs = st.tuples(st.integers(0, 2 * high), st.integers(0, 2 * high_bytes))
    for n, b in data.draw(st.lists(pairs, max_size=50)):
        was = bp.paused
        decision = bp.update(n, b)
        if decision is True:
            assert n >= high or b >= high_bytes
        elif decision is False:
            assert was
            assert n <= low
            assert b <= low_bytes
        elif not was:
            assert n < high
            assert b < high_bytes
