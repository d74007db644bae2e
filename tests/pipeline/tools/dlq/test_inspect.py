"""``kp-pipeline dlq inspect``: tables, JSON lines, the command and its exit codes.

Kafka is replaced by the in-memory doubles of doubles.py; the real broker is in
tests/e2e/test_dlq_pipe.py.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.tools.dlq import inspect
from pipeline.tools.dlq.inspect import Table
from pipeline.tools.dlq.reading import Letter
from tests.pipeline.tools.dlq.doubles import (
    DLQ,
    IN,
    TOPOLOGY,
    fake_kafka,
    letter,
    run_dlq,
)

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
    monkeypatch.setattr(inspect, "SAMPLE_ROWS", 2)
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
    plain = inspect.letter_json(DLQ, x, payload=False)
    assert plain["key_base64"] == "//4="
    assert plain["source"] == {"topic": IN, "partition": 0, "offset": 0}
    assert (plain["partition"], plain["offset"], plain["payload_bytes"]) == (3, 9, 2)
    assert plain["failed_at"] == "2026-11-20T00:00:00Z"
    assert "payload" not in plain
    assert inspect.letter_json(DLQ, x, payload=True)["payload"] == "AAE="
    json.dumps(plain)


# -- the command --------------------------------------------------------------------------


@pytest.fixture
def kafka(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """The command's consumer, replaced by the double."""
    world = fake_kafka()
    monkeypatch.setattr(inspect, "open_consumer", lambda settings, bootstrap: world.consumer)
    return world


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
