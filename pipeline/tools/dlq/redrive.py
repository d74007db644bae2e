"""``kp-pipeline dlq redrive``: send chosen dead letters' requests back to be served again.

A request that failed for a reason since fixed (a model not served yet, a bad deploy) is
in its dead letter, bytes, key and source position included; redriving produces it again.
That is the one part of ``kp-pipeline dlq`` that writes, so it is kept apart from the
reading and choosing in `pipeline.tools.dlq.reading` and the showing in
`pipeline.tools.dlq.inspect`, which it builds on.

* A request goes to its source topic *and partition*, so per-key order stays what the
  original producer's partitioner chose (librdkafka's and Java's differ); ``--to`` sends
  it to another topic, placed there by its key.
* Headers: ``kp.redriven-from: <dead-letter topic>/<partition>/<offset>`` and
  ``kp.redrive-count: N``. Dead letters do not keep the request's headers, so N is found
  by following the dead letter back to the record that failed: a request that failed
  again after its second redrive sits in the input topic with ``kp.redrive-count: 2`` and
  goes out with 3. A dead letter's own ``kp.redrive-count`` header, were a producer to set
  one, counts too. A source record that retention removed counts as 0, so N is then a
  lower bound. ``--max-redrives`` (default 3) refuses a request that keeps failing, so a
  poison request cannot go round forever.
* Refused, each with a line and counted: dead letters without request bytes (the
  pipeline drops them from a dead letter too large for its topic), requests redriven
  ``--max-redrives`` times, and ones whose source topic no longer exists.
* The topic is read twice: once to plan, keeping no payloads (a redrive of many image
  requests does not hold them all in memory), and once to send, reading each partition
  only from its first to its last chosen offset.
* A redrive is not deduplicated: the same command run twice sends the requests twice.
  The printed positions, and ``--offsets``, are how to send an exact set once.

Exit codes are `schemas.errors.ExitCode`: 0 done (refused dead letters are reported, not
failures); 1 a delivery failed (the message names the ``--offsets`` to send the rest) or
the prompt was declined; 2 a bad command line or topology, a missing topic, or no
terminal to confirm on: nothing was sent.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Producer

from pipeline.config.topology import KafkaSettings
from pipeline.kafka.clients import producer_config
from pipeline.tools.dlq.inspect import Table, inspect_row, terminal_width
from pipeline.tools.dlq.reading import (
    READ_TIMEOUT_S,
    DlqError,
    Letter,
    Selection,
    counts,
    letters_n,
    open_consumer,
    open_context,
    partitions_of,
    read_letters,
    read_partition,
)
from schemas.codec import AvroCodec
from schemas.errors import BrokerError, ExitCode
from schemas.messages import Partition

__all__ = [
    "Plan",
    "Planned",
    "open_producer",
    "plan_redrive",
    "plan_row",
    "redrive_counts",
    "run_redrive",
    "send_plan",
    "summary",
]

REDRIVEN_FROM, REDRIVE_COUNT = "kp.redriven-from", "kp.redrive-count"
SEEK_GAP = 1000  # source records further apart than this are sought, not read through
SHOW_LINES = 20  # plan rows and refusal lines shown before "... and N more"
PLAN_COLUMNS = ("dlq", "failed at (UTC)", "reason", "model", "id", "to", "redrive")


# -- planning -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Planned:
    """One dead letter to send: where it is, where it goes, and its redrive count."""

    letter: Letter
    topic: str
    partition: int | None  # None: the producer places it by key
    count: int


@dataclass
class Plan:
    """What a redrive sends, and what it refuses with why (``kind`` for the summary)."""

    send: list[Planned] = field(default_factory=list)
    refused: list[tuple[Letter, str, str]] = field(default_factory=list)

    def refuse(self, letter: Letter, kind: str, why: str) -> None:
        """Refuse one dead letter."""
        self.refused.append((letter, kind, why))


def _previous(headers: Mapping[str, bytes]) -> int:
    try:
        return max(int(headers.get(REDRIVE_COUNT, b"0")), 0)
    except ValueError:
        return 0


def redrive_counts(
    consumer: Any, sources: Iterable[tuple[str, int, int]], timeout_s: float = READ_TIMEOUT_S
) -> dict[tuple[str, int, int], int]:
    """``kp.redrive-count`` of each source record still in its topic (0 without the header).

    Offsets close together are read through in one go; far ones are sought.
    """
    wanted: dict[Partition, list[int]] = defaultdict(list)
    for topic, partition, offset in set(sources):
        wanted[(topic, partition)].append(offset)
    found: dict[tuple[str, int, int], int] = {}
    for (topic, partition), offsets in sorted(wanted.items()):
        offsets.sort()
        i, n = 0, len(offsets)
        while i < n:  # one assign per run of near offsets
            for msg in read_partition(consumer, topic, partition, offsets[i], timeout_s):
                offset = int(msg.offset())
                while i < n and offsets[i] < offset:
                    i += 1  # removed by retention or compaction
                if i < n and offsets[i] == offset:
                    headers = {k: v or b"" for k, v in msg.headers() or []}
                    found[(topic, partition, offset)] = _previous(headers)
                    i += 1
                if i == n or offsets[i] - offset > SEEK_GAP:
                    break
            else:
                i = n  # the partition ended: the rest are gone
    return found


def plan_redrive(
    consumer: Any,
    letters: Iterable[Letter],
    to: str | None,
    max_redrives: int,
) -> Plan:
    """Where each chosen dead letter goes and with which count, or why it is refused."""
    plan, targets, keep = Plan(), {}, []
    for letter in letters:
        d = letter.dead
        assert d is not None
        target = to or d.topic
        if target not in targets:
            targets[target] = partitions_of(consumer, target)
        if not letter.size:
            plan.refuse(
                letter,
                "without request bytes",
                "no request bytes: the pipeline dropped them because the dead letter was "
                "too large for its topic",
            )
        elif targets[target] is None:
            plan.refuse(letter, "source topic gone", f"its topic {target!r} no longer exists")
        else:
            keep.append((letter, target))
    sources = [(d.topic, d.partition, d.offset) for d in (x.dead for x, _ in keep) if d]
    before = redrive_counts(consumer, sources) if sources else {}
    for letter, target in keep:
        d = letter.dead
        assert d is not None
        done = max(before.get((d.topic, d.partition, d.offset), 0), _previous(letter.headers))
        if done >= max_redrives:
            plan.refuse(
                letter,
                "redriven too often",
                f"already redriven {done} time{'' if done == 1 else 's'} "
                f"(--max-redrives {max_redrives})",
            )
            continue
        same = to is None and d.partition in (targets[target] or ())
        plan.send.append(Planned(letter, target, d.partition if same else None, done + 1))
    return plan


# -- sending ------------------------------------------------------------------------------


def open_producer(settings: KafkaSettings, bootstrap: str) -> Any:
    """The topology's idempotent producer: a retried send is not written twice."""
    return Producer(producer_config(settings, bootstrap))


