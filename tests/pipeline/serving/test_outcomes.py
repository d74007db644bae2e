"""Outcomes: EXPIRED results for requests that missed their deadline, and their bytes."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pipeline.serving.outcomes import OutcomeEncoder
from pipeline.serving.steps import expire
from schemas.codec import AvroCodec
from schemas.errors import RequestIdentity
from schemas.messages import Envelope, Request, Result, Status, Timings
from schemas.wire import unframe

CODEC = AvroCodec()


def _env(deadline_ms: int | None, reply_topic: str | None = None) -> Envelope:
    now = time.time() * 1000
    return Envelope(
        topic="in",
        partition=3,
        offset=2**40,
        key=b"k",
        value=b"raw",
        timestamp_ms=int(now) - 250,
        consumed_at=time.monotonic() - 0.1,
        request=Request(
            "r7",
            "m",
            {"x": np.zeros(2, np.float32)},
            deadline_ms=deadline_ms,
            reply_topic=reply_topic,
        ),
    )


def test_an_expired_request_gets_a_result_saying_by_how_much_it_missed() -> None:
    encoder = OutcomeEncoder(CODEC, "results", "dlq")
    now_ms = float(int(time.time() * 1000))
    env = _env(int(now_ms) - 1500)
    out = encoder.expired(env, "m", "4", now_ms, time.monotonic())
    assert (out.topic, out.reason, out.headers, out.model, out.status) == (
        "results",
        None,
        None,
        "m",
        "EXPIRED",
    )
    result = CODEC.decode_result(out.value)
    assert (result.id, result.model, result.model_version) == ("r7", "m", "4")
    assert (result.status, result.outputs, result.batch_size) == (Status.EXPIRED, {}, 0)
    assert (result.topic, result.partition, result.offset) == ("in", 3, 2**40)
    assert (
        result.error
        == f"deadline passed 1500 ms before preprocessing (deadline_ms {int(now_ms) - 1500})"
    )
    assert result.timings.queue_ms == pytest.approx(100, abs=50)
    assert result.timings.end_to_end_ms == pytest.approx(250, abs=5)
    assert (result.timings.compute_ms, result.timings.preprocess_ms) == (0, 0)


def test_an_expired_result_goes_to_the_reply_topic_unless_replaying() -> None:
    now_ms = float(int(time.time() * 1000))
    env = _env(int(now_ms) - 1, reply_topic="mine")
    live = OutcomeEncoder(CODEC, "results", "dlq")
    replay = OutcomeEncoder(CODEC, "replayed", "dlq", reply_topics=False)
    assert live.expired(env, "m", "1", now_ms, time.monotonic()).topic == "mine"
    assert replay.expired(env, "m", "1", now_ms, time.monotonic()).topic == "replayed"


def _aged(age_ms: float, deadline_in_ms: float | None = None) -> Envelope:
    env = _env(None)
    now = time.time() * 1000
    env.timestamp_ms = int(now - age_ms)
    if deadline_in_ms is not None:
        env.request.deadline_ms = int(now + deadline_in_ms)  # type: ignore[union-attr]
    return env


def test_max_age_expires_exactly_the_requests_older_than_it() -> None:
    encoder = OutcomeEncoder(CODEC, "results", "dlq")
    rows = [_aged(age) for age in (10, 900, 50, 2000, 499)]
    live, expired = expire(encoder, "m", "1", rows, max_age_ms=500)
    assert [r.timestamp_ms for r in live] == [rows[i].timestamp_ms for i in (0, 2, 4)]
    assert [o.envelope for o in expired] == [rows[1], rows[3]]
    errors = [CODEC.decode_result(o.value).error or "" for o in expired]
    assert all(e.startswith("older than max_age_ms 500 when its batch formed") for e in errors)
    assert "age 2000 ms" in errors[1] or "age 2001 ms" in errors[1]
    fresh = [_aged(1), _aged(2)]
    assert expire(encoder, "m", "1", fresh, max_age_ms=500) == (fresh, [])


def test_the_earlier_deadline_wins_and_late_topic_takes_only_the_too_old() -> None:
    encoder = OutcomeEncoder(CODEC, "results", "dlq")
    by_deadline = _aged(100, deadline_in_ms=-50)  # deadline passed; young by age
    by_age = _aged(5000, deadline_in_ms=60_000)
    _, expired = expire(encoder, "m", "1", [by_deadline, by_age], 1000, "late")
    assert [o.topic for o in expired] == ["results", "late"]
    first, second = (CODEC.decode_result(o.value).error or "" for o in expired)
    assert first.startswith("deadline passed")
    assert second.startswith("older than max_age_ms 1000")
    replay = OutcomeEncoder(CODEC, "replayed", "dlq", reply_topics=False)
    assert expire(replay, "m", "1", [_aged(5000)], 1000, "late")[1][0].topic == "replayed"


def test_encode_result_round_trips_any_result_and_frames_for_a_registry() -> None:
    result = Result(
        id="r",
        model="m",
        model_version="2",
        status=Status.OK,
        outputs={"y": np.array([1.5, -2], np.float32), "c": np.array([3], np.int64)},
        timings=Timings(1, 2, 3, 4, 5),
        batch_size=9,
        topic="in",
        partition=1,
        offset=77,
        error=None,
    )
    back = CODEC.decode_result(CODEC.encode_result(result))
    assert back.outputs.keys() == result.outputs.keys()
    for name, arr in result.outputs.items():
        np.testing.assert_array_equal(back.outputs[name], arr)
        assert back.outputs[name].dtype == arr.dtype
    back.outputs = result.outputs = {}
    assert back == result
    framed = AvroCodec(result_schema_id=12).encode_result(result)
    assert unframe(framed)[0] == 12


# -- whose request, and the headers that travel ----------------------------------------------

TRACE = [
    ("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    ("tracestate", b"vendor=1"),
    ("Trace-Id", b"abc"),  # named in the topology, in another case
    ("x-secret", b"not named: stays behind"),
    ("empty", None),
]


def test_a_refused_request_that_decoded_names_itself_on_its_dead_letter() -> None:
    encoder = OutcomeEncoder(CODEC, "results", "dlq")
    env = _env(None)
    env.request = None  # refused while decoding; the error knew whose it was
    whose = RequestIdentity("req-9", "tiny", "2", "svc.replies")
    out = encoder.dead_letter(env, "bad_tensor", "input 'x': FP32[64] needs 256 bytes", whose)
    letter = CODEC.decode_dead_letter(out.value)
    assert (letter.id, letter.model, letter.model_version, letter.reply_topic) == (
        "req-9",
        "tiny",
        "2",
        "svc.replies",
    )
    assert out.model == "tiny"
    headers = dict(out.headers or [])
    assert (headers["kp.id"], headers["kp.model"], headers["kp.reason"]) == (
        b"req-9",
        b"tiny",
        b"bad_tensor",
    )
    # A stand-in for it (its bytes too large for the topic) still says whose it was.
    stand_in = encoder.stand_in(out, "MSG_SIZE_TOO_LARGE")
    assert stand_in is not None
    again = CODEC.decode_dead_letter(stand_in.value)
    assert (again.id, again.model, again.payload) == ("req-9", "tiny", b"")


def test_bytes_that_decoded_to_nothing_name_no_one() -> None:
    env = _env(None)
    env.request = None
    out = OutcomeEncoder(CODEC, "results", "dlq").dead_letter(env, "undecodable", "garbage")
    letter = CODEC.decode_dead_letter(out.value)
    assert (letter.id, letter.model, letter.model_version, letter.reply_topic) == (None,) * 4
    assert "kp.id" not in dict(out.headers or [])


def test_trace_context_and_named_headers_travel_to_results_and_dead_letters() -> None:
    encoder = OutcomeEncoder(CODEC, "results", "dlq", propagate_headers=["trace-id"])
    env = _env(None)
    env.headers = list(TRACE)
    carried = TRACE[:3]
    [result] = encoder.results(
        [env], "m", "1", {"y": np.zeros((1, 2), np.float32)}, time.monotonic(), (0, 0, 0), 1
    )
    assert result.headers == carried
    letter = encoder.dead_letter(env, "bad_tensor", "why")
    assert (letter.headers or [])[-3:] == carried
    now_ms = time.time() * 1000
    env.request.deadline_ms = int(now_ms) - 5  # type: ignore[union-attr]
    assert encoder.expired(env, "m", "1", now_ms, time.monotonic()).headers == carried
    # Without named headers only the trace context travels; without headers, nothing.
    plain = OutcomeEncoder(CODEC, "results", "dlq")
    assert plain.carried(env.headers) == TRACE[:2]
    assert plain.carried([("x", b"1")]) is None
    env.headers = None
    [bare] = plain.results(
        [env], "m", "1", {"y": np.zeros((1, 2), np.float32)}, time.monotonic(), (0, 0, 0), 1
    )
    assert bare.headers is None
