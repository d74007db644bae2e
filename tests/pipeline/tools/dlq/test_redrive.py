"""``kp-pipeline dlq redrive``: redrive counts, the plan and its refusals, sending, the command.

Kafka is replaced by the in-memory doubles of doubles.py, and a producer
that acknowledges or refuses; the real broker is in tests/e2e/test_dlq_pipe.py.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pipeline.tools.dlq import redrive
from pipeline.tools.dlq.reading import read_letters
from pipeline.tools.dlq.redrive import plan_redrive, redrive_counts, send_plan
from schemas.errors import BrokerError
from tests.pipeline.tools.dlq.doubles import (
    CODEC,
    DLQ,
    IN,
    OUT,
    TOPOLOGY,
    FakeConsumer,
    FakeError,
    FakeMessage,
    dlq_record,
    fake_kafka,
    letter,
    run_dlq,
    wrap,
)

# -- doubles ------------------------------------------------------------------------------


class FakeProducer:
    """Acknowledges every record at flush, except those whose key is in ``refuse``."""

    def __init__(self, refuse: frozenset[bytes] = frozenset()) -> None:
        self.sent: list[dict[str, Any]] = []
        self.refuse = refuse
        self._callbacks: list[tuple[Callable[..., None], Any]] = []

    def produce(self, topic: str, value: bytes, key: bytes | None, **kw: Any) -> None:
        self.sent.append({"topic": topic, "value": value, "key": key, **kw})
        err = FakeError(10, "Broker: Message size too large") if key in self.refuse else None
        self._callbacks.append((kw["on_delivery"], err))

    def poll(self, timeout: float) -> int:
        return 0

    def flush(self, timeout: float) -> int:
        for callback, err in self._callbacks:
            callback(err, None)
        self._callbacks = []
        return 0


# -- counts, plan, sending ----------------------------------------------------------------


def _source_topic(headers: dict[int, list[tuple[str, bytes]]]) -> dict[int, list[FakeMessage]]:
    return {
        0: [FakeMessage(IN, 0, o, b"req", None, headers.get(o)) for o in range(0, 3000) if o != 7],
        1: [],
    }


def test_redrive_counts_follow_the_source_record_reading_near_offsets_in_one_go() -> None:
    topic = _source_topic({5: [("kp.redrive-count", b"2")], 2500: [("kp.redrive-count", b"x")]})
    consumer = FakeConsumer({IN: topic})
    found = redrive_counts(
        consumer, [(IN, 0, 5), (IN, 0, 3), (IN, 0, 7), (IN, 0, 2500), (IN, 1, 0)]
    )
    assert found == {(IN, 0, 3): 0, (IN, 0, 5): 2, (IN, 0, 2500): 0}  # 7 and 1@0 are gone
    assert consumer.assigned == [(IN, 0, 3), (IN, 0, 2500), (IN, 1, 0)]  # 3..7 read through


def test_the_plan_refuses_empty_gone_and_looping_requests() -> None:
    consumer = FakeConsumer({IN: _source_topic({4: [("kp.redrive-count", b"3")]}), DLQ: {}})
    ok = wrap(0, 0, letter(rid="ok", source=(IN, 1, 9)))
    empty = wrap(0, 1, letter(rid="big", payload=b""))
    gone = wrap(0, 2, letter(rid="gone", source=("old-topic", 0, 1)))
    looping = wrap(0, 3, letter(rid="loop", source=(IN, 0, 4)))
    twice = wrap(0, 4, letter(rid="twice", source=(IN, 0, 8)), {"kp.redrive-count": b"1"})
    plan = plan_redrive(consumer, [ok, empty, gone, looping, twice], None, max_redrives=3)
    assert [
        (x.letter.dead.id if x.letter.dead else "", x.topic, x.partition, x.count)
        for x in plan.send
    ] == [
        ("ok", IN, 1, 1),  # the source partition: per-key order kept
        ("twice", IN, 0, 2),  # the dead letter's own header counts too
    ]
    refused = {x.dead.id if x.dead else "": (kind, why) for x, kind, why in plan.refused}
    assert refused["big"][0] == "without request bytes"
    assert "dropped them because the dead letter was too large" in refused["big"][1]
    assert refused["gone"] == ("source topic gone", "its topic 'old-topic' no longer exists")
    assert refused["loop"] == ("redriven too often", "already redriven 3 times (--max-redrives 3)")
    assert redrive.summary(plan.send, plan) == [
        "redrove 2 dead letters to in (reasons: unknown_model 2)",
        "refused 3: redriven too often 1, source topic gone 1, without request bytes 1",
    ]


def test_to_sends_elsewhere_placed_by_key() -> None:
    consumer = FakeConsumer({IN: {0: []}, "other": {0: [], 1: []}})
    plan = plan_redrive(consumer, [wrap(0, 0, letter(source=(IN, 0, 0)))], "other", 3)
    assert [(x.topic, x.partition) for x in plan.send] == [("other", None)]
    assert redrive.plan_row(plan.send[0])[-2:] == ["other/by key", "1"]


def _two_letters() -> tuple[FakeConsumer, Any]:
    records = {
        0: [
            dlq_record(0, 0, letter(rid="a", source=(IN, 0, 11))),
            dlq_record(0, 1, letter(rid="skip")),
        ],
        1: [
            dlq_record(1, 4, letter("bad_tensor", rid="b", source=(IN, 1, 12), payload=b"bytes-b"))
        ],
    }
    consumer = FakeConsumer({DLQ: records, IN: {0: [], 1: []}})
    chosen = [
        x
        for x in read_letters(consumer, DLQ, CODEC, keep_payload=False)
        if x.dead and x.dead.id != "skip"
    ]
    return consumer, plan_redrive(consumer, chosen, None, 3)


def test_send_reads_the_bytes_again_and_produces_them_with_key_and_headers() -> None:
    consumer, plan = _two_letters()
    producer = FakeProducer()
    sent = send_plan(consumer, producer, DLQ, CODEC, plan)
    assert len(sent) == 2
    got = {(m["topic"], m["partition"], m["key"], m["value"]): m["headers"] for m in producer.sent}
    assert got == {
        (IN, 0, b"a", b"request-bytes"): [
            ("kp.redriven-from", b"dlq/0/0"),
            ("kp.redrive-count", b"1"),
        ],
        (IN, 1, b"b", b"bytes-b"): [("kp.redriven-from", b"dlq/1/4"), ("kp.redrive-count", b"1")],
    }
    assert consumer.assigned[-2:] == [(DLQ, 0, 0), (DLQ, 1, 4)]  # only the planned range


def test_a_delivery_failure_names_what_was_not_sent_and_how_to_retry() -> None:
    consumer, plan = _two_letters()
    with pytest.raises(BrokerError) as failed:
        send_plan(consumer, FakeProducer(refuse=frozenset({b"b"})), DLQ, CODEC, plan)
    message = str(failed.value)
    assert "1 of 2 redriven requests were not delivered" in message
    assert "dlq 1:4 → in: Broker: Message size too large" in message
    assert message.endswith("the other 1 were. Send the rest with: --offsets 1:4")


# -- the command --------------------------------------------------------------------------


@pytest.fixture
def kafka(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """The command's consumer and producer, and the terminal it asks on, replaced by doubles."""
    world = fake_kafka()
    world.producer, world.tty, world.answer = FakeProducer(), False, ""
    monkeypatch.setattr(redrive, "open_consumer", lambda settings, bootstrap: world.consumer)
    monkeypatch.setattr(redrive, "open_producer", lambda settings, bootstrap: world.producer)
    monkeypatch.setattr(
        sys, "stdin", SimpleNamespace(isatty=lambda: world.tty, readline=lambda: world.answer)
    )
    return world


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("redrive",), "redrive: choose dead letters (--reason"),
        (("redrive", "--all", "--reason", "x"), "--all: not together with a selection"),
        (("redrive", "--all"), "redrive: pass --yes to send without a terminal"),
        (("redrive", "--all", "--yes", "--to", OUT), "--to: 'out' is this topology's dead-letter"),
        (("redrive", "--all", "--yes", "--to", "nowhere"), "--to: topic 'nowhere' does not exist"),
    ],
)
def test_bad_requests_exit_2_and_send_nothing(
    tmp_path: Path,
    kafka: SimpleNamespace,
    capsys: pytest.CaptureFixture[str],
    argv: tuple[str, ...],
    message: str,
) -> None:
    assert run_dlq(tmp_path, *argv) == 2
    assert message in capsys.readouterr().err
    assert kafka.producer.sent == []


