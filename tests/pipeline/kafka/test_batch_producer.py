"""The batch producer against real librdkafka with no broker: every record of a batch is
reported exactly once (delivered, failed with its index, or refused at once), batches
resolve oldest first, and at-least-once delivery turns that into done offsets and
stand-ins. The round trip through a broker is in tests/e2e/test_batch_producer_e2e.py."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from pipeline.engine.delivery import AtLeastOnce
from pipeline.engine.offsets import OffsetTracker
from pipeline.kafka import batch_producer
from pipeline.kafka.batch_producer import native_config, open_batch_producer
from pipeline.kafka.clients import close_producer
from pipeline.serving.outcomes import Outcome, OutcomeEncoder
from schemas.codec import AvroCodec
from schemas.messages import Envelope, Request

TIMED_OUT = -192  # librdkafka's: the record found no broker within message.timeout.ms
TOO_LARGE = 10
INVALID_ARG = -186


def test_the_producer_is_compiled_where_ci_requires_it() -> None:
    if os.environ.get("KP_REQUIRE_COMPILED_CODEC") != "1":
        pytest.skip("KP_REQUIRE_COMPILED_CODEC is not set (make ci sets it)")
    assert batch_producer.COMPILED, "pipeline/kafka/_batch_producer.pyx was not built"
    assert batch_producer.librdkafka_path() is not None


def _producer(**conf: Any) -> Any:
    if not batch_producer.COMPILED:
        pytest.skip("batch producer not compiled (no C compiler at install): confluent's serves")
    settings = {
        "bootstrap.servers": "127.0.0.1:9",  # nothing listens: every record times out
        "message.timeout.ms": 300,
        "enable.idempotence": True,
        "log_level": 0,
        **conf,
    }
    p = open_batch_producer(settings)
    assert p is not None
    return p


def _outcome(offset: int, size: int = 8, topic: str = "out", **kw: Any) -> Outcome:
    env = Envelope("in", 0, offset, b"k%d" % offset, b"", 0, time.monotonic())
    return Outcome(env, topic, b"v" * size, **kw)


def _until_resolved(p: Any, batches: int) -> tuple[int, list[Any]]:
    done, failures = 0, []
    deadline = time.monotonic() + 10
    while done < batches and time.monotonic() < deadline:
        p.poll(0.05)
        d, f = p.resolved()
        done += d
        failures += f
    return done, failures


def test_settings_become_strings_and_callbacks_keep_confluent_kafkas_producer() -> None:
    conf = {"acks": "all", "enable.idempotence": True, "linger.ms": 5, "x": 0.5}
    assert native_config({**conf, "on_delivery": print, "delivery.report.only.error": True}) == {
        "acks": "all",
        "enable.idempotence": "true",
        "linger.ms": "5",
        "x": "0.5",
    }
    assert native_config({"error_cb": print}) is None
    assert open_batch_producer({"error_cb": print}) is None


def test_a_setting_librdkafka_refuses_is_named() -> None:
    with pytest.raises(ValueError, match=r"no\.such\.setting"):
        _producer(**{"no.such.setting": "1"})


def test_every_record_of_every_batch_is_reported_once_with_its_index() -> None:
    p = _producer()
    first, refused0 = p.send([_outcome(i) for i in range(3)])
    second, refused1 = p.send([_outcome(i) for i in range(600)])  # more than one chunk
    assert (first, second, refused0, refused1) == (0, 1, [], [])
    assert len(p) >= 603  # the records, and any event librdkafka has queued
    done, failures = _until_resolved(p, 2)
    assert done == 2
    got = sorted((b, i) for b, i, _, _ in failures)
    assert got == [(0, i) for i in range(3)] + [(1, i) for i in range(600)]
    assert {(code, reason) for _, _, code, reason in failures} == {
        (TIMED_OUT, "Local: Message timed out")
    }
    assert p.resolved() == (0, [])


def test_records_refused_at_once_are_listed_and_need_no_report() -> None:
    p = _producer(**{"message.max.bytes": 2000})
    outs = [_outcome(0), _outcome(1, size=5000), _outcome(2), _outcome(3, size=5000)]
    outs.append(Outcome(outs[0].envelope, "out", "not bytes"))  # type: ignore[arg-type]
    _, refused = p.send(outs)
    assert [(i, code) for i, code, _ in refused] == [
        (1, TOO_LARGE),
        (3, TOO_LARGE),
        (4, INVALID_ARG),
    ]
    assert "str" in refused[2][2]
    done, failures = _until_resolved(p, 1)
    assert done == 1
    assert sorted(i for b, i, _, _ in failures) == [0, 2]


def test_a_batch_that_cannot_be_read_still_resolves() -> None:
    p = _producer()
    with pytest.raises(AttributeError):
        p.send([_outcome(0), object()])
    p.send([_outcome(1)])
    done, failures = _until_resolved(p, 2)
    # Nothing of the chunk that could not be read was sent, so no report comes for it and
    # it is counted as such: the first batch resolves too, with no failure of its own.
    assert done == 2
    assert sorted((b, i) for b, i, _, _ in failures) == [(1, 0)]


def test_close_destroys_the_handle_and_every_later_call_is_refused() -> None:
    p = _producer(**{"message.timeout.ms": 600000})
    p.send([_outcome(1), _outcome(2)])
    assert close_producer(p, 0.1) == 2  # no broker: both given up, not waited for
    assert len(p) == 0
    for call in (lambda: p.send([_outcome(3)]), lambda: p.poll(0), lambda: p.flush(0),
                 p.fatal_error):  # fmt: skip
        with pytest.raises(RuntimeError, match="closed"):
            call()
    p.close()  # again: nothing left to do


def test_headers_of_every_kind_are_taken() -> None:
    p = _producer()
    headers: Any = [("a", "text"), ("b", b"\x00bytes"), ("c", None)]
    _, refused = p.send([_outcome(0, headers=headers), _outcome(1)])
    assert refused == []
    assert len(p) >= 2


def _at_least_once(producer: Any) -> tuple[AtLeastOnce, OffsetTracker, list[Outcome]]:
    tracker, acked = OffsetTracker(), []
    d = AtLeastOnce(
        producer,
        None,  # type: ignore[arg-type]  # no commits here
        tracker,
        OutcomeEncoder(AvroCodec(), "out", "dlq"),
        acked.extend,
        lambda _: None,
        commit_interval_ms=60_000,
    )
    return d, tracker, acked


def _tracked(tracker: OffsetTracker, offset: int, size: int = 8) -> Outcome:
    tp = ("in", 0)
    if tracker.generation(tp) is None:
        tracker.assign(tp)
    tracker.track(tp, offset)
    env = Envelope(
        "in",
        0,
        offset,
        b"k",
        b"request",
        0,
        time.monotonic(),
        tracker.generation(tp) or 0,
        Request(f"r{offset}", "m", {}),
    )
    return Outcome(env, "out", b"r" * size)


def _serve_until_stopped(p: Any, d: AtLeastOnce) -> None:
    """What the loop does each turn, ``poll(0)`` then ``confirm``, until delivery stops."""
    deadline = time.monotonic() + 10
    while d.fatal is None and time.monotonic() < deadline:
        p.poll(0.05)
        d.confirm(force=False)


def test_at_least_once_replaces_a_refused_result_and_stops_on_a_lost_one() -> None:
    p = _producer(**{"message.max.bytes": 2000})
    d, tracker, acked = _at_least_once(p)
    d.publish([_tracked(tracker, 0), _tracked(tracker, 1, size=5000)])
    # Refused at once: its stand-in (an undeliverable dead letter) is pending already.
    assert [o.reason for o in d.pending] == ["undeliverable"]
    assert d.fatal is None
    _serve_until_stopped(p, d)
    # The other record found no broker: a transient failure, so nothing is marked done and
    # the replica must stop (a restart serves it again) rather than commit past it.
    assert d.fatal is not None
    assert "in/0@0" in d.fatal
    assert acked == []  # its batch resolved with both records failed: nothing delivered
    assert tracker.committable() == {}


def test_at_least_once_stops_on_a_fatal_producer_error_and_says_why() -> None:
    """An idempotent producer that fails for good fails every record it holds; the
    replica stops with librdkafka's reason, and nothing is marked done."""
    p = _producer(**{"message.timeout.ms": 30_000})
    d, tracker, acked = _at_least_once(p)
    d.publish([_tracked(tracker, 0), _tracked(tracker, 1)])
    p.raise_fatal_error(47, "a test of the fatal path")  # INVALID_PRODUCER_EPOCH
    _serve_until_stopped(p, d)
    assert d.fatal is not None
    assert "a test of the fatal path" in d.fatal
    assert acked == []
    assert tracker.committable() == {}
