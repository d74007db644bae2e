"""The compiled result passes (pipeline/serving/_outcomes_fast.pyx) against their reference.

Rows of any topic, partition, offset, timestamp and consumed time, with requests that
name a reply topic or not, records with or without headers, requests of other encodings.
Both must give equal fields (bit for bit: the same floats) and equal outcomes. Skipped,
with the reason shown, where the extension was not built; `KP_REQUIRE_COMPILED_CODEC=1`
(set by `make ci`) makes its absence a failure instead.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.serving import result_rows
from pipeline.serving.outcomes import Outcome, OutcomeEncoder
from schemas.codec import AvroCodec
from schemas.messages import Envelope, Request

compiled_only = pytest.mark.skipif(
    not result_rows.COMPILED,
    reason="result passes not compiled (no C compiler at install): nothing to compare them with",
)
fast: Any = result_rows._outcomes_fast


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None)


def test_the_result_passes_are_compiled_where_ci_requires_it() -> None:
    if os.environ.get("KP_REQUIRE_COMPILED_CODEC") != "1":
        pytest.skip("KP_REQUIRE_COMPILED_CODEC is not set (make ci sets it)")
    assert result_rows.COMPILED, "pipeline/serving/_outcomes_fast.pyx was not built"


@st.composite
def served_rows(draw: st.DrawFn) -> list[Envelope]:
    out = []
    for i in range(draw(st.integers(0, 20))):
        request = Request(
            draw(st.text(max_size=8)),
            "m",
            {},
            reply_topic=draw(st.one_of(st.none(), st.just(""), st.sampled_from(["r1", "r2"]))),
        )
        out.append(
            Envelope(
                draw(st.sampled_from(["in", "other"])),
                draw(st.integers(0, 7)),
                draw(st.integers(0, 2**40)),
                draw(st.one_of(st.none(), st.binary(max_size=4))),
                b"v%d" % i,
                draw(st.integers(0, 2**42)),
                draw(st.one_of(st.floats(0, 1e6), st.integers(0, 10**6))),
                draw(st.integers(0, 3)),
                request,
                headers=draw(st.one_of(st.none(), st.just([]), st.just([("traceparent", b"x")]))),
                encoding=draw(st.one_of(st.none(), st.just("json"))),
            )
        )
    return out


times = st.floats(0, 1e7, allow_nan=False)


@compiled_only
@fuzz(300)
@given(served_rows(), times, times, times, times, times)
def test_the_fields_are_read_the_same(
    rows: list[Envelope], started: float, now_ms: float, pre: float, compute: float, post: float
) -> None:
    got = result_rows.ResultFields(*fast.result_fields(rows, started, now_ms, pre, compute, post))
    assert got == result_rows._result_fields(rows, started, now_ms, pre, compute, post)


@compiled_only
@fuzz(300)
@given(served_rows(), st.booleans())
def test_the_outcomes_are_made_the_same(rows: list[Envelope], replies: bool) -> None:
    values = [b"result-%d" % i for i in range(len(rows))]
    made, headed = fast.outcomes(Outcome, rows, values, "out", replies, "m")
    want, want_headed = result_rows._outcomes(Outcome, rows, values, "out", replies, "m")
    assert (made, headed) == (want, want_headed)
    assert all(type(o) is Outcome for o in made)
    assert all(o.envelope is env for o, env in zip(made, rows, strict=True))


@compiled_only
def test_rows_and_values_of_different_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="different lengths"):
        fast.outcomes(Outcome, [], [b"x"], "out", True, "m")


@compiled_only
def test_a_class_the_pass_cannot_fill_from_c_is_refused() -> None:
    @dataclasses.dataclass
    class NoSlots:
        a: int

    @dataclasses.dataclass(slots=True)
    class Factory:
        a: int
        b: list[int] = dataclasses.field(default_factory=list)

    @dataclasses.dataclass(slots=True)
    class Checked:
        a: int

        def __post_init__(self) -> None:
            assert self.a

    refused = ((NoSlots, "not a plain slot"), (Factory, "no plain default"), (Checked, "post_init"))
    for cls, why in refused:
        with pytest.raises(TypeError, match=why):
            fast._Layout(cls, 1)  # (schemas/_slots.pxi, which both compiled modules include)
    with pytest.raises(TypeError, match="1 fields, 6 given"):
        fast.outcomes(NoSlots, [], [], "out", True, "m")


def test_results_carry_each_request_s_reply_topic_and_its_headers() -> None:
    """Through `OutcomeEncoder.results`, whichever pass serves."""
    rows = [
        Envelope("in", 0, 5, b"k", b"", 1000, 1.0, 1, Request("a", "m", {}, reply_topic="r")),
        Envelope(
            "in",
            0,
            6,
            None,
            b"",
            1000,
            1.0,
            1,
            Request("b", "m", {}),
            headers=[("traceparent", b"00-x"), ("other", b"y")],
        ),
    ]
    encoder = OutcomeEncoder(AvroCodec(), "out", "dlq")
    columns = {"y": np.zeros((2, 1), np.float32)}
    outs = encoder.results(rows, "m", "1", columns, 2.0, (1.0, 2.0, 3.0), 2)
    assert [(o.topic, o.headers, o.model) for o in outs] == [
        ("r", None, "m"),
        ("out", [("traceparent", b"00-x")], "m"),
    ]
    decoded = [AvroCodec().decode_result(o.value) for o in outs]
    assert [(r.id, r.offset, r.timings.queue_ms, r.timings.compute_ms) for r in decoded] == [
        ("a", 5, 1000.0, 2.0),
        ("b", 6, 1000.0, 2.0),
    ]
