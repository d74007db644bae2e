"""``kp-pipeline dlq``: selection, positions, reading to the end, tables, ``dlq inspect``.

Kafka is replaced by in-memory doubles (a consumer over lists of records), which
tests/pipeline/test_redrive.py uses too; the real broker is in tests/e2e/test_dlq_pipe.py.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

from pipeline.cli import main
from pipeline.tools import dlq
from pipeline.tools.dlq import (
    DlqError,
    Letter,
    Selection,
    Table,
    parse_positions,
    parse_since,
    read_letters,
)
from schemas.codec import AvroCodec
from schemas.messages import DeadLetter

ROOT = Path(__file__).resolve().parents[3]
CODEC = AvroCodec()
T0 = 1_795_132_800_000  # 2026-11-20T00:00Z
DLQ, IN, OUT = "dlq", "in", "out"


# -- doubles ------------------------------------------------------------------------------


class FakeError:
    def __init__(self, code: int, text: str = "") -> None:
        self._code, self._text = code, text

    def code(self) -> int:
        return self._code

    def fatal(self) -> bool:
        return False

    def str(self) -> str:
        return self._text or f"error {self._code}"


class FakeMessage:
    def __init__(
        self,
        topic: str,
        partition: int,
        offset: int,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        error: FakeError | None = None,
    ) -> None:
        self._t, self._p, self._o = topic, partition, offset
        self._v, self._k, self._h, self._e = value, key, headers, error

    def topic(self) -> str:
        return self._t

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def value(self) -> bytes | None:
        return self._v

    def key(self) -> bytes | None:
        return self._k

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self._h

    def error(self) -> FakeError | None:
        return self._e


class FakeConsumer:
    """Topics as {topic: {partition: [records]}}; offsets may have gaps (compaction)."""

    def __init__(self, topics: dict[str, dict[int, list[FakeMessage]]]) -> None:
        self.topics = topics
        self.assigned: list[tuple[str, int, int]] = []
        self._queue: list[FakeMessage] = []
        self.closed = False

    def list_topics(self, topic: str, timeout: float) -> Any:
        parts = self.topics.get(topic)
        info = (
            None if parts is None else SimpleNamespace(partitions=dict.fromkeys(parts), error=None)
        )
        return SimpleNamespace(topics={} if info is None else {topic: info})

    def assign(self, tps: list[TopicPartition]) -> None:
        (tp,) = tps  # the reader reads one partition at a time
        start = 0 if tp.offset == OFFSET_BEGINNING else tp.offset
        self.assigned.append((tp.topic, tp.partition, start))
        records = [m for m in self.topics[tp.topic][tp.partition] if m.offset() >= start]
        self._queue = [
            *records,
            FakeMessage(tp.topic, tp.partition, -1, error=FakeError(KafkaError._PARTITION_EOF)),
        ]

    def consume(self, n: int, timeout: float) -> list[FakeMessage]:
        out, self._queue = self._queue[: min(n, 2)], self._queue[min(n, 2) :]  # small batches
        return out

    def poll(self, timeout: float) -> FakeMessage | None:
        return None

    def close(self) -> None:
        self.closed = True


def letter(
    reason: str = "unknown_model",
    rid: str | None = "r-1",
    model: str | None = "tiny-mlp",
    source: tuple[str, int, int] = (IN, 0, 0),
    payload: bytes = b"request-bytes",
    failed_at_ms: int = T0,
    error: str = "unknown model",
) -> DeadLetter:
    return DeadLetter(reason, error, *source, payload, failed_at_ms, rid, model)


def dlq_record(partition: int, offset: int, d: DeadLetter, headers: Any = None) -> FakeMessage:
    key = None if d.id is None else d.id.encode()
    return FakeMessage(DLQ, partition, offset, CODEC.encode_dead_letter(d), key, headers)


def wrap(
    partition: int, offset: int, d: DeadLetter, headers: dict[str, bytes] | None = None
) -> Letter:
    return Letter(
        partition,
        offset,
        None if d.id is None else d.id.encode(),
        headers or {},
        d,
        size=len(d.payload),
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


# -- showing ------------------------------------------------------------------------------


def test_table_sizes_columns_cuts_the_last_and_keeps_rows_on_one_line() -> None:
    out = io.StringIO()
    table = Table(("pos", "reason", "error"), out, width=50)
    table.add(["0:1", "unknown_model", "short"])
    table.add(["12:345", "bad_tensor", "line one\nline two " + "x" * 50])
    table.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "pos     reason         error"
    assert lines[1] == "0:1     unknown_model  short"
    assert lines[2].startswith("12:345  bad_tensor     line one line two x")
    assert lines[2].endswith("…")
    assert len(lines[2]) == 50


def test_a_long_table_streams_after_its_first_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dlq, "SAMPLE_ROWS", 2)
    out = io.StringIO()
    table = Table(("a", "b"), out, width=None)
    table.add(["1", "x"])
    assert out.getvalue() == ""
    table.add(["22", "y"])
    assert out.getvalue().count("\n") == 3  # sized by the sample, then printed
    table.add(["a very long first cell" * 3, "z"])  # cut to the sampled width
    table.close()
    assert out.getvalue().splitlines()[-1] == "a…  z"


def test_json_lines_carry_everything_and_the_payload_on_request() -> None:
    d = letter(payload=b"\x00\x01")
    x = Letter(3, 9, b"\xff\xfe", {"kp.reason": b"unknown_model"}, d, size=2)
    plain = dlq.letter_json(DLQ, x, payload=False)
    assert plain["key_base64"] == "//4="
    assert plain["source"] == {"topic": IN, "partition": 0, "offset": 0}
    assert (plain["partition"], plain["offset"], plain["payload_bytes"]) == (3, 9, 2)
    assert plain["failed_at"] == "2026-11-20T00:00:00Z"
    assert "payload" not in plain
    assert dlq.letter_json(DLQ, x, payload=True)["payload"] == "AAE="
    json.dumps(plain)


def test_summary_counts_by_reason_and_model() -> None:
    tally = dlq.Tally()
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
    assert dlq.Tally(records=4).lines(DLQ, selected=True) == [
        "none of the 4 dead letters read from dlq match"
    ]
    assert dlq.Tally().lines(DLQ, selected=False) == ["no dead letters in dlq"]


# -- the command --------------------------------------------------------------------------


TOPOLOGY = f"""
kafka: {{bootstrap_servers: "broker:9092"}}
topics: {{input: [{IN}], output: {OUT}, dead_letter: {DLQ}}}
models:
  - name: tiny-mlp
    backend: onnxruntime
    artifact: {ROOT}/models/tiny_mlp.onnx
    inputs: [{{name: x, datatype: FP32, shape: [64]}}]
