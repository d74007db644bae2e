"""``kp-pipeline dlq inspect``: show the chosen dead letters, as a table or JSON lines.

It only reads (`pipeline.tools.dlq.reading`) and prints: one row per dead letter in
(partition, offset) order, then a count by reason and by model. The table and its rows
are shared with ``dlq redrive``, which shows its plan the same way.

Exit codes are `schemas.errors.ExitCode`: 0 done, 1 the broker failed, 2 a bad command
line or topology or a missing topic.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import shutil
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from pipeline.tools.dlq.reading import (
    DlqError,
    Letter,
    Selection,
    Tally,
    open_consumer,
    open_context,
    read_letters,
)
from schemas.errors import ExitCode

__all__ = [
    "INSPECT_COLUMNS",
    "Table",
    "inspect_row",
    "letter_json",
    "run_inspect",
    "terminal_width",
    "utc",
]

SAMPLE_ROWS = 200  # rows that size a table's columns before it starts streaming
INSPECT_COLUMNS = ("dlq", "failed at (UTC)", "reason", "model", "id", "source", "error")


def utc(ms: int) -> str:
    """Epoch ms as ``2026-11-20T10:03:01Z``, which ``--since`` takes back."""
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


class Table:
    """A text table whose columns are sized by its first rows.

    Later rows are cut to fit, so a table of a million dead letters streams instead of
    being held in memory to measure it.
    """

    def __init__(self, columns: Sequence[str], out: TextIO, width: int | None) -> None:
        self.columns, self.out, self.width = list(columns), out, width
        self._rows: list[list[str]] | None = []
        self._widths: list[int] = []

    def add(self, row: Sequence[str]) -> None:
        """Add a row (printed once the columns are sized)."""
        cells = [" ".join(c.split()) for c in row]  # an error's newlines stay in one row
        if self._rows is None:
            self._print(cells)
            return
        self._rows.append(cells)
        if len(self._rows) >= SAMPLE_ROWS:
            self.close()

    def close(self) -> None:
        """Print what is held (the header first); later rows print as they come."""
        if self._rows is None:
            return
        rows, self._rows = self._rows, None
        sized = [self.columns, *rows]
        self._widths = [min(max(len(r[i]) for r in sized), 40) for i in range(len(self.columns))]
        self._print(self.columns)
        for row in rows:
            self._print(row)

    def _print(self, cells: Sequence[str]) -> None:
        head = [_cut(c, w).ljust(w) for c, w in zip(cells[:-1], self._widths, strict=False)]
        used = sum(self._widths[:-1]) + 2 * (len(self._widths) - 1)
        room = max(self.width - used, 20) if self.width else 120
        print("  ".join([*head, _cut(cells[-1], room)]).rstrip(), file=self.out)


def inspect_row(letter: Letter) -> list[str]:
    """A dead letter as a row of ``INSPECT_COLUMNS``."""
    d = letter.dead
    assert d is not None
    return [
        f"{letter.partition}:{letter.offset}",
        utc(d.failed_at_ms),
        d.reason,
        (d.model or "-") + (f" v{d.model_version}" if d.model_version else ""),
        d.id or "-",
        f"{d.topic}/{d.partition}@{d.offset}",
        d.error,
    ]


def letter_json(topic: str, letter: Letter, payload: bool) -> dict[str, Any]:
    """A dead letter as one JSON object; ``payload`` adds the request's bytes in base64."""
    d = letter.dead
    assert d is not None
    key = letter.key
    out: dict[str, Any] = {"topic": topic, "partition": letter.partition, "offset": letter.offset}
    try:
        out["key"] = None if key is None else key.decode()
    except UnicodeDecodeError:
        out["key_base64"] = base64.b64encode(key or b"").decode()
    out |= {
        "failed_at": utc(d.failed_at_ms),
        "failed_at_ms": d.failed_at_ms,
        "reason": d.reason,
        "model": d.model,
        "model_version": d.model_version,
        "id": d.id,
        "reply_topic": d.reply_topic,
        "error": d.error,
        "source": {"topic": d.topic, "partition": d.partition, "offset": d.offset},
        "payload_bytes": letter.size,
        "headers": {k: v.decode(errors="replace") for k, v in letter.headers.items()},
    }
    if payload:
        out["payload"] = base64.b64encode(d.payload).decode()
    return out


def terminal_width() -> int | None:
    """The terminal's width to fit a table in; None when stdout is not a terminal."""
    return shutil.get_terminal_size().columns if sys.stdout.isatty() else None


def run_inspect(args: argparse.Namespace) -> int:
    """Print the chosen dead letters as a table (or JSON lines) and a summary."""
    ctx, selection = open_context(args), Selection.from_args(args)
    if args.payload and not args.json:
        raise DlqError("--payload: only with --json (a table has no room for the bytes)")
    tally, shown = Tally(), 0
    table = None if args.json else Table(INSPECT_COLUMNS, sys.stdout, terminal_width())
    consumer = open_consumer(ctx.settings, ctx.bootstrap)
    try:
        bounds = selection.bounds()
        for letter in read_letters(consumer, ctx.dlq, ctx.codec, bounds, args.payload):
            tally.read(letter)
            if not selection.matches(letter):
                continue
            tally.chose(letter)
            if args.limit is not None and shown >= args.limit:
                continue
            shown += 1
            if table is None:
                print(json.dumps(letter_json(ctx.dlq, letter, args.payload)))
            else:
                table.add(inspect_row(letter))
    finally:
        consumer.close()
    lines = tally.lines(ctx.dlq, not selection.empty())
    chosen = sum(tally.reasons.values())
    if shown < chosen:
        lines.insert(1, f"  (showing the first {shown}; --limit)")
    if table is not None:
        table.close()
        if shown:
            print()
    for line in lines:
        print(line, file=sys.stdout if table is not None else sys.stderr)
    return ExitCode.OK
