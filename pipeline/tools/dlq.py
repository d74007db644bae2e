"""``kp-pipeline dlq``: find dead letters and show them (``dlq inspect``).

Both ``dlq`` subcommands start the same way: open the topology, read its dead-letter
topic, and keep the dead letters that ``--reason``, ``--model``, ``--id``, ``--since``,
``--until`` and ``--offsets`` choose. That shared half lives here, with ``inspect``, which
only shows what it read; `pipeline.tools.redrive` builds ``dlq redrive`` on it. This module
registers both subcommands, so the command line stays one ``dlq`` command.

A dead letter (`pipeline.serving.outcomes.OutcomeEncoder.dead_letter`) keeps the request's bytes,
its key and the position it was read from, so a request that failed for a reason that has
since been fixed (a model not served yet, a bad deploy) can be *redriven*: its original
bytes are produced again, with its key, to the topic it came from (`pipeline.tools.redrive`).

Reading. The dead-letter topic is read with assign() (no consumer group, nothing
committed), from the beginning to the end of each partition as the broker reports it in
fetch responses (``enable.partition.eof``); ListOffsets is not used, because Tansu's
high watermark there is wrong. A record that is not a dead letter is counted, not fatal.
Dead letters written in transactions (``delivery: exactly_once``) are read committed
only (librdkafka's default isolation).

Exit codes follow `pipeline.cli`: ``inspect`` exits 0 done, 1 the broker failed, 2 a bad
command line or topology or a missing topic; ``redrive``'s are in `pipeline.tools.redrive`.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import fnmatch
import json
import re
import shutil
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from pipeline.config.topology import KafkaSettings
from pipeline.kafka.clients import reader_config
from pipeline.tools.timespec import TimeError, parse_time
from schemas.codec import AvroCodec
from schemas.errors import BrokerError, ConfigError, describe
from schemas.messages import DeadLetter

__all__ = [
    "EXIT_OK",
    "READ_TIMEOUT_S",
    "DlqContext",
    "DlqError",
    "Letter",
    "Selection",
    "Table",
    "add_parser",
    "counts",
    "inspect_row",
    "letters_n",
    "open_consumer",
    "open_context",
    "parse_positions",
    "parse_since",
    "partitions_of",
    "read_letters",
    "read_partition",
    "terminal_width",
]

EXIT_OK = 0
READ_TIMEOUT_S = 30.0  # no record and no end of partition for this long: the broker is gone
SAMPLE_ROWS = 200  # rows that size a table's columns before it starts streaming
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_POSITION = re.compile(r"^(\d+):(\d+)(?:-(\d+))?$")
INSPECT_COLUMNS = ("dlq", "failed at (UTC)", "reason", "model", "id", "source", "error")


class DlqError(ConfigError):
    """The command cannot run as asked (exit 2); nothing was sent."""


# -- selection ----------------------------------------------------------------------------


def parse_since(text: str, flag: str, now_ms: int | None = None) -> int:
    """``90m``/``2h``/``7d`` ago, or an ISO 8601 time (no zone = UTC), as epoch ms."""
    found = _DURATION.match(text.strip())
    if found:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        return now - int(float(found[1]) * _UNIT_S[found[2]] * 1000)
    try:
        return parse_time(text, flag)
    except TimeError:
        raise DlqError(
            f"{flag}: {text!r} is neither an ISO 8601 time (2026-11-20T10:00Z) "
            "nor a time ago (30s, 90m, 2h, 7d)"
        ) from None


def parse_positions(texts: Iterable[str], flag: str = "--offsets") -> dict[int, list[range]]:
    """``P:O,P:FIRST-LAST`` (inclusive; the flag may repeat) to offset ranges per partition.

    Not `pipeline.tools.replay.parse_offsets`: that one takes a bare offset for every partition
    and no ranges, which suits a replay's start and end but not a set of positions.
    """
    out: dict[int, list[range]] = defaultdict(list)
    for text in texts:
        for part in text.split(","):
            found = _POSITION.match(part.strip())
            if found is None:
                raise DlqError(
                    f"{flag}: {part.strip()!r} is not PARTITION:OFFSET or "
                    "PARTITION:FIRST-LAST (e.g. 0:17,2:40-45)"
                )
            first = int(found[2])
            last = first if found[3] is None else int(found[3])
            if last < first:
                raise DlqError(f"{flag}: {part.strip()!r} ends before it starts")
            out[int(found[1])].append(range(first, last + 1))
    return dict(out)


@dataclass(frozen=True)
class Selection:
    """Which dead letters a command acts on.

    Every given filter must match (AND); the values of one filter are alternatives (OR).
    ``ids`` may be glob patterns (``order-*``).
    """

    reasons: frozenset[str] = frozenset()
    models: frozenset[str] = frozenset()
    ids: tuple[str, ...] = ()
    since_ms: int | None = None
    until_ms: int | None = None
    positions: Mapping[int, Sequence[range]] | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Selection:
        """The selection flags of ``inspect`` and ``redrive``, parsed (raises `DlqError`)."""
        since = parse_since(args.since, "--since") if args.since else None
        until = parse_since(args.until, "--until") if args.until else None
        if since is not None and until is not None and until <= since:
            raise DlqError("--until: it is not after --since")
        return cls(
            frozenset(args.reason or ()),
            frozenset(args.model or ()),
            tuple(args.id or ()),
            since,
            until,
            parse_positions(args.offsets) if args.offsets else None,
        )

    def empty(self) -> bool:
        """True when nothing was chosen: every dead letter matches."""
        return not (self.reasons or self.models or self.ids or self.positions) and (
            self.since_ms is None and self.until_ms is None
        )

    def bounds(self) -> dict[int, tuple[int, int]] | None:
        """With ``--offsets``, the first and last offset to read of each named partition."""
        if self.positions is None:
            return None
        return {
            p: (min(r.start for r in rs), max(r.stop - 1 for r in rs))
            for p, rs in self.positions.items()
        }

    def matches(self, letter: Letter) -> bool:
        """Whether a record of the dead-letter topic is chosen (never one that is unreadable)."""
        d = letter.dead
        if d is None:
            return False
        if self.positions is not None and not any(
            letter.offset in r for r in self.positions.get(letter.partition, ())
        ):
            return False
        if self.reasons and d.reason not in self.reasons:
            return False
        if self.models and d.model not in self.models:
            return False
        if self.ids and not any(
            d.id is not None and fnmatch.fnmatchcase(d.id, i) for i in self.ids
        ):
            return False
        if self.since_ms is not None and d.failed_at_ms < self.since_ms:
            return False
        return self.until_ms is None or d.failed_at_ms < self.until_ms


# -- reading ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Letter:
    """One record of the dead-letter topic; ``dead`` is None when it does not decode."""

    partition: int
    offset: int
    key: bytes | None
    headers: Mapping[str, bytes]
    dead: DeadLetter | None
    problem: str = ""
    size: int = 0  # bytes of the request in the dead letter (kept when the payload is not)


def open_consumer(settings: KafkaSettings, bootstrap: str) -> Any:
    """An assign-only reader that reports each partition's end and commits nothing."""
    return Consumer(reader_config(settings, bootstrap, group_id="kp-dlq", partition_eof=True))