"""


def fake_kafka() -> SimpleNamespace:
    """Three dead letters, two of them unknown_model, and the topics the commands look up."""
    records = {
        0: [
            dlq_record(0, 0, letter("unknown_model", rid="a", source=(IN, 0, 3))),
            dlq_record(0, 1, letter("undecodable", rid=None, model=None, source=(IN, 0, 4))),
        ],
        1: [
            dlq_record(
                1, 0, letter("unknown_model", rid="b", source=(IN, 1, 2), error="line\nbreak")
            )
        ],
    }
    return SimpleNamespace(consumer=FakeConsumer({DLQ: records, IN: {0: [], 1: []}, OUT: {0: []}}))


@pytest.fixture
def kafka(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """The command's consumer, replaced by the double."""
    world = fake_kafka()
    monkeypatch.setattr(dlq, "open_consumer", lambda settings, bootstrap: world.consumer)
    return world


def run_dlq(tmp_path: Path, *argv: str, text: str = TOPOLOGY) -> int:
    path = tmp_path / "topology.yaml"
    path.write_text(text)
    return main(["dlq", argv[0], str(path), *argv[1:]])


def test_inspect_prints_a_table_and_a_summary(
    tmp_path: Path, kafka: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_dlq(tmp_path, "inspect") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == [
        "dlq",
        "failed",
        "at",
        "(UTC)",
        "reason",
        "model",
        "id",
        "source",
        "error",
    ]
    assert out[1].split() == [
        "0:0",
        "2026-11-20T00:00:00Z",
        "unknown_model",
        "tiny-mlp",
        "a",
        "in/0@3",
        "unknown",
        "model",
    ]
    assert out[2].split()[:6] == ["0:1", "2026-11-20T00:00:00Z", "undecodable", "-", "-", "in/0@4"]
    assert out[3].endswith("in/1@2  line break")
    assert out[5:] == [
        "3 dead letters in dlq",
        "  by reason: unknown_model 2, undecodable 1",
        "  by model:  tiny-mlp 2, (none) 1",
    ]
    assert kafka.consumer.closed


def test_inspect_json_and_limit(
    tmp_path: Path, kafka: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_dlq(tmp_path, "inspect", "--json", "--limit", "1", "--reason", "unknown_model") == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [(r["id"], r["partition"], r["offset"]) for r in rows] == [("a", 0, 0)]
    assert "2 of the 3 dead letters read from dlq match" in captured.err
    assert "(showing the first 1; --limit)" in captured.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("inspect", "--offsets", "0:x"), "--offsets: '0:x' is not PARTITION:OFFSET"),
        (("inspect", "--since", "soon"), "--since: 'soon' is neither an ISO 8601 time"),
        (("inspect", "--offsets", "5:1"), "--offsets: dlq has partitions 0-1, not [5]"),
    ],
)
def test_bad_requests_exit_2(
    tmp_path: Path,
    kafka: SimpleNamespace,
    capsys: pytest.CaptureFixture[str],
    argv: tuple[str, ...],
    message: str,
) -> None:
    assert run_dlq(tmp_path, *argv) == 2
    assert message in capsys.readouterr().err


def test_a_bad_topology_or_missing_topic_exits_2(
    tmp_path: Path, kafka: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_dlq(tmp_path, "inspect", text=TOPOLOGY.replace("dead_letter:", "dead_leter:")) == 2
    assert "topics.dead_leter: unknown key" in capsys.readouterr().err
    assert (
        run_dlq(
            tmp_path, "inspect", text=TOPOLOGY.replace(f"dead_letter: {DLQ}", "dead_letter: gone")
        )
        == 2
    )
    assert "topic 'gone' does not exist" in capsys.readouterr().err
    embedded = TOPOLOGY.replace('"broker:9092"', "embedded")
    assert run_dlq(tmp_path, "inspect", text=embedded) == 2
    assert "--bootstrap: the topology's broker is embedded" in capsys.readouterr().err
