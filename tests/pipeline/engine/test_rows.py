"""The compiled row passes (pipeline/engine/_rows_fast.pyx) against their Python reference.

Real confluent `Message` objects: any offsets (in order or not, repeated), values and
keys that are bytes, empty or absent, any timestamps, headers absent, empty or present.
Both must give equal columns, equal envelopes and equal offset runs. Skipped, with the
reason shown, where the extension was not built; `KP_REQUIRE_COMPILED_CODEC=1` (set by
`make ci`) makes its absence a failure instead.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import (
    TIMESTAMP_CREATE_TIME,
    TIMESTAMP_NOT_AVAILABLE,
    KafkaError,
    KafkaException,
    Message,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.engine import rows
from pipeline.serving.outcomes import Outcome
from schemas.messages import Envelope

compiled_only = pytest.mark.skipif(
    not rows.COMPILED,
    reason="row passes not compiled (no C compiler at install): nothing to compare them with",
)
fast: Any = rows._rows_fast


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None)


def test_the_row_passes_are_compiled_where_ci_requires_it() -> None:
    if os.environ.get("KP_REQUIRE_COMPILED_CODEC") != "1":
        pytest.skip("KP_REQUIRE_COMPILED_CODEC is not set (make ci sets it)")
    assert rows.COMPILED, "pipeline/engine/_rows_fast.pyx was not built"


maybe_bytes = st.one_of(st.none(), st.binary(max_size=40))
headers = st.one_of(
    st.none(),
    st.just([]),
    st.lists(st.tuples(st.sampled_from(["traceparent", "x"]), maybe_bytes), min_size=1),
)


@st.composite
def messages(draw: st.DrawFn) -> list[Message]:
    n = draw(st.integers(0, 30))
    start = draw(st.integers(0, 2**40))
    steps = draw(st.lists(st.integers(-2, 3), min_size=n, max_size=n))
    out, offset = [], start
    for step in steps:
        offset = max(0, offset + step)
        stamp = draw(st.integers(-1, 2**41))
        out.append(
            Message(
                topic="in",
                partition=3,
                offset=offset,
                key=draw(maybe_bytes),
                value=draw(maybe_bytes),
                headers=draw(headers),
                timestamp=(
                    (TIMESTAMP_CREATE_TIME, stamp) if stamp >= 0 else (TIMESTAMP_NOT_AVAILABLE, -1)
                ),
            )
        )
    return out


@compiled_only
@fuzz(400)
@given(messages())
def test_a_run_reads_the_same_columns(run: list[Message]) -> None:
    assert rows.RunColumns(*fast.read_run(run)) == rows._read_run(run)


@compiled_only
@fuzz(200)
@given(messages(), st.integers(0, 5), st.floats(0, 1e9))
def test_a_run_makes_the_same_envelopes(run: list[Message], generation: int, now: float) -> None:
    cols = rows._read_run(run)
    values = [v or b"" for v in cols.values]
    args = ("in", 3, generation, now, cols.keys, values, cols.offsets, cols.stamps)
    made = fast.envelopes(Envelope, *args)
    assert made == rows._envelopes(*args)
    assert all(type(e) is Envelope for e in made)


@compiled_only
def test_columns_of_different_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="different lengths"):
        fast.envelopes(Envelope, "in", 0, 1, 0.0, [b"k"], [], [1], [2])


def _outcome(topic: str, partition: int, generation: int, offset: int) -> Any:
    return SimpleNamespace(
        envelope=SimpleNamespace(
            topic=topic, partition=partition, generation=generation, offset=offset
        )
    )


@compiled_only
@fuzz(300)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b"]), st.integers(0, 2), st.integers(1, 2), st.integers(0, 50)
        ),
        max_size=60,
    )
)
def test_delivered_outcomes_group_into_the_same_offset_runs(
    fields: list[tuple[str, int, int, int]],
) -> None:
    outcomes = [_outcome(*f) for f in fields]
    got = fast.offset_runs(outcomes)
    assert got == rows._offset_runs(outcomes)
    assert list(got) == list(rows._offset_runs(outcomes))  # first-seen order, too


def test_the_reference_reads_what_the_records_hold() -> None:
    run = [
        Message(topic="in", partition=0, offset=7, key=b"k", value=b"abc", timestamp=(1, 5)),
        Message(topic="in", partition=0, offset=9, value=None, headers=[("h", b"1")]),
    ]
    cols = rows.read_run(run)
    assert cols.offsets == [7, 9]
    assert cols.values == [b"abc", None]
    assert cols.keys == [b"k", None]
    assert cols.sizes == [3, 0]
    assert cols.ordered
    assert cols.tombstones
    assert cols.headers
    assert not rows.read_run(run[::-1]).ordered


def _acked(topic: str, model: str, reason: str | None, status: str) -> Any:
    return SimpleNamespace(topic=topic, model=model, reason=reason, status=status)


@compiled_only
@fuzz(300)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["out", "dlq"]),
            st.sampled_from(["m", "", "n"]),
            st.sampled_from([None, "bad_tensor"]),
            st.sampled_from(["OK", "EXPIRED"]),
        ),
        max_size=60,
    ),
    st.booleans(),
)
def test_acknowledged_outcomes_count_into_the_same_kinds(
    fields: list[tuple[str, str, str | None, str]], shared: bool
) -> None:
    # Outcomes of one batch share their field objects; others hold equal, distinct ones.
    outcomes = [
        _acked(*(f if shared else tuple(x if x is None else "".join(x) for x in f))) for f in fields
    ]
    got = fast.kinds(outcomes)
    assert got == rows._kinds(outcomes)
    assert list(got) == list(rows._kinds(outcomes))  # first-seen order, too


@compiled_only
@fuzz(200)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b"]),
            st.integers(0, 2),
            st.integers(1, 2),
            st.integers(0, 50),
            st.sampled_from([None, "bad_tensor"]),
        ),
        max_size=60,
    ),
    st.integers(0, 60),
)
def test_real_outcomes_read_at_their_slots_give_the_same_runs_and_kinds(
    fields: list[tuple[str, int, int, int, str | None]], plain_at: int
) -> None:
    """Outcomes and Envelopes (read at their slots' offsets), one other object among them."""
    outcomes: list[Any] = [
        Outcome(Envelope(t, p, o, None, b"", 0, 0.0, g), "out", b"", reason=r, model="m")
        for t, p, g, o, r in fields
    ]
    if plain_at < len(outcomes):  # a stand-in object: read with getattr, same answers
        real = outcomes[plain_at]
        env = real.envelope
        outcomes[plain_at] = SimpleNamespace(
            topic=real.topic,
            model=real.model,
            reason=real.reason,
            status=real.status,
            envelope=SimpleNamespace(
                topic=env.topic,
                partition=env.partition,
                generation=env.generation,
                offset=env.offset,
            ),
        )
    assert fast.offset_runs(outcomes) == rows._offset_runs(outcomes)
    assert list(fast.offset_runs(outcomes)) == list(rows._offset_runs(outcomes))
    assert fast.kinds(outcomes) == rows._kinds(outcomes)


@st.composite
def mixed_batches(draw: st.DrawFn) -> list[Message]:
    """A consumed batch: runs of several partitions' records, errors among them."""
    out = []
    for _ in range(draw(st.integers(0, 40))):
        topic, partition = draw(st.sampled_from([("a", 0), ("a", 1), ("b", 0)]))
        if draw(st.integers(0, 6)) == 0:
            error = KafkaError(
                draw(st.sampled_from([KafkaError._PARTITION_EOF, KafkaError._TRANSPORT]))
            )
            out.append(Message(topic=topic, partition=partition, error=error))
        else:
            out.append(Message(topic=topic, partition=partition, offset=len(out), value=b"v"))
    return out


@compiled_only
@fuzz(300)
@given(mixed_batches())
def test_a_consumed_batch_splits_into_the_same_partition_runs(msgs: list[Message]) -> None:
    got = fast.partition_runs(msgs)
    assert got == rows._partition_runs(msgs)
    assert [i for _, _, _, start, stop in got for i in range(start, stop)] == list(range(len(msgs)))


class _Taker:
    """A producer's ``produce`` that refuses chosen values (as librdkafka raises)."""

    def __init__(self, refuse: dict[bytes, type[Exception]]) -> None:
        self.refuse = refuse
        self.sent: list[tuple[Any, ...]] = []

    def produce(self, *args: Any, **kwargs: Any) -> None:
        assert not kwargs  # positional only: keywords cost
        if args[1] in self.refuse:
            raise self.refuse[args[1]]("refused")
        self.sent.append(args)


@compiled_only
@fuzz(300)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([None, BufferError, ValueError, TypeError, KafkaException]),
            st.booleans(),
        ),
        max_size=30,
    ),
    st.integers(0, 30),
)
def test_plain_outcomes_are_produced_the_same_up_to_the_first_left_to_the_caller(
    plan: list[tuple[type[Exception] | None, bool]], start: int
) -> None:
    outcomes: list[Any] = [
        Outcome(
            Envelope("in", 0, i, b"k%d" % i, b"", 0, 0.0, 1),
            "out",
            b"v%d" % i,
            [("traceparent", b"x")] if headed else None,
        )
        for i, (_, headed) in enumerate(plan)
    ]
    refuse = {b"v%d" % i: err for i, (err, _) in enumerate(plan) if err is not None}
    got, want = _Taker(refuse), _Taker(refuse)
    stop = fast.produce_plain(got.produce, outcomes, start)
    assert stop == rows._produce_plain(want.produce, outcomes, start)
    assert got.sent == want.sent
    assert all(len(args) == 3 for args in got.sent)
    assert stop >= min(start, len(outcomes))
