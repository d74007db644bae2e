"""Reading the dead-letter topic, and choosing dead letters: what both ``dlq`` commands share.

``dlq inspect`` and ``dlq redrive`` start the same way: open the topology, read its
dead-letter topic, and keep the dead letters that ``--reason``, ``--model``, ``--id``,
``--since``, ``--until`` and ``--offsets`` choose (`Selection`). That half lives here, so
`pipeline.tools.dlq.inspect` (which only shows) and `pipeline.tools.dlq.redrive` (which
writes) both build on it and neither on the other.

Reading. The dead-letter topic is read with assign() (no consumer group, nothing
committed: `pipeline.kafka.clients.reader_config`), from the beginning to the end of each
partition as the broker reports it in fetch responses (``enable.partition.eof``);
ListOffsets is not used, because Tansu's high watermark there is wrong. A record that is
not a dead letter is counted, not fatal. Dead letters written in transactions
(``delivery: exactly_once``) are read committed only (librdkafka's default isolation).
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from pipeline.config.topology import KafkaSettings
from pipeline.kafka.clients import reader_config
from pipeline.tools.timespec import TimeError, parse_time
from schemas.codec import AvroCodec
from schemas.errors import BrokerError, ConfigError, describe
from schemas.messages import DeadLetter

__all__ = [
    "READ_TIMEOUT_S",
    "DlqContext",
    "DlqError",
    "Letter",
    "Selection",
    "Tally",
    "counts",
    "letters_n",
    "open_consumer",
    "open_context",
    "parse_positions",
    "parse_since",
    "partitions_of",
    "read_letters",
    "read_partition",
]

READ_TIMEOUT_S = 30.0  # no record and no end of partition for this long: the broker is gone
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_POSITION = re.compile(r"^(\d+):(\d+)(?:-(\d+))?$")


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


# -- counting -----------------------------------------------------------------------------


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


# -- the topology -------------------------------------------------------------------------


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
    from pipeline.kafka.preflight import check_access

    topology = open_topology(args.topology).topology
    bootstrap = args.bootstrap or topology.kafka.bootstrap_servers
    if not args.bootstrap and topology.kafka.embedded:
        raise DlqError(
            "--bootstrap: the topology's broker is embedded in `kp-pipeline run`; "
            "name the cluster that holds its dead letters"
        )
    check_access(topology.kafka, bootstrap, str(args.topology))
    t = topology.topics
    return DlqContext(topology.kafka, bootstrap, t.dead_letter, t.output, make_codec(topology))