def partitions_of(consumer: Any, topic: str) -> list[int] | None:
    """The partitions of ``topic``, or None when it does not exist."""
    info = consumer.list_topics(topic, timeout=15).topics.get(topic)
    if info is None or info.error is not None:
        return None
    return sorted(info.partitions)


def read_letters(
    consumer: Any,
    topic: str,
    codec: AvroCodec,
    bounds: Mapping[int, tuple[int, int]] | None = None,
    keep_payload: bool = True,
    timeout_s: float = READ_TIMEOUT_S,
) -> Iterator[Letter]:
    """Every record of ``topic`` up to each partition's end (or only ``bounds``, inclusive).

    Partitions are read one after the other, so the output is in (partition, offset)
    order and the same on every run.
    """
    parts = partitions_of(consumer, topic)
    if parts is None:
        raise DlqError(f"topic {topic!r} does not exist")
    if bounds is not None:
        missing = sorted(set(bounds) - set(parts))
        if missing:
            raise DlqError(f"--offsets: {topic} has partitions 0-{len(parts) - 1}, not {missing}")
        parts = [p for p in parts if p in bounds]
    for p in parts:
        start, stop = (OFFSET_BEGINNING, None) if bounds is None else bounds[p]
        for msg in read_partition(consumer, topic, p, start, timeout_s):
            offset = int(msg.offset())
            if stop is not None and offset > stop:
                break
            yield _decode(codec, msg, keep_payload)
            if stop is not None and offset >= stop:
                break


