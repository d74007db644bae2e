"""`kp-pipeline dlq inspect` and `dlq redrive` on the real broker, against a real pipeline.

The pipeline writes the dead letters (nothing here forges them, except the one a
pipeline writes only when a dead letter is too large for its topic); the commands run
as a user runs them, in their own process. Every request produced is accounted for:
as a result, as a dead letter, or as a redriven request that became one of those again.
"""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import pytest
from confluent_kafka import Producer
from e2e.kit import (
    ROOT,
    Topics,
    produce_tiny,
    read_all,
    start_background,
    tiny_vectors,
    write_tiny_topology,
)
from e2e.registry import registry_stub

from pipeline.config.topology import KafkaSettings
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.tools.traffic import produce_requests, read_topic, tensor_request
from schemas.codec import AvroCodec, load_schema
from schemas.messages import Request
from schemas.registry import SchemaRegistryClient

CODEC = AvroCodec()


def _dlq(topology: Path, broker: EmbeddedBroker, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "dlq", args[0], str(topology),
         "--bootstrap", broker.bootstrap_servers, *args[1:]],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def _json(done: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def _request(rid: str, model: str, n: int = 64, version: str | None = None) -> bytes:
    x = np.ones(n, dtype=np.float32)
    return CODEC.encode_request(Request(rid, model, {"x": x}, model_version=version))


def _serve(
    topology: Path, broker: EmbeddedBroker, topics: Topics, results: int, letters: int
) -> Any:
    """Run the pipeline until ``results`` results and ``letters`` dead letters exist in all."""
    served = start_background(topology, broker)
    read_all(broker, topics.output, results)
    read_all(broker, topics.dead_letter, letters)
    return served.stop()


def _source_headers(broker: EmbeddedBroker, topic: str) -> dict[tuple[int, int], dict[str, bytes]]:
    """The headers of every record of ``topic`` by (partition, offset)."""
    return {
        (m.partition(), m.offset()): dict(m.headers() or [])
        for m in read_topic(KafkaSettings(), broker.bootstrap_servers, topic, timeout=30, idle=2)
    }


def test_inspect_lists_exactly_the_dead_letters_and_redriven_ones_come_back_marked(
    broker: EmbeddedBroker, topics: Topics, tiny_topology: Path
) -> None:
    good = produce_tiny(broker, topics.input, tiny_vectors(40), prefix="ok")
    bad = {
        **{f"junk-{i}": (b"\x00\xffnot avro at all", "undecodable") for i in range(3)},
        **{
            f"nope-{i}": (_request(f"nope-{i}", "no-such-model"), "unknown_model") for i in range(4)
        },
        **{f"short-{i}": (_request(f"short-{i}", "tiny-mlp", 32), "bad_tensor") for i in range(5)},
    }
    produce_requests(
        KafkaSettings(),
        broker.bootstrap_servers,
        topics.input,
        ((k.encode(), v) for k, (v, _) in bad.items()),
    )
    stats = _serve(tiny_topology, broker, topics, 40, 12)
    assert (stats.consumed, stats.results, stats.dead_letters) == (52, 40, 12)

    rows = _json(_dlq(tiny_topology, broker, "inspect", "--json"))
    assert sorted((r["key"], r["reason"]) for r in rows) == sorted(
        (k, r) for k, (_, r) in bad.items()
    )
    assert {r["id"] for r in rows} == {None} | {k for k in bad if not k.startswith("junk")}
    inputs = {
        (m.partition(), m.offset()): m.key().decode()
        for m in read_topic(
            KafkaSettings(), broker.bootstrap_servers, topics.input, timeout=30, idle=2
        )
    }
    for r in rows:  # each points at the very record that failed
        assert r["source"]["topic"] == topics.input
        assert inputs[(r["source"]["partition"], r["source"]["offset"])] == r["key"]
        assert r["payload_bytes"] == len(bad[r["key"]][0])
    assert not set(good) & {r["key"] for r in rows}

    table = _dlq(tiny_topology, broker, "inspect")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:5] == ["dlq", "failed", "at", "(UTC)", "reason"]
    assert len([x for x in lines if x.split()[:1] and ":" in x.split()[0] and "@" in x]) == 12
    assert f"12 dead letters in {topics.dead_letter}" in lines
    assert "  by reason: bad_tensor 5, unknown_model 4, undecodable 3" in lines
    assert "  by model:  tiny-mlp 5, no-such-model 4, (none) 3" in lines
    chosen = _json(_dlq(tiny_topology, broker, "inspect", "--json", "--reason", "unknown_model"))
    assert sorted(r["id"] for r in chosen) == [f"nope-{i}" for i in range(4)]

    # Send the request-level failures back: they fail again, and the new dead letters'
    # source records carry where they were redriven from.
    sent = _dlq(
        tiny_topology,
        broker,
        "redrive",
        "--reason",
        "bad_tensor",
        "--reason",
        "unknown_model",
        "--yes",
    )
    assert sent.returncode == 0, sent.stderr[-3000:]
    assert (
        sent.stdout.strip()
        == f"redrove 9 dead letters to {topics.input} (reasons: bad_tensor 5, unknown_model 4)"
    )
    again = _serve(tiny_topology, broker, topics, 40, 21)
    assert (again.consumed, again.results, again.dead_letters) == (9, 0, 9)

    rows2 = _json(_dlq(tiny_topology, broker, "inspect", "--json"))
    first = {(r["partition"], r["offset"]): r for r in rows}
    new = [r for r in rows2 if (r["partition"], r["offset"]) not in first]
    assert sorted((r["id"], r["reason"]) for r in new) == sorted(
        (r["id"], r["reason"]) for r in rows if r["id"]
    )
    by_id = {r["id"]: r for r in rows if r["id"]}
    headers = _source_headers(broker, topics.input)
    for r in new:
        old = by_id[r["id"]]
        source = headers[(r["source"]["partition"], r["source"]["offset"])]
        assert (
            source["kp.redriven-from"]
            == f"{topics.dead_letter}/{old['partition']}/{old['offset']}".encode()
        )
        assert source["kp.redrive-count"] == b"1"
        assert r["source"]["partition"] == old["source"]["partition"]  # the same partition

    # The loop guard: the second failures have been redriven once already.
    plan = _dlq(
        tiny_topology,
        broker,
        "redrive",
        "--reason",
        "bad_tensor",
        "--max-redrives",
        "1",
        "--dry-run",
    )
    assert plan.returncode == 0, plan.stderr[-3000:]
    refused = [
        x
        for x in plan.stdout.splitlines()
        if x.startswith("refused ") and "already redriven 1 time " in x
    ]
    assert len(refused) == 5
    assert "would redrive 5 dead letters" in plan.stdout
    assert "refused 5: redriven too often 5" in plan.stdout
    assert "dry run: nothing sent" in plan.stdout
    counts = Counter(
        x.split()[-1] for x in plan.stdout.splitlines() if "bad_tensor" in x and "/" in x
    )
    assert counts == {"1": 5}  # each first failure would go out as its first redrive
    assert (
        len(
            list(
                read_topic(
                    KafkaSettings(), broker.bootstrap_servers, topics.input, timeout=30, idle=2
                )
            )
        )
        == 61
    )


