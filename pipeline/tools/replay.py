"""Replays: re-run a topology's models over a bounded range of recorded requests.

A replay is a batch job on the same engine as `kp-pipeline run`: the same stages,
batching, backpressure and at-least-once commits, with three differences:

* It reads ``[start, end)`` of each input partition, assigned directly, and stops by
  itself once all of it is delivered (`pipeline.engine.loop.Replica` with ``ranges``).
* It commits to its own consumer group (default ``<group_id>.replay.<output>``), so the
  live group's offsets are never touched, and an interrupted replay started again with
  the same command resumes where it stopped.
* Results go to the replay output topic (never to a request's live reply topic) and
  dead letters to ``<output>-dead-letters``.

Shared replays: ``--workers N`` runs N worker processes under one supervisor (each a
replica, `pipeline.workers`), and ``--shared`` makes this process one of several replicas
started separately (a Kubernetes Job with ``parallelism: N``, the chart's replay Job).
Either way the replicas split the range's partitions through the replay's group, each
partition starting at the group's last commit and stopping at the range's end
(`pipeline.engine.ranges`), so each request of the range is served once, an interrupted
shared replay resumes when started again, and the live group's offsets are never
touched. Every replica must replay the same range: ``--workers`` resolves it once and
hands it to its workers; separate ``--shared`` replicas each resolve it themselves, so
they need a fixed end (``--to`` or ``--to-offset``): an open end would be wherever each
replica happened to look.

The range comes from times (``--from``/``--to``, ISO 8601: `pipeline.tools.timespec`) or
offsets per partition.
Times become offsets here, before anything is consumed or written: the broker's
ListOffsets-by-time answer is checked against the records themselves (the record at the
answer is at or after the time, the one before it is not) and, where it is wrong (Tansu
answers 0 for any time), found by a binary search over record timestamps. Records are
assumed to be in timestamp order within a partition, which holds for broker-assigned
(LogAppendTime) timestamps and for producers that set the time when they send.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from pipeline.config.topology import KafkaSettings
from pipeline.kafka.clients import reader_config
from pipeline.kafka.preflight import check_access
from pipeline.tools.timespec import parse_time
from pipeline.workers.supervisor import worker_count
from schemas.errors import ConfigError
from schemas.messages import Partition

__all__ = [
    "Progress",
    "RangeError",
    "add_parser",
    "parse_offsets",
    "resolve_ranges",
    "run",
]

log = logging.getLogger(__name__)


class RangeError(ConfigError):
    """The replay range is unusable: refused before anything is read or written."""


def parse_offsets(text: str, flag: str) -> dict[int, int] | int:
    """``P:O,P:O`` per partition, or one offset for every partition."""
    try:
        if ":" not in text:
            return int(text)
        out = {}
        for part in text.split(","):
            p, o = part.split(":")
            out[int(p)] = int(o)
        return out
    except ValueError:
        raise RangeError(f"{flag}: {text!r} is not OFFSET or PARTITION:OFFSET,...") from None


class _Probe:
    """Reads single records by offset: timestamps, and the partition's real ends."""

    def __init__(self, settings: KafkaSettings, bootstrap: str) -> None:
        conf = reader_config(settings, bootstrap, group_id="kp-replay-probe", partition_eof=True)
        self.consumer = Consumer(conf)

    def close(self) -> None:
        self.consumer.close()

    def record_at(self, topic: str, partition: int, offset: int) -> tuple[int, int] | None:
        """(offset, timestamp ms) of the first record at or after ``offset``; None at the end."""
        self.consumer.assign([TopicPartition(topic, partition, offset)])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = self.consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error() is not None:  # end of the partition: nothing at or after offset
                return None
            return int(msg.offset() or 0), int(msg.timestamp()[1])
        raise RangeError(f"{topic}[{partition}]: no answer from the broker within 30 s")

    def ends(self, topic: str, partition: int) -> tuple[int, int] | None:
        """(first offset, high watermark) read from the records; None for an empty partition."""
        first = self.record_at(topic, partition, OFFSET_BEGINNING)
        if first is None:
            return None
        # The fetch that returned it carried the high watermark (ListOffsets may be wrong).
        _, high = self.consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
        return first[0], max(high, first[0] + 1)

    def first_at_or_after(self, topic: str, partition: int, when: int, low: int, high: int) -> int:
        """The first offset whose timestamp is ``when`` or later (``high`` if none is)."""
        answer = self.consumer.offsets_for_times(
            [TopicPartition(topic, partition, when)], timeout=10
        )[0].offset
        if low <= answer < high and self._is_first(topic, partition, answer, when, low):
            return answer
        lo, hi = low, high  # records before lo are earlier than `when`; from hi on, not
        while lo < hi:
            mid = (lo + hi) // 2
            found = self.record_at(topic, partition, mid)  # the first record at or after mid
            if found is None or found[1] >= when:
                hi = mid
            else:
                lo = found[0] + 1
        return lo

    def _is_first(self, topic: str, partition: int, offset: int, when: int, low: int) -> bool:
        at = self.record_at(topic, partition, offset)
        if at is None or at[1] < when:
            return False
        if offset == low:
            return True
        before = self.record_at(topic, partition, offset - 1)
        return before is None or before[0] >= offset or before[1] < when