def read_partition(
    consumer: Any, topic: str, partition: int, start: int, timeout_s: float
) -> Iterator[Any]:
    """Records of one partition from ``start`` to its end; the caller may stop sooner."""
    consumer.assign([TopicPartition(topic, partition, start)])
    last = time.monotonic()
    while True:
        # What is already fetched, else wait for the next record or end-of-partition event
        # (consume() with a timeout would wait out the timeout after the end).
        batch = consumer.consume(500, 0) or [m for m in [consumer.poll(0.5)] if m is not None]
        if not batch:
            if time.monotonic() - last > timeout_s:
                raise BrokerError(f"{topic}[{partition}]: no end of partition in {timeout_s} s")
            continue
        last = time.monotonic()
        for msg in batch:
            if msg.topic() != topic or msg.partition() != partition:
                continue
            err = msg.error()
            if err is None:
                yield msg
            elif err.code() == KafkaError._PARTITION_EOF:
                return
            elif err.fatal():
                raise BrokerError(f"reading {topic}[{partition}]: {err.str()}")


def _decode(codec: AvroCodec, msg: Any, keep_payload: bool) -> Letter:
    headers = {k: v or b"" for k, v in msg.headers() or []}
    dead: DeadLetter | None = None
    problem, size = "", 0
    try:
        dead = codec.decode_dead_letter(msg.value() or b"")
        size = len(dead.payload)
        if not keep_payload:
            dead.payload = b""
    except Exception as e:  # anything written there by someone else: counted, not fatal
        problem = describe(e)
    return Letter(msg.partition(), int(msg.offset()), msg.key(), headers, dead, problem, size)


# -- showing ------------------------------------------------------------------------------


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
        d.model or "-",
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
        "id": d.id,
        "error": d.error,
        "source": {"topic": d.topic, "partition": d.partition, "offset": d.offset},
        "payload_bytes": letter.size,
        "headers": {k: v.decode(errors="replace") for k, v in letter.headers.items()},
    }
    if payload:
        out["payload"] = base64.b64encode(d.payload).decode()
    return out


def letters_n(n: int) -> str:
    """``1 dead letter``, ``2 dead letters``."""
    return f"{n} dead letter{'' if n == 1 else 's'}"


def counts(counter: Mapping[str, int]) -> str:
    """``a 5, b 2``: most first, then by name."""
    return ", ".join(f"{k} {n}" for k, n in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))


@dataclass
class Tally:
    """What a read found: records, unreadable ones, and the chosen ones by reason and model."""

    records: int = 0
    unreadable: list[str] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)
    models: Counter[str] = field(default_factory=Counter)

    def read(self, letter: Letter) -> None:
        """Count one record read."""
        self.records += 1
        if letter.dead is None:
            self.unreadable.append(f"{letter.partition}:{letter.offset} ({letter.problem})")

    def chose(self, letter: Letter) -> None:
        """Count one chosen dead letter."""
        assert letter.dead is not None
        self.reasons[letter.dead.reason] += 1
        self.models[letter.dead.model or "(none)"] += 1

    def lines(self, topic: str, selected: bool) -> list[str]:
        """The summary under a table."""
        chosen = sum(self.reasons.values())
        letters = self.records - len(self.unreadable)
        if not letters:
            head = f"no dead letters {'read from' if selected else 'in'} {topic}"
        elif not selected:
            head = f"{letters_n(chosen)} in {topic}"
        elif chosen == letters:
            head = (
                f"{letters_n(chosen)} in {topic} match{'es' if chosen == 1 else ''} the selection"
            )
        else:
            head = f"{chosen or 'none'} of the {letters} dead letters read from {topic} match"
        out = [head]
        if chosen:
            out += [f"  by reason: {counts(self.reasons)}", f"  by model:  {counts(self.models)}"]
        if self.unreadable:
            shown = "; ".join(self.unreadable[:3])
            n = len(self.unreadable)
            out.append(f"{n} record{'' if n == 1 else 's'} not a dead letter: {shown}")
        return out