def test_a_fix_then_a_redrive_serves_every_request(
    broker: EmbeddedBroker, topics: Topics, tmp_path: Path
) -> None:
    v1 = write_tiny_topology(tmp_path / "v1.yaml", topics)
    v2 = tmp_path / "v2.yaml"
    text = v1.read_text()
    assert "    backend: onnxruntime\n" in text
    v2.write_text(
        text.replace("    backend: onnxruntime\n", '    version: "2"\n    backend: onnxruntime\n')
    )
    served_v1 = produce_tiny(broker, topics.input, tiny_vectors(30), prefix="v1")
    wants_v2 = [f"v2-{i}" for i in range(20)]
    produce_requests(
        KafkaSettings(),
        broker.bootstrap_servers,
        topics.input,
        ((rid.encode(), _request(rid, "tiny-mlp", version="2")) for rid in wants_v2),
    )
    stats = _serve(v1, broker, topics, 30, 20)
    assert (stats.consumed, stats.results, stats.dead_letters) == (50, 30, 20)
    rows = _json(_dlq(v1, broker, "inspect", "--json"))
    assert sorted(r["id"] for r in rows) == sorted(wants_v2)
    assert {r["reason"] for r in rows} == {"unknown_model"}
    assert "version '2' is not served" in rows[0]["error"]

    # Version 2 is deployed (same group: it serves only what comes next), then redriven.
    sent = _dlq(v2, broker, "redrive", "--reason", "unknown_model", "--yes")
    assert sent.returncode == 0, sent.stderr[-3000:]
    assert f"redrove 20 dead letters to {topics.input} (reasons: unknown_model 20)" in sent.stdout
    fixed = _serve(v2, broker, topics, 50, 20)
    assert (fixed.consumed, fixed.results, fixed.dead_letters) == (20, 20, 0)
    results = [CODEC.decode_result(m.value()) for m in read_all(broker, topics.output, 50)]
    assert Counter(r.id for r in results) == Counter([*served_v1, *wants_v2])  # each once
    assert {r.model_version for r in results if r.id.startswith("v2-")} == {"2"}
    assert (
        len(
            list(
                read_topic(
                    KafkaSettings(),
                    broker.bootstrap_servers,
                    topics.dead_letter,
                    timeout=30,
                    idle=2,
                )
            )
        )
        == 20
    )