def resolve_ranges(
    settings: KafkaSettings,
    bootstrap: str,
    topics: list[str],
    start_ms: int | None = None,
    end_ms: int | None = None,
    start_offsets: dict[int, int] | int | None = None,
    end_offsets: dict[int, int] | int | None = None,
) -> dict[Partition, tuple[int, int]]:
    """``[start, end)`` per partition with records in the range; raises `RangeError`."""
    if start_ms is not None and end_ms is not None and end_ms <= start_ms:
        raise RangeError("--to: it is not after --from")
    probe = _Probe(settings, bootstrap)
    try:
        meta = probe.consumer.list_topics(timeout=15)
        ranges: dict[Partition, tuple[int, int]] = {}
        for topic in topics:
            info = meta.topics.get(topic)
            if info is None or info.error is not None:
                raise RangeError(f"topic {topic!r} does not exist on {bootstrap}")
            for partition in sorted(info.partitions):
                ends = probe.ends(topic, partition)
                if ends is None:
                    continue
                low, high = ends
                start = _pick(start_offsets, partition, low)
                if start_ms is not None:
                    start = probe.first_at_or_after(topic, partition, start_ms, low, high)
                end = _pick(end_offsets, partition, high)
                if end_ms is not None:
                    end = probe.first_at_or_after(topic, partition, end_ms, low, high)
                start, end = max(start, low), min(end, high)
                if start_offsets is not None and end_offsets is not None and end < start:
                    raise RangeError(f"--to-offset: before --from-offset for partition {partition}")
                if end > start:
                    ranges[(topic, partition)] = (start, end)
    finally:
        probe.close()
    if not ranges:
        raise RangeError(f"no records of {', '.join(topics)} in the range: nothing to replay")
    return ranges


def _pick(value: dict[int, int] | int | None, partition: int, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, int):
        return value
    return value.get(partition, default)


@dataclass
class Progress:
    """A progress line on a terminal: done of total, rate and ETA, redrawn in place."""

    total: Callable[[], int]
    done: Callable[[], int]
    out: TextIO = sys.stderr
    interval_s: float = 0.5

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self._started = time.monotonic()

    def start(self) -> Progress:
        """Start redrawing."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Draw the last line and stop."""
        self._stop.set()
        self._thread.join()
        self._draw(final=True)

    def line(self, done: int, total: int, elapsed: float) -> str:
        """The text of one redraw."""
        share = min(1.0, done / total) if total else 1.0
        bar = "#" * int(share * 30)
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else float("inf")
        eta_text = f"{eta:,.0f} s" if eta != float("inf") else "?"
        return (
            f"[{bar:<30}] {share:4.0%} {done:,}/{total:,} requests · {rate:,.0f}/s · ETA {eta_text}"
        )

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._draw(final=False)

    def _draw(self, final: bool) -> None:
        text = self.line(self.done(), self.total(), time.monotonic() - self._started)
        if self.out.isatty():
            self.out.write("\r" + text + ("\n" if final else ""))
        elif final:
            self.out.write(text + "\n")
        self.out.flush()