# -- the command --------------------------------------------------------------------------


@dataclass
class DlqContext:
    """What both subcommands work on: the cluster, the topology's topics and its codec."""

    settings: KafkaSettings
    bootstrap: str
    dlq: str
    output: str
    codec: AvroCodec


def open_context(args: argparse.Namespace) -> DlqContext:
    """Open ``args.topology``; ``--bootstrap`` names the cluster (an embedded one is refused)."""
    from pipeline.app import make_codec, open_topology

    topology = open_topology(args.topology).topology
    bootstrap = args.bootstrap or topology.kafka.bootstrap_servers
    if not args.bootstrap and topology.kafka.embedded:
        raise DlqError(
            "--bootstrap: the topology's broker is embedded in `kp-pipeline run`; "
            "name the cluster that holds its dead letters"
        )
    t = topology.topics
    return DlqContext(topology.kafka, bootstrap, t.dead_letter, t.output, make_codec(topology))


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
    return EXIT_OK


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``dlq inspect`` and ``dlq redrive``."""
    from pipeline.tools.redrive import run_redrive  # it imports this module: not at the top

    dlq = subparsers.add_parser("dlq", help="inspect dead letters, redrive them")
    sub = dlq.add_subparsers(dest="dlq_command", required=True)
    ins = sub.add_parser(
        "inspect",
        help="list dead letters, with a summary by reason and model",
        description="Read the topology's dead-letter topic from its beginning to its end "
        "(assigned, no consumer group, nothing committed) and list the dead letters that "
        "match, in (partition, offset) order, with a count by reason and by model.",
    )
    red = sub.add_parser(
        "redrive",
        help="send chosen dead letters' requests back to their topic",
        description="Send the chosen dead letters' original request bytes, with their keys, "
        "back to the topic and partition they were read from (--to: another topic, placed "
        "by key), with headers kp.redriven-from and kp.redrive-count. Asks before sending "
        "unless --yes; refuses dead letters without request bytes and requests redriven "
        "--max-redrives times.",
    )
    for p in (ins, red):
        p.add_argument("topology", nargs="?", default="topology.yaml")
        p.add_argument("--bootstrap", help="the cluster (default: the topology's)")
        p.add_argument("--reason", action="append", help="e.g. unknown_model (repeatable)")
        p.add_argument("--model", action="append", help="model name (repeatable)")
        p.add_argument("--id", action="append", help="request id or glob, e.g. 'order-*'")
        p.add_argument("--since", help="failed at or after: ISO 8601 time or 90m, 2h, 7d ago")
        p.add_argument("--until", help="failed before: ISO 8601 time or 90m, 2h, 7d ago")
        p.add_argument("--offsets", action="append", help="dead-letter positions P:O,P:O1-O2")
        p.add_argument("--limit", type=_positive, help="at most this many dead letters")
    ins.add_argument(
        "--json", action="store_true", help="one JSON object per line; the summary to stderr"
    )
    ins.add_argument("--payload", action="store_true", help="with --json: the request in base64")
    ins.set_defaults(func=run_inspect)
    red.add_argument("--to", help="send here instead of each request's source topic")
    red.add_argument("--all", action="store_true", help="every dead letter (no selection)")
    red.add_argument("--dry-run", action="store_true", help="show what would go; send nothing")
    red.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    red.add_argument(
        "--max-redrives",
        type=_positive,
        default=3,
        help="refuse requests already redriven this many times (default 3)",
    )
    red.set_defaults(func=run_redrive)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return value