def send_plan(
    consumer: Any,
    producer: Any,
    dlq: str,
    codec: AvroCodec,
    plan: Plan,
    flush_timeout_s: float = 60.0,
) -> list[Planned]:
    """Read the planned dead letters again, with their bytes, and produce them.

    Returns the delivered ones; raises `BrokerError` naming those that were not (the
    others stay delivered: a retry with ``--offsets`` sends exactly the failed ones).
    """
    wanted = {(x.letter.partition, x.letter.offset): x for x in plan.send}
    bounds: dict[int, tuple[int, int]] = {}
    for p, o in wanted:
        first, last = bounds.get(p, (o, o))
        bounds[p] = (min(first, o), max(last, o))
    delivered: list[Planned] = []
    failed: list[tuple[Planned, str]] = []

    def on_delivery(item: Planned, err: Any, _msg: Any) -> None:
        if err is None:
            delivered.append(item)
        else:
            failed.append((item, err.str()))

    for letter in read_letters(consumer, dlq, codec, bounds):
        item = wanted.pop((letter.partition, letter.offset), None)
        if item is None:
            continue
        if letter.dead is None or not letter.dead.payload:
            failed.append((item, "the dead letter changed since it was planned"))
            continue
        headers = [
            (REDRIVEN_FROM, f"{dlq}/{letter.partition}/{letter.offset}".encode()),
            (REDRIVE_COUNT, str(item.count).encode()),
        ]
        partition = -1 if item.partition is None else item.partition  # -1: by key
        while True:
            try:
                producer.produce(
                    item.topic,
                    letter.dead.payload,
                    letter.key,
                    partition=partition,
                    headers=headers,
                    on_delivery=functools.partial(on_delivery, item),
                )
                break
            except BufferError:  # the producer's queue is full: let it drain
                producer.poll(0.05)
        producer.poll(0)
    failed.extend((item, "it was removed from the topic (retention?)") for item in wanted.values())
    left = producer.flush(flush_timeout_s)
    if left or failed:
        raise BrokerError(_failure(dlq, plan, delivered, failed, left))
    return delivered


def _failure(
    dlq: str, plan: Plan, delivered: list[Planned], failed: list[tuple[Planned, str]], left: int
) -> str:
    done = {(x.letter.partition, x.letter.offset) for x in delivered}
    undone = sorted(
        (x.letter.partition, x.letter.offset)
        for x in plan.send
        if (x.letter.partition, x.letter.offset) not in done
    )
    detail = "; ".join(
        f"{dlq} {x.letter.partition}:{x.letter.offset} → {x.topic}: {why}" for x, why in failed[:3]
    )
    if left:
        detail = f"{left} unacknowledged after the flush timeout" + (
            f"; {detail}" if detail else ""
        )
    retry = ",".join(f"{p}:{o}" for p, o in undone)
    return (
        f"{len(undone)} of {len(plan.send)} redriven requests were not delivered ({detail}); "
        f"the other {len(delivered)} were. Send the rest with: --offsets {retry}"
    )