def test_refusals_and_errors_on_the_real_broker(
    broker: EmbeddedBroker, topics: Topics, tiny_topology: Path, tmp_path: Path
) -> None:
    produce_requests(
        KafkaSettings(),
        broker.bootstrap_servers,
        topics.input,
        [(b"nope-0", _request("nope-0", "nope"))],
    )
    _serve(tiny_topology, broker, topics, 0, 1)
    # What the pipeline writes when a dead letter with the bytes is too large for its topic.
    [letter] = [
        CODEC.decode_dead_letter(m.value()) for m in read_all(broker, topics.dead_letter, 1)
    ]
    big = dataclasses.replace(letter, payload=b"", id="big")
    produce_requests(
        KafkaSettings(),
        broker.bootstrap_servers,
        topics.dead_letter,
        [(b"big", CODEC.encode_dead_letter(big))],
    )

    sent = _dlq(
        tiny_topology,
        broker,
        "redrive",
        "--reason",
        "unknown_model",
        "--yes",
        "--to",
        f"{topics.input}",
    )
    assert sent.returncode == 0, sent.stderr[-3000:]
    lines = sent.stdout.splitlines()
    assert any(x.startswith("refused ") and "(big): no request bytes" in x for x in lines), lines
    assert lines[-2:] == [
        f"redrove 1 dead letter to {topics.input} (reasons: unknown_model 1)",
        "refused 1: without request bytes 1",
    ]
    for args, message in [
        (("redrive", "--reason", "unknown_model"), "pass --yes to send without a terminal"),
        (("redrive",), "choose dead letters"),
        (
            ("redrive", "--all", "--yes", "--to", "no-such-topic"),
            "--to: topic 'no-such-topic' does not exist",
        ),
        (("inspect", "--offsets", "0:1-0"), "--offsets: '0:1-0' ends before it starts"),
        (("inspect", "--since", "last tuesday"), "--since: 'last tuesday' is neither"),
    ]:
        done = _dlq(tiny_topology, broker, *args)
        assert done.returncode == 2, (args, done.stderr[-2000:])
        assert message in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr  # one clear line
    missing = tmp_path / "missing.yaml"
    missing.write_text(tiny_topology.read_text().replace(topics.dead_letter, "no-such-dlq"))
    done = _dlq(missing, broker, "inspect")
    assert done.returncode == 2
    assert done.stderr.strip() == "kp-pipeline: topic 'no-such-dlq' does not exist"
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(tiny_topology.read_text().replace("dead_letter:", "dead_leter:"))
    done = _dlq(unknown, broker, "inspect")
    assert done.returncode == 2
    assert "topics.dead_leter: unknown key" in done.stderr


# -- a Schema Registry topology -----------------------------------------------------------


@pytest.fixture
def registry_url() -> Iterator[str]:
    with registry_stub() as registry:
        yield registry.url


def test_a_registry_topology_decodes_its_framed_dead_letters(
    broker: EmbeddedBroker, topics: Topics, tmp_path: Path, registry_url: str
) -> None:
    topology = write_tiny_topology(tmp_path / "registry.yaml", topics)
    text = topology.read_text()
    assert "bootstrap_servers: embedded," in text
    topology.write_text(
        text.replace(
            "bootstrap_servers: embedded,",
            f"bootstrap_servers: embedded, schema_registry: {{url: '{registry_url}'}},",
        )
    )
    client = SchemaRegistryClient(registry_url)
    framed = AvroCodec(
        client, request_schema_id=client.register(f"{topics.input}-value", load_schema("request"))
    )
    ids = [f"nope-{i}" for i in range(3)]
    produce_requests(
        KafkaSettings(),
        broker.bootstrap_servers,
        topics.input,
        (
            (
                rid.encode(),
                framed.encode_request(tensor_request(rid, "nope", {"x": np.ones(64, np.float32)})),
            )
            for rid in ids
        ),
    )
    _serve(topology, broker, topics, 0, 3)
    [raw] = read_all(broker, topics.dead_letter, 1)[:1]
    assert raw.value()[0] == 0  # the Confluent wire format's magic byte
    rows = _json(_dlq(topology, broker, "inspect", "--json"))
    assert sorted((r["id"], r["reason"]) for r in rows) == [(i, "unknown_model") for i in ids]
    plan = _dlq(topology, broker, "redrive", "--id", "nope-*", "--dry-run")
    assert "would redrive 3 dead letters" in plan.stdout, plan.stderr[-2000:]


