"""``kp-pipeline dlq``: find dead letters, show them, send them back to be served again.

A dead letter (`pipeline.serving.outcomes.OutcomeEncoder.dead_letter`) keeps the request's
bytes, its key and the position it was read from, so a request that failed for a reason
that has since been fixed (a model not served yet, a bad deploy) can be *redriven*: its
original bytes are produced again, with its key, to the topic it came from.

The command is one ``dlq`` with two subcommands, in rooms that import only downwards:

* `pipeline.tools.dlq.reading`: reading the dead-letter topic and choosing dead letters,
  what both subcommands share;
* `pipeline.tools.dlq.inspect`: ``dlq inspect``, which only shows what it read;
* `pipeline.tools.dlq.redrive`: ``dlq redrive``, the one part that writes.

This module registers both subcommands with their shared selection flags.
"""

from __future__ import annotations

import argparse

from pipeline.tools.dlq.inspect import run_inspect
from pipeline.tools.dlq.redrive import run_redrive

__all__ = ["add_parser"]


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``dlq inspect`` and ``dlq redrive``."""
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