# -- showing ------------------------------------------------------------------------------


def plan_row(item: Planned) -> list[str]:
    """A planned dead letter as a row of ``PLAN_COLUMNS``."""
    row = inspect_row(item.letter)[:5]
    where = f"{item.topic}/{'by key' if item.partition is None else item.partition}"
    return [*row, where, str(item.count)]


def summary(sent: Sequence[Planned], plan: Plan, verb: str = "redrove") -> list[str]:
    """``redrove N dead letters to T (reasons: ...)``, and what was refused."""
    by_topic: dict[str, Counter[str]] = defaultdict(Counter)
    for item in sent:
        assert item.letter.dead is not None
        by_topic[item.topic][item.letter.dead.reason] += 1
    if len(by_topic) == 1:
        [(topic, reasons)] = by_topic.items()
        lines = [f"{verb} {letters_n(len(sent))} to {topic} (reasons: {counts(reasons)})"]
    else:
        parts = [f"{sum(c.values())} to {t} (reasons: {counts(c)})" for t, c in by_topic.items()]
        lines = [f"{verb} {letters_n(len(sent))}" + (f": {', '.join(parts)}" if parts else "")]
    if plan.refused:
        kinds = Counter(kind for _, kind, _ in plan.refused)
        lines.append(f"refused {len(plan.refused)}: {counts(kinds)}")
    return lines


# -- the command --------------------------------------------------------------------------


def run_redrive(args: argparse.Namespace) -> int:
    """Send the chosen dead letters' requests back to their topics (see the module doc)."""
    ctx, selection = open_context(args), Selection.from_args(args)
    if args.all and not selection.empty():
        raise DlqError("--all: not together with a selection (--all sends every dead letter)")
    if selection.empty() and not args.all:
        raise DlqError(
            "redrive: choose dead letters (--reason, --model, --id, --since, --until, "
            "--offsets), or pass --all to send every one"
        )
    if args.to in (ctx.dlq, ctx.output):
        raise DlqError(f"--to: {args.to!r} is this topology's dead-letter or output topic")
    if not (args.dry_run or args.yes or sys.stdin.isatty()):
        raise DlqError(
            "redrive: pass --yes to send without a terminal to confirm on "
            "(--dry-run shows what would go)"
        )
    consumer = open_consumer(ctx.settings, ctx.bootstrap)
    try:
        if args.to and partitions_of(consumer, args.to) is None:
            raise DlqError(f"--to: topic {args.to!r} does not exist")
        chosen = []
        for letter in read_letters(consumer, ctx.dlq, ctx.codec, selection.bounds(), False):
            if selection.matches(letter):
                chosen.append(letter)
                if args.limit is not None and len(chosen) >= args.limit:
                    break
        plan = plan_redrive(consumer, chosen, args.to, args.max_redrives)
        _report_refused(plan)
        if not plan.send:
            print("nothing to redrive" if chosen else "no dead letters match the selection")
            for line in summary([], plan)[1:]:  # what was refused, if anything
                print(line)
            return ExitCode.OK
        if args.dry_run or not args.yes:
            _show_plan(plan, everything=args.dry_run)
        if args.dry_run:
            print("\n".join(summary(plan.send, plan, "would redrive")))
            print("dry run: nothing sent")
            return ExitCode.OK
        if not args.yes and not _confirm(f"redrive {letters_n(len(plan.send))}? [y/N] "):
            print("nothing sent")
            return ExitCode.FAILED  # declined
        producer = open_producer(ctx.settings, ctx.bootstrap)
        sent = send_plan(consumer, producer, ctx.dlq, ctx.codec, plan)
    finally:
        consumer.close()
    print("\n".join(summary(sent, plan)))
    return ExitCode.OK


def _report_refused(plan: Plan) -> None:
    for letter, _, why in plan.refused[:SHOW_LINES]:
        rid = letter.dead.id if letter.dead and letter.dead.id else "no id"
        print(f"refused {letter.partition}:{letter.offset} ({rid}): {why}")
    if len(plan.refused) > SHOW_LINES:
        print(f"... and {len(plan.refused) - SHOW_LINES} more refused")


def _show_plan(plan: Plan, everything: bool) -> None:
    table = Table(PLAN_COLUMNS, sys.stdout, terminal_width())
    shown = plan.send if everything else plan.send[:SHOW_LINES]
    for item in shown:
        table.add(plan_row(item))
    table.close()
    if len(shown) < len(plan.send):
        print(f"... and {len(plan.send) - len(shown)} more")


def _confirm(question: str) -> bool:
    print(question, end="", flush=True)
    try:
        answer = sys.stdin.readline().strip().lower()
    except KeyboardInterrupt:  # Ctrl-C at the prompt is a no
        print()
        return False
    return answer in ("y", "yes")