# -- whose request failed, and the headers that come back -----------------------------------

TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _raw(rid: str, inputs: list[dict[str, Any]], reply_topic: str | None = None) -> bytes:
    """A request as a producer written from request.avsc by field name makes it."""
    record = {
        "id": rid, "model": "tiny-mlp", "model_version": "1", "parameters": {},
        "deadline_ms": None, "reply_topic": reply_topic, "inputs": inputs,
    }  # fmt: skip
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(load_schema("request")), record)
    return buf.getvalue()


def test_dead_letters_name_the_request_and_headers_come_back(
    broker: EmbeddedBroker, topics: Topics, tiny_topology: Path
) -> None:
    """The refusals of the issue, sent as other producers send them, on the real broker."""
    text = tiny_topology.read_text().replace(
        "create: false", "create: false, propagate_headers: [trace-id]"
    )
    tiny_topology.write_text(text)
    x = np.ones(64, np.float32)
    fp32 = {"name": "x", "datatype": "FP32", "shape": [64]}
    jpeg = {"name": "x", "datatype": "BYTES", "shape": [1], "data": b"\xff\xd8\xff\xe0JFIF"}
    sent = {
        "f64": _raw("f64", [{**fp32, "data": x.astype(np.float64).tobytes()}], "svc.replies"),
        "reply": _raw("reply", [{**fp32, "data": x.tobytes()}], "not a topic!"),
        "twice": _raw("twice", [{**fp32, "data": x.tobytes()}] * 2, "svc.replies"),
        "jpeg": _raw("jpeg", [jpeg]),
        "ok": _raw("ok", [{**fp32, "data": x.tobytes()}]),
    }  # fmt: skip
    producer = Producer({"bootstrap.servers": broker.bootstrap_servers})
    for rid, value in sent.items():
        headers = [("traceparent", TRACEPARENT), ("trace-id", rid.encode()), ("x-other", b"no")]
        producer.produce(topics.input, value, rid.encode(), headers=headers)
    assert producer.flush(30) == 0
    _serve(tiny_topology, broker, topics, 1, 4)

    [result] = read_all(broker, topics.output, 1)
    assert CODEC.decode_result(result.value()).id == "ok"
    assert result.headers() == [("traceparent", TRACEPARENT), ("trace-id", b"ok")]
    letters = {}
    for m in read_all(broker, topics.dead_letter, 4):
        letter = CODEC.decode_dead_letter(m.value())
        letters[letter.id] = (letter, dict(m.headers() or []))
    want = {  # id: (reason, reply topic as sent)
        "f64": ("bad_tensor", "svc.replies"),
        "reply": ("bad_request", "not a topic!"),
        "twice": ("undecodable", "svc.replies"),
        "jpeg": ("bad_tensor", None),  # served bare, but the model takes FP32 x
    }
    assert set(letters) == set(want)
    for rid, (reason, reply) in want.items():
        letter, headers = letters[rid]
        assert (letter.reason, letter.model, letter.model_version, letter.reply_topic) == (
            reason, "tiny-mlp", "1", reply,
        ), letter  # fmt: skip
        assert letter.payload == sent[rid]
        assert headers["kp.id"] == rid.encode()
        assert headers["kp.model"] == b"tiny-mlp"
        assert headers["traceparent"] == TRACEPARENT
        assert headers["trace-id"] == rid.encode()
        assert "x-other" not in headers
    assert "FP32[64] needs 256 bytes, got 512" in letters["f64"][0].error

    shown = _json(_dlq(tiny_topology, broker, "inspect", "--json"))
    assert sorted(
        (d["id"], d["model"], d["model_version"], d["reply_topic"]) for d in shown
    ) == sorted((rid, "tiny-mlp", "1", reply) for rid, (_, reply) in want.items())