def test_dry_run_shows_the_plan_and_sends_nothing(
    tmp_path: Path, kafka: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_dlq(tmp_path, "redrive", "--reason", "unknown_model", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "would redrive 2 dead letters to in (reasons: unknown_model 2)" in out
    assert "dry run: nothing sent" in out
    assert "0:0  2026-11-20T00:00:00Z  unknown_model  tiny-mlp  a   in/0  1" in out
    assert kafka.producer.sent == []


def test_a_terminal_confirms_before_sending(
    tmp_path: Path, kafka: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    kafka.tty, kafka.answer = True, "n\n"
    assert run_dlq(tmp_path, "redrive", "--id", "b") == 1
    out = capsys.readouterr().out
    assert "redrive 1 dead letter? [y/N] nothing sent" in out
    assert kafka.producer.sent == []
    kafka.answer = "y\n"
    assert run_dlq(tmp_path, "redrive", "--id", "b") == 0
    assert "redrove 1 dead letter to in (reasons: unknown_model 1)" in capsys.readouterr().out
    assert [(m["key"], m["partition"]) for m in kafka.producer.sent] == [(b"b", 1)]


def test_redrive_reports_refusals_and_a_failed_delivery_exits_1(
    tmp_path: Path, kafka: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    kafka.consumer.topics[DLQ][1].append(dlq_record(1, 1, letter(rid="big", payload=b"")))
    kafka.producer.refuse = frozenset({b"a"})
    assert run_dlq(tmp_path, "redrive", "--reason", "unknown_model", "--yes") == 1
    captured = capsys.readouterr()
    assert "refused 1:1 (big): no request bytes" in captured.out
    assert "kp-pipeline: 1 of 2 redriven requests were not delivered" in captured.err
    assert "Send the rest with: --offsets 0:0" in captured.err


def test_when_everything_chosen_is_refused_nothing_is_sent(
    tmp_path: Path, kafka: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    kafka.consumer.topics[DLQ][1].append(dlq_record(1, 1, letter(rid="big", payload=b"")))
    assert run_dlq(tmp_path, "redrive", "--id", "big", "--yes") == 0
    assert capsys.readouterr().out.splitlines()[-2:] == [
        "nothing to redrive",
        "refused 1: without request bytes 1",
    ]
    assert run_dlq(tmp_path, "redrive", "--id", "nobody", "--yes") == 0
    assert capsys.readouterr().out.splitlines() == ["no dead letters match the selection"]
    assert kafka.producer.sent == []


def test_redrive_produces_with_the_topologys_security_and_producer_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = fake_kafka()
    monkeypatch.setattr(redrive, "open_consumer", lambda settings, bootstrap: world.consumer)
    made: list[dict[str, Any]] = []

    class RefusedError(Exception):
        pass

    def record(conf: dict[str, Any]) -> Any:
        made.append(dict(conf))
        raise RefusedError

    monkeypatch.setattr(redrive, "Producer", record)
    secured = TOPOLOGY.replace(
        'kafka: {bootstrap_servers: "broker:9092"}',
        'kafka: {bootstrap_servers: "broker:9093", producer: {compression.type: lz4},'
        " security: {protocol: SASL_SSL, sasl_mechanism: PLAIN, sasl_username: u,"
        " sasl_password: p, ssl_ca_location: /x}}",
    )
    with pytest.raises(RefusedError):
        run_dlq(tmp_path, "redrive", "--all", "--yes", text=secured)
    [conf] = made
    assert conf["bootstrap.servers"] == "broker:9093"
    assert (conf["security.protocol"], conf["sasl.mechanism"]) == ("SASL_SSL", "PLAIN")
    assert (conf["sasl.username"], conf["sasl.password"]) == ("u", "p")
    assert conf["ssl.ca.location"] == "/x"
    assert conf["compression.type"] == "lz4"
    assert conf["enable.idempotence"] is True  # a retried send is not written twice
