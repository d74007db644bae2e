"""Replay ranges: offsets parsed, offsets found by time on any broker, progress.

The times themselves are parsed by `pipeline.tools.timespec` (test_timespec.py).
"""

from __future__ import annotations

import io
from typing import Any

import pytest
from confluent_kafka import TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from pipeline.tools.replay import (
    Progress,
    RangeError,
    _Probe,
    parse_offsets,
    ranges_from_json,
    ranges_to_json,
)


def test_offsets_per_partition_or_for_all() -> None:
    assert parse_offsets("100", "--from-offset") == 100
    assert parse_offsets("0:10,3:7", "--from-offset") == {0: 10, 3: 7}
    with pytest.raises(RangeError, match="--to-offset: '0:x'"):
        parse_offsets("0:x", "--to-offset")


class _FakeConsumer:
    """One partition's records (offset → timestamp, with gaps); ListOffsets answers 0."""

    def __init__(self, records: dict[int, int], answer: int | None = 0) -> None:
        self.records = records
        self.answer = answer
        self._at = 0

    def assign(self, parts: list[TopicPartition]) -> None:
        self._at = parts[0].offset

    def poll(self, timeout: float) -> Any:
        later = sorted(o for o in self.records if o >= self._at)
        return _Msg(later[0], self.records[later[0]]) if later else _Msg(None, 0)

    def offsets_for_times(
        self, parts: list[TopicPartition], timeout: float
    ) -> list[TopicPartition]:
        wanted = parts[0].offset
        true = min((o for o, t in self.records.items() if t >= wanted), default=-1)
        return [TopicPartition("t", 0, true if self.answer is None else self.answer)]


class _Msg:
    def __init__(self, offset: int | None, ts: int) -> None:
        self._offset, self._ts = offset, ts

    def error(self) -> Any:
        return "eof" if self._offset is None else None

    def offset(self) -> int | None:
        return self._offset

    def timestamp(self) -> tuple[int, int]:
        return (1, self._ts)


def _probe(consumer: _FakeConsumer) -> _Probe:
    probe = _Probe.__new__(_Probe)
    probe.consumer = consumer  # type: ignore[assignment]
    return probe


@given(
    st.lists(st.integers(1, 3), min_size=1, max_size=40),  # gaps between offsets
    st.lists(st.integers(0, 5), min_size=40, max_size=40),  # timestamp steps (non-decreasing)
    st.integers(-5, 150),
    st.booleans(),
)
def test_the_first_offset_at_or_after_a_time_whatever_the_broker_answers(
    gaps: list[int], steps: list[int], when: int, broker_right: bool
) -> None:
    offsets, ts, o, t = [], [], 0, 0
    for gap, step in zip(gaps, steps, strict=False):
        o, t = o + gap, t + step
        offsets.append(o)
        ts.append(t)
    records = dict(zip(offsets, ts, strict=True))
    probe = _probe(_FakeConsumer(records, answer=None if broker_right else 0))
    high = offsets[-1] + 1
    found = probe.first_at_or_after("t", 0, when, offsets[0], high)
    expected = min((off for off in offsets if records[off] >= when), default=high)
    # Offsets in a gap hold no record: starting there reads from the same record.
    first_real = min((off for off in offsets if off >= found), default=high)
    assert first_real == expected


def test_progress_line_shows_share_rate_and_eta() -> None:
    p = Progress(lambda: 1000, lambda: 250, out=io.StringIO())
    line = p.line(250, 1000, elapsed=2.0)
    assert "25%" in line
    assert "250/1,000 requests" in line
    assert "125/s" in line
    assert "ETA 6 s" in line
    assert "ETA ?" in p.line(0, 1000, elapsed=1.0)


def test_a_range_travels_to_the_workers_unchanged() -> None:
    ranges = {("in", 0): (10, 20), ("in", 3): (0, 7), ("other", 1): (5, 6)}
    assert ranges_from_json(ranges_to_json(ranges)) == ranges
    with pytest.raises(RangeError, match="--ranges"):
        ranges_from_json('[["in", 0, 1]]')