def describe(ranges: Mapping[Partition, tuple[int, int]]) -> str:
    """``topic[p] start..end`` for each partition."""
    return ", ".join(f"{t}[{p}] {s}..{e}" for (t, p), (s, e) in sorted(ranges.items()))


def add_parser(subparsers: Any) -> None:
    """Register ``kp-pipeline replay``."""
    sub = subparsers
    rp = sub.add_parser("replay", help="re-run the models over a recorded range, then stop")
    rp.add_argument("topology", nargs="?", default="topology.yaml")
    rp.add_argument("--from", dest="from_time", help="ISO 8601 time, e.g. 2026-11-20T00:00Z")
    rp.add_argument("--to", dest="to_time", help="ISO 8601 time (exclusive)")
    rp.add_argument("--from-offset", help="OFFSET, or PARTITION:OFFSET,... (inclusive)")
    rp.add_argument("--to-offset", help="OFFSET, or PARTITION:OFFSET,... (exclusive)")
    rp.add_argument("--output", help="replay output topic (default: topics.replay_output)")
    rp.add_argument("--group", help="consumer group (default: <group_id>.replay.<output>)")
    rp.add_argument("--bootstrap", help="the cluster holding the recorded traffic")
    rp.add_argument("--metrics-port", type=int, default=0, help="default: any free port")
    rp.add_argument("--no-progress", action="store_true", help="no progress line")
    rp.add_argument(
        "--workers",
        type=worker_count,
        default=1,
        help="split the range between N worker processes (default 1: this process)",
    )
    rp.add_argument(
        "--shared",
        action="store_true",
        help="this process is one of several replicas of this replay (e.g. a Job with "
        "parallelism): share the range through the replay's group; needs --to or --to-offset",
    )
    rp.add_argument("--ranges", help=argparse.SUPPRESS)  # the range, resolved by a supervisor
    rp.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # set by the supervisor
    rp.set_defaults(func=run)


def ranges_to_json(ranges: Mapping[Partition, tuple[int, int]]) -> str:
    """The range as ``[[topic, partition, start, end], ...]`` for a worker's command line."""
    return json.dumps([[t, p, s, e] for (t, p), (s, e) in sorted(ranges.items())])


def ranges_from_json(text: str) -> dict[Partition, tuple[int, int]]:
    """The inverse of `ranges_to_json`."""
    try:
        return {(str(t), int(p)): (int(s), int(e)) for t, p, s, e in json.loads(text)}
    except (ValueError, TypeError) as e:
        raise RangeError(f"--ranges: not a list of [topic, partition, start, end]: {e}") from None


