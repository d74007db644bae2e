"""The compiled batch passes (pipeline/serving/_batch_rows_fast.pyx) against their reference.

Rows of any topic, partition, offset, timestamp and consumed time, with requests that
name a reply topic and a deadline or not, records with or without headers, requests of
other encodings, and rows that are not `Envelope`s at all (read by ``getattr``). Both
must give equal fields (bit for bit: the same floats) and equal outcomes; `gather` must
join a batch's tensors exactly as NumPy does, or leave them to NumPy. Skipped,
with the reason shown, where the extension was not built; `KP_REQUIRE_COMPILED_CODEC=1`
(set by `make ci`) makes its absence a failure instead.
"""

from __future__ import annotations

import dataclasses
import os
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.serving import batch_rows
from pipeline.serving.outcomes import Outcome, OutcomeEncoder
from schemas.codec import AvroCodec
from schemas.messages import Envelope, Request

compiled_only = pytest.mark.skipif(
    not batch_rows.COMPILED,
    reason="result passes not compiled (no C compiler at install): nothing to compare them with",
)
fast: Any = batch_rows._batch_rows_fast


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None)


def test_the_result_passes_are_compiled_where_ci_requires_it() -> None:
    if os.environ.get("KP_REQUIRE_COMPILED_CODEC") != "1":
        pytest.skip("KP_REQUIRE_COMPILED_CODEC is not set (make ci sets it)")
    assert batch_rows.COMPILED, "pipeline/serving/_batch_rows_fast.pyx was not built"


@st.composite
def served_rows(draw: st.DrawFn) -> list[Envelope]:
    out = []
    for i in range(draw(st.integers(0, 20))):
        request = Request(
            draw(st.text(max_size=8)),
            "m",
            {"x": np.full(2, i, np.float32)},
            deadline_ms=draw(st.one_of(st.none(), st.integers(0, 2**42))),
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


def _plain(env: Envelope) -> SimpleNamespace:
    """The same row as another kind of object: the compiled passes must read it too."""
    fields = {f: getattr(env, f) for f in env.__slots__}  # type: ignore[attr-defined]
    fields["request"] = SimpleNamespace(
        **{f: getattr(env.request, f) for f in env.request.__slots__}  # type: ignore[union-attr]
    )
    return SimpleNamespace(**fields)


@compiled_only
@fuzz(200)
@given(served_rows(), times, st.booleans())
def test_deadlines_ages_and_inputs_are_read_the_same(
    rows: list[Any], now_ms: float, plain: bool
) -> None:
    if plain and rows:
        rows[0] = _plain(rows[0])
    assert fast.no_deadlines(rows) == batch_rows._no_deadlines(rows)
    assert fast.ages(rows, now_ms) == batch_rows._ages(rows, now_ms)
    got, want = fast.inputs(rows, "x"), batch_rows._inputs(rows, "x")
    assert len(got) == len(want)
    assert all(a is b for a, b in zip(got, want, strict=True))  # the very arrays
    requestless = [dataclasses.replace(r, request=None) for r in rows if isinstance(r, Envelope)]
    assert fast.no_deadlines(requestless) == batch_rows._no_deadlines(requestless)


dtypes = st.sampled_from(["float32", "<f8", ">f8", "int8", "uint16", "bool", "object"])


@st.composite
def tensor_rows(draw: st.DrawFn) -> list[np.ndarray[Any, Any]]:
    dtype = np.dtype(draw(dtypes))
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    out = []
    for _ in range(draw(st.integers(1, 6))):
        a = np.arange(int(np.prod(shape)) * 2).astype(dtype)[::2].reshape(shape)
        if draw(st.booleans()):  # most rows: C-contiguous copies, as decoded
            a = np.ascontiguousarray(a)
        if draw(st.integers(0, 9)) == 0:  # now and then a row that does not fit the first
            a = draw(st.sampled_from([a.astype("<f4"), a.reshape(-1), np.float32(1)]))
        out.append(a)
    return out


@compiled_only
@fuzz(400)
@given(tensor_rows())
def test_gather_joins_a_batch_as_numpy_does_or_leaves_it_to_numpy(
    arrays: list[np.ndarray[Any, Any]],
) -> None:
    got = fast.gather(arrays)
    if got is None:
        return  # stack_rows's NumPy path joins them (or refuses them), as before
    want = np.concatenate(arrays).reshape((len(arrays), *arrays[0].shape))
    assert (got.dtype, got.shape, got.flags.c_contiguous) == (want.dtype, want.shape, True)
    assert np.array_equal(got, want)
    assert all(a.flags.c_contiguous and a.dtype is arrays[0].dtype for a in arrays)


@compiled_only
def test_gather_takes_the_usual_batch() -> None:
    """Decoded rows: C-contiguous, one dtype object, one shape."""
    rows = [np.full((2, 3), i, np.float32) for i in range(4)]
    got = fast.gather(rows)
    assert got is not None
    assert got.shape == (4, 2, 3)
    assert got[3].tolist() == [[3.0] * 3] * 2
    assert fast.gather([np.array(["a"], object)] * 2) is None  # objects: NumPy's path
    assert fast.gather([np.float32(1.0)] * 2) is None  # scalars: np.stack


@compiled_only
@fuzz(300)
@given(served_rows(), times, times, times, times, times)
def test_the_fields_are_read_the_same(
    rows: list[Envelope], started: float, now_ms: float, pre: float, compute: float, post: float
) -> None:
    got = batch_rows.ResultFields(*fast.result_fields(rows, started, now_ms, pre, compute, post))
    assert got == batch_rows._result_fields(rows, started, now_ms, pre, compute, post)


@compiled_only
@fuzz(300)
@given(served_rows(), st.booleans())
def test_the_outcomes_are_made_the_same(rows: list[Envelope], replies: bool) -> None:
    values = [b"result-%d" % i for i in range(len(rows))]
    made, headed = fast.outcomes(Outcome, rows, values, "out", replies, "m")
    want, want_headed = batch_rows._outcomes(Outcome, rows, values, "out", replies, "m")
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
