"""load.broker_floor measures one hop on each broker it finds (the figures come from full runs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from load.broker_floor import main, measure

pytestmark = pytest.mark.e2e


def test_a_row_per_broker_and_run_length(tmp_path: Path) -> None:
    rows = measure(400.0, [1.0, 2.0], tmp_path)
    assert [(name.split()[0], seconds) for name, seconds, _ in rows] == [
        ("Tansu", 1.0), ("Tansu", 2.0), ("noida-db", 1.0), ("noida-db", 2.0),
    ]  # fmt: skip
    for _, _, (p50, p90, p99, p999) in rows:
        assert 0 < p50 <= p90 <= p99 <= p999 < 5000  # every record came back, in ms


def test_the_table_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--rate", "200", "--seconds", "1"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| broker | run | p50 ms")
    assert len(table) == 1 + 2  # the head, a row per broker