def run(args: argparse.Namespace) -> int:
    """Re-run the models over a bounded range of the input topics, then stop."""
    from pipeline.app import OpenTopology, open_topology, serve

    opened = open_topology(args.topology)
    t = opened.topology
    output, bootstrap = _destination(args, t)
    shared = args.shared or args.workers > 1 or args.worker is not None
    if args.shared and not (args.to_time or args.to_offset or args.ranges):
        raise RangeError(
            "--shared: give the range a fixed end (--to or --to-offset): each replica "
            "resolves the range itself, and an open end is wherever each one looked"
        )
    ranges = ranges_from_json(args.ranges) if args.ranges else _resolve(args, t, bootstrap)
    group = args.group or f"{t.kafka.group_id}.replay.{output}"
    dead_letters = f"{output}-dead-letters"
    kafka = t.kafka.model_copy(
        update={
            "group_id": group,
            "bootstrap_servers": bootstrap,
            "consumer": {**t.kafka.consumer, "enable.partition.eof": True},
        }
    )
    topics = t.topics.model_copy(update={"output": output, "dead_letter": dead_letters})
    job = OpenTopology(
        t.model_copy(update={"kafka": kafka, "topics": topics}), opened.source, opened.base_dir
    )
    if args.workers > 1:
        return _run_workers(args, job, bootstrap, output, group, ranges)
    if args.worker is None:
        _say(f"replaying {describe(ranges)} → {output} (group {group})")
    stop = threading.Event()
    replica = None
    if args.worker is not None:  # one of a --workers group: see pipeline.workers.launch
        from pipeline.workers.launch import as_worker, watch_parent

        job, replica = as_worker(job, args.worker, None)
        watch_parent(stop)
    served: list[Any] = []

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("%s: stopping the replay (it resumes when run again)", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def remaining() -> int:
        begun = served[0].range_begin if served else {}
        if shared:  # what this replica has taken on so far
            return sum(ranges[tp][1] - b for tp, b in begun.items())
        return sum(end - begun.get(tp, start) for tp, (start, end) in ranges.items())

    progress: Progress | None = None

    def on_ready(_: str, pipeline: Any) -> None:
        nonlocal progress
        served.append(pipeline)
        if not args.no_progress:
            s = pipeline.stats
            progress = Progress(remaining, lambda: s.results + s.dead_letters).start()

    started = time.monotonic()
    stats = serve(
        job,
        stop,
        bootstrap,
        on_ready=on_ready,
        metrics_port=args.metrics_port,
        ranges=ranges,
        replica_id=replica,
        share_ranges=shared,
    )
    if progress is not None:
        progress.stop()
    seconds = time.monotonic() - started
    done = stats.results + stats.dead_letters
    _say(
        f"replayed {done:,} requests: {stats.results:,} results → {output}, "
        f"{stats.dead_letters:,} dead letters → {dead_letters}, in {seconds:.1f} s "
        f"({done / seconds if seconds else 0:,.0f} requests/s)"
    )
    if stop.is_set() and done < remaining():
        _say(f"interrupted: run the same command again to resume (group {group})")
    return 0


def _destination(args: argparse.Namespace, t: Any) -> tuple[str, str]:
    """The replay's output topic and the cluster it reads; raises `RangeError`."""
    output = args.output or t.topics.replay_output
    if not output:
        raise RangeError("--output: name the replay's output topic (or topics.replay_output)")
    if output in t.topics.input or output == t.topics.output:
        raise RangeError(f"--output: {output!r} is a live topic of this topology")
    bootstrap = args.bootstrap or (None if t.kafka.embedded else t.kafka.bootstrap_servers)
    if bootstrap is None:
        raise RangeError(
            "--bootstrap: a replay reads recorded traffic from a cluster (or set KP_BOOTSTRAP)"
        )
    check_access(t.kafka, str(bootstrap), str(args.topology))
    return str(output), str(bootstrap)


def _resolve(args: argparse.Namespace, t: Any, bootstrap: str) -> dict[Partition, tuple[int, int]]:
    """The range the command line asks for (`resolve_ranges`)."""
    return resolve_ranges(
        t.kafka,
        bootstrap,
        t.topics.input,
        parse_time(args.from_time, "--from") if args.from_time else None,
        parse_time(args.to_time, "--to") if args.to_time else None,
        parse_offsets(args.from_offset, "--from-offset") if args.from_offset else None,
        parse_offsets(args.to_offset, "--to-offset") if args.to_offset else None,
    )


def _run_workers(
    args: argparse.Namespace,
    job: Any,
    bootstrap: str,
    output: str,
    group: str,
    ranges: Mapping[Partition, tuple[int, int]],
) -> int:
    """``replay --workers N``: the range resolved once here, N workers share it."""
    from pipeline.workers.launch import supervise
    from pipeline.workers.supervisor import RestartPolicy

    _say(f"replaying {describe(ranges)} → {output} (group {group}) with {args.workers} workers")
    command = ["replay", str(args.topology), "--bootstrap", bootstrap, "--output", output]
    command += ["--group", group, "--ranges", ranges_to_json(ranges), "--no-progress"]
    metrics = job.topology.metrics.model_copy(update={"port": args.metrics_port})
    started = time.monotonic()
    code = supervise(
        args.workers,
        command,
        metrics,
        policy=RestartPolicy(clean_exit_is_done=True),
        drain_timeout_s=job.topology.flow.drain_timeout_s,
        verbose=args.verbose,
        where="--metrics-port",
    )
    total = sum(end - start for start, end in ranges.values())
    _say(
        f"{args.workers} workers {'finished' if code == 0 else 'stopped'} in "
        f"{time.monotonic() - started:.1f} s ({total:,} requests in the range; each "
        "worker's share is on its own line above)"
    )
    return code


def _say(line: str) -> None:
    print(line, flush=True)
