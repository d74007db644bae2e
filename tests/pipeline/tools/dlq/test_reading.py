"""``kp-pipeline dlq``, the shared half: selection, positions, reading to the end, counting.

Kafka is replaced by the in-memory doubles of doubles.py; the real broker is in
tests/e2e/test_dlq_pipe.py.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from pipeline.tools.dlq.reading import (
    DlqError,
    Letter,
    Selection,
    Tally,
    parse_positions,
    parse_since,
    read_letters,
)
from tests.pipeline.tools.dlq.doubles import (
    CODEC,
    DLQ,
    T0,
    FakeConsumer,
    FakeMessage,
    dlq_record,
    letter,
    wrap,
)

# -- parsing and selection ----------------------------------------------------------------


def test_positions_are_partition_offset_or_inclusive_ranges() -> None:
    assert parse_positions(["0:17,2:40-42", "0:20"]) == {
        0: [range(17, 18), range(20, 21)],
        2: [range(40, 43)],
    }
    for bad, message in [
        ("1:x", "'1:x' is not PARTITION:OFFSET or PARTITION:FIRST-LAST"),
        ("17", "'17' is not PARTITION:OFFSET"),
        ("1:5-3", "'1:5-3' ends before it starts"),
        ("1:-3", "'1:-3' is not"),
    ]:
        with pytest.raises(DlqError, match=message):
            parse_positions([bad])


def test_since_is_a_time_ago_or_an_iso_time() -> None:
    now = T0 + 10 * 3_600_000
    assert parse_since("90m", "--since", now) == now - 90 * 60_000
    assert parse_since("2h", "--since", now) == now - 2 * 3_600_000
    assert parse_since("1.5d", "--since", now) == now - 36 * 3_600_000
    assert parse_since("30s", "--since", now) == now - 30_000
    assert parse_since("2026-11-20T00:00Z", "--since") == T0
    assert parse_since("2026-11-20", "--since") == T0
    with pytest.raises(DlqError, match="--since: 'yesterday' is neither an ISO 8601 time"):
        parse_since("yesterday", "--since")
    with pytest.raises(DlqError, match="--until: '5w' is neither"):
        parse_since("5w", "--until")


def _args(**kw: Any) -> Any:
    base = {
        "reason": None,
        "model": None,
        "id": None,
        "since": None,
        "until": None,
        "offsets": None,
    }
    return SimpleNamespace(**{**base, **kw})


def test_filters_are_anded_and_their_values_ored() -> None:
    a = wrap(0, 0, letter("unknown_model", "order-1", "m1", failed_at_ms=T0))
    b = wrap(0, 1, letter("bad_tensor", "order-2", "m2", failed_at_ms=T0 + 60_000))
    c = wrap(1, 5, letter("undecodable", None, None, failed_at_ms=T0 + 120_000))
    unreadable = Letter(1, 6, None, {}, None, "ValueError: junk")
    everything = [a, b, c, unreadable]

    def chosen(**kw: Any) -> list[Letter]:
        selection = Selection.from_args(_args(**kw))
        return [x for x in everything if selection.matches(x)]

    assert Selection.from_args(_args()).empty()
    assert chosen() == [a, b, c]  # never a record that is not a dead letter
    assert chosen(reason=["unknown_model", "undecodable"]) == [a, c]
    assert chosen(reason=["unknown_model"], model=["m2"]) == []
    assert chosen(model=["m1", "m2"]) == [a, b]  # no model: not chosen by --model
    assert chosen(id=["order-*"]) == [a, b]
    assert chosen(id=["order-2"]) == [b]
    assert chosen(since="2026-11-20T00:01Z") == [b, c]
    assert chosen(since="2026-11-20T00:00Z", until="2026-11-20T00:02Z") == [a, b]
    assert chosen(offsets=["0:1,1:0-10"]) == [b, c]
    assert chosen(offsets=["0:1"], reason=["unknown_model"]) == []
    assert Selection.from_args(_args(offsets=["0:1,1:0-10", "0:7"])).bounds() == {
        0: (1, 7),
        1: (0, 10),
    }
    with pytest.raises(DlqError, match="--until: it is not after --since"):
        Selection.from_args(_args(since="2026-11-21", until="2026-11-20"))


# -- reading ------------------------------------------------------------------------------


def _dlq_topic() -> dict[int, list[FakeMessage]]:
    return {
        0: [dlq_record(0, 0, letter(rid="a")), dlq_record(0, 1, letter(rid="b"))],
        1: [],
        2: [
            dlq_record(2, 3, letter("bad_tensor", rid="c")),
            FakeMessage(DLQ, 2, 4, b"\xff not avro"),
            dlq_record(2, 5, letter(rid="d", payload=b"x" * 100)),
        ],
    }


def test_reads_every_partition_to_its_end_in_partition_offset_order() -> None:
    consumer = FakeConsumer({DLQ: _dlq_topic()})
    got = list(read_letters(consumer, DLQ, CODEC))
    assert [(x.partition, x.offset) for x in got] == [(0, 0), (0, 1), (2, 3), (2, 4), (2, 5)]
    assert [x.dead.id if x.dead else None for x in got] == ["a", "b", "c", None, "d"]
    assert got[3].problem  # not a dead letter: reported, not fatal
    assert got[4].size == 100
    assert got[4].dead is not None
    assert got[4].dead.payload == b"x" * 100
    assert [a[:2] for a in consumer.assigned] == [(DLQ, 0), (DLQ, 1), (DLQ, 2)]


def test_reading_without_payloads_keeps_their_size_and_bounds_limit_the_read() -> None:
    consumer = FakeConsumer({DLQ: _dlq_topic()})
    got = list(read_letters(consumer, DLQ, CODEC, {2: (4, 5)}, keep_payload=False))
    assert [(x.partition, x.offset) for x in got] == [(2, 4), (2, 5)]
    assert got[1].dead is not None
    assert (got[1].dead.payload, got[1].size) == (b"", 100)
    assert consumer.assigned == [(DLQ, 2, 4)]  # only the named partition, from its first offset


def test_a_missing_topic_or_partition_is_refused() -> None:
    consumer = FakeConsumer({DLQ: _dlq_topic()})
    with pytest.raises(DlqError, match="topic 'nope' does not exist"):
        list(read_letters(consumer, "nope", CODEC))
    with pytest.raises(DlqError, match=r"--offsets: dlq has partitions 0-2, not \[7\]"):
        list(read_letters(consumer, DLQ, CODEC, {7: (0, 1)}))


# -- counting -----------------------------------------------------------------------------


def test_summary_counts_by_reason_and_model() -> None:
    tally = Tally()
    for x in [
        wrap(0, 0, letter("unknown_model", model="m")),
        wrap(0, 1, letter("unknown_model", model="m")),
        wrap(0, 2, letter("undecodable", rid=None, model=None)),
        Letter(0, 3, None, {}, None, "ValueError: junk"),
    ]:
        tally.read(x)
        if x.dead is not None:
            tally.chose(x)
    assert tally.lines(DLQ, selected=False) == [
        "3 dead letters in dlq",
        "  by reason: unknown_model 2, undecodable 1",
        "  by model:  m 2, (none) 1",
        "1 record not a dead letter: 0:3 (ValueError: junk)",
    ]
    assert tally.lines(DLQ, selected=True)[0] == "3 dead letters in dlq match the selection"
    assert Tally(records=4).lines(DLQ, selected=True) == [
        "none of the 4 dead letters read from dlq match"
    ]
    assert Tally().lines(DLQ, selected=False) == ["no dead letters in dlq"]
