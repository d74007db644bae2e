"""``kp-pipeline top``: a live terminal view of one running replica, read from its /metrics.

A ``run --workers N`` group's port is one replica too: its series carry a ``worker``
label, and `Snapshot` combines the workers (see there).

A replica exports counters and histograms, which mean something only as rates over an
interval; Prometheus and Grafana compute those in production, but on a laptop, in a pod
shell or during a load test there is often neither. This scrapes the endpoint every
interval and prints what a dashboard would: rates, lag, mean batch size, p50/p99 from
bucket deltas with PromQL's own interpolation. Plain text and ANSI clear-screen, no curses.
The pure parts (`parse`, `compute`, `render`) are tested without a server.

Exits with `schemas.errors.ExitCode`: 0 after one frame (``--once``) or Ctrl-C; 2 for a
bad target, or an endpoint that cannot be scraped at the start (with ``--once``, at all).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from urllib.parse import urlsplit, urlunsplit

from prometheus_client.parser import text_string_to_metric_families

from schemas.errors import ExitCode

__all__ = [
    "Frame",
    "ModelRow",
    "PartitionRow",
    "Snapshot",
    "add_parser",
    "compute",
    "histogram_quantile",
    "parse",
    "render",
    "run",
]

DEFAULT_URL = "http://127.0.0.1:9464/metrics"
SCRAPE_TIMEOUT_S = 3.0
CONSUMED = "kp_consumed_records_total"
CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen
BOLD, REVERSE, RED, YELLOW, RESET = "\x1b[1m", "\x1b[7m", "\x1b[31m", "\x1b[33m", "\x1b[0m"

Labels = tuple[tuple[str, str], ...]


def _key(**labels: str) -> Labels:
    return tuple(sorted(labels.items()))


WORKER = "worker"
"""The label a ``--workers N`` group's endpoint puts on every series (`pipeline.workers.group`)."""


@dataclass(frozen=True)
class Snapshot:
    """One scrape: sample name → labels (less ``worker``) → worker → value.

    A single process has one worker, ``""``. A ``--workers N`` group's endpoint exports
    each worker's series under its own ``worker`` label; the views below take that label
    off and combine the workers as a dashboard would: `series` and `value` sum them, and
    `compute` takes rates per worker before it adds them (a restarted worker's counters
    start again from zero on their own series, which must not read as a reset of all).
    """

    samples: Mapping[str, Mapping[Labels, Mapping[str, float]]]

    def each(self, name: str, **labels: str) -> Mapping[str, float]:
        """One sample's value in each worker that exports it (empty when none does)."""
        return self.samples.get(name, {}).get(_key(**labels), {})

    def series(self, name: str) -> Mapping[Labels, float]:
        """Every labelled value of one sample name, summed over workers (empty when absent)."""
        return {k: sum(w.values()) for k, w in self.samples.get(name, {}).items()}

    def value(self, name: str, **labels: str) -> float | None:
        """One sample's value summed over workers, or None when no worker exports it."""
        values = self.each(name, **labels)
        return sum(values.values()) if values else None

    def worst(self, name: str, **labels: str) -> float | None:
        """The highest of the workers' values (a partition's lag: its owner's), or None."""
        return max(self.each(name, **labels).values(), default=None)


@dataclass(frozen=True)
class PartitionRow:
    """One input partition. ``paused`` is None when the metrics cannot tell."""

    topic: str
    partition: str
    lag: float | None
    lag_seconds: float | None
    rate: float | None
    paused: bool | None


@dataclass(frozen=True)
class ModelRow:
    """One model, over the interval; None where the interval had no data."""

    model: str
    results: Mapping[str, float | None]  # status → results/s
    dead_letters: Mapping[str, float | None]  # reason → dead letters/s
    batch_mean: float | None
    batch_limit: float | None
    batch_delay: float | None
    latency: tuple[float | None, float | None]  # p50, p99 end to end, seconds


@dataclass(frozen=True)
class Frame:
    """What one screen shows: the header figures and the two tables."""

    dt: float
    in_flight: float | None
    in_flight_bytes: float | None
    paused: float | None
    assigned: float | None
    ready: float | None
    rss: float | None
    partitions: tuple[PartitionRow, ...]
    models: tuple[ModelRow, ...]
    source: str = ""
    workers: tuple[int, int] | None = None  # (answering, configured) for a --workers group


def parse(text: str) -> Snapshot:
    """Parse Prometheus text exposition; ValueError if it is not that."""
    samples: dict[str, dict[Labels, dict[str, float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = dict(s.labels)
            worker = labels.pop(WORKER, "")
            samples.setdefault(s.name, {}).setdefault(_key(**labels), {})[worker] = float(s.value)
    return Snapshot(samples)


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float:
    """The q-quantile of (upper bound, cumulative count) buckets, as PromQL computes it.

    Linear interpolation inside the bucket holding rank q·total, the lowest bucket
    starting at 0; a rank in the +Inf bucket gives the highest finite bound; NaN when
    there are no observations or no +Inf bucket.
    """
    if math.isnan(q):
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    ordered = sorted(buckets)
    if len(ordered) < 2 or not math.isinf(ordered[-1][0]):
        return math.nan
    counts, highest = [], 0.0
    for _, c in ordered:  # Prometheus' ensureMonotonic: scrapes are not atomic
        highest = max(highest, c)
        counts.append(highest)
    total = counts[-1]
    if total == 0:
        return math.nan
    rank = q * total
    b = next(i for i, c in enumerate(counts) if c >= rank)
    if b == len(ordered) - 1:
        return ordered[-2][0]
    if b == 0 and ordered[0][0] <= 0:
        return ordered[0][0]
    start, end, count = 0.0, ordered[b][0], counts[b]
    if b > 0:
        start, count, rank = ordered[b - 1][0], count - counts[b - 1], rank - counts[b - 1]
    return start + (end - start) * (rank / count)


def _delta(prev: float, cur: float) -> float:
    return cur - prev if cur >= prev else cur  # a counter that went down was reset


def compute(prev: Snapshot, cur: Snapshot, dt: float) -> Frame:
    """The view between two scrapes ``dt`` seconds apart."""

    def rate(name: str, labels: Labels) -> float | None:
        return _rate(prev, cur, dt, name, labels)

    paused, assigned = cur.value("kp_paused_partitions"), cur.value("kp_assigned_partitions")
    # Which partitions are paused is not exported, only how many: known when none or all.
    all_paused = None if paused is None or 0 < paused < (assigned or 0) else paused > 0

    parts = set()
    for name in ("kp_consumer_lag_messages", "kp_consumer_lag_seconds", CONSUMED):
        parts |= {(d["topic"], d["partition"]) for d in map(dict, cur.series(name))}
    partitions = []
    for t, p in sorted(parts, key=lambda tp: (tp[0], int(tp[1]) if tp[1].isdigit() else -1)):
        lag = cur.worst("kp_consumer_lag_messages", topic=t, partition=p)
        lag_s = cur.worst("kp_consumer_lag_seconds", topic=t, partition=p)
        consumed = rate(CONSUMED, _key(topic=t, partition=p))
        partitions.append(PartitionRow(t, p, lag, lag_s, consumed, all_paused))

    def by(name: str, label: str, model: str) -> dict[str, float | None]:
        series = ((dict(k), k) for k in cur.series(name))
        return {d[label]: rate(name, k) for d, k in series if d.get("model") == model}

    models = []
    names = {dict(k)["model"] for k in cur.series("kp_results_total")}
    for name in ("kp_batch_max_size_requests", "kp_dead_letters_total"):
        names |= {dict(k)["model"] for k in cur.series(name)}
    for m in sorted(names):
        hist = "kp_batch_size_requests"
        total, count = rate(f"{hist}_sum", _key(model=m)), rate(f"{hist}_count", _key(model=m))
        models.append(
            ModelRow(
                m,
                results=by("kp_results_total", "status", m),
                dead_letters=by("kp_dead_letters_total", "reason", m),
                batch_mean=total / count if total is not None and count else None,
                batch_limit=cur.worst("kp_batch_max_size_requests", model=m),
                batch_delay=cur.worst("kp_batch_max_delay_seconds", model=m),
                latency=_latency_quantiles(prev, cur, m),
            )
        )
    return Frame(
        dt=dt,
        in_flight=cur.value("kp_in_flight_requests"),
        in_flight_bytes=cur.value("kp_in_flight_bytes"),
        paused=paused,
        assigned=assigned,
        ready=_ready(cur),
        rss=cur.value("process_resident_memory_bytes"),
        partitions=tuple(partitions),
        models=tuple(models),
        workers=_workers(cur),
    )


def _rate(prev: Snapshot, cur: Snapshot, dt: float, name: str, labels: Labels) -> float | None:
    """A counter's rate over the interval: each worker's, added (None without two scrapes)."""
    before = prev.samples.get(name, {}).get(labels, {})
    deltas = [
        _delta(before[w], c)
        for w, c in cur.samples.get(name, {}).get(labels, {}).items()
        if w in before
    ]
    return None if not deltas or dt <= 0 else sum(deltas) / dt


def _workers(cur: Snapshot) -> tuple[int, int] | None:
    """A worker group's (workers answering, workers configured); None for one process."""
    configured = cur.value("kp_workers")
    if configured is None:
        return None
    return int(cur.value("kp_worker_up") or 0), int(configured)


def _ready(cur: Snapshot) -> float | None:
    """1 when every worker is ready, as the group's /readyz: a worker that did not answer is not."""
    each = cur.each("kp_ready")
    workers = _workers(cur)
    if workers is not None and workers[0] < workers[1]:
        return 0.0
    return min(each.values(), default=None)


def _latency_quantiles(
    prev: Snapshot, cur: Snapshot, model: str
) -> tuple[float | None, float | None]:
    """p50 and p99 of kp_end_to_end_latency_seconds over the interval (bucket deltas)."""
    name = "kp_end_to_end_latency_seconds_bucket"
    mine = {k: w for k, w in cur.samples.get(name, {}).items() if ("model", model) in k}
    before = prev.samples.get(name, {})
    counts: dict[float, float] = {}
    for worker in {w for per_worker in mine.values() for w in per_worker}:
        # One worker's buckets over the interval: all of them since its start if it restarted.
        now = {float(dict(k)["le"]): w[worker] for k, w in mine.items() if worker in w}
        then = {
            float(dict(k)["le"]): before[k][worker] for k in mine if worker in before.get(k, {})
        }
        if now.keys() != then.keys():
            continue  # not in both scrapes: it adds nothing to this interval
        reset = any(c < then[le] for le, c in now.items())
        for le, c in now.items():
            counts[le] = counts.get(le, 0.0) + (c if reset else c - then[le])
    if not counts:
        return None, None
    buckets = sorted(counts.items())
    p50, p99 = (histogram_quantile(q, buckets) for q in (0.5, 0.99))
    return (None if math.isnan(p50) else p50), (None if math.isnan(p99) else p99)


def _si(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= max(div, 1e5):  # up to 99999.9 in full, then 123.4k
            return f"{x / div:.1f}{suffix}"
    return f"{x:.{digits}f}"


def _bytes(x: float | None) -> str:
    if x is None:
        return "-"
    for div, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if x >= div:
            return f"{x / div:.1f} {unit}"
    return f"{x:.0f} B"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else _si(seconds * 1e3)


def _row(cells: Sequence[str], widths: Sequence[int]) -> str:
    first, *rest = cells
    return f"{first:<{widths[0]}}" + "".join(
        f" {c:>{w}}" for c, w in zip(rest, widths[1:], strict=True)
    )


def render(frame: Frame, width: int = 100, *, color: bool = False) -> str:
    """The frame as fixed-width text, every line cut to ``width`` columns."""
    out: list[tuple[str, str]] = []  # (text, ANSI style of the whole line)
    ready = {None: "ready ?", 1.0: "READY"}.get(frame.ready, "NOT READY")
    group = "" if frame.workers is None else "  workers {}/{} up".format(*frame.workers)
    out.append((f"kp-pipeline top  {frame.source}  Δ{frame.dt:.1f}s  {ready}{group}", BOLD))
    paused = f"{_si(frame.paused, 0)}/{_si(frame.assigned, 0)}"
    in_flight = f"{_si(frame.in_flight, 0)} req, {_bytes(frame.in_flight_bytes)}"
    out.append((f"in flight {in_flight}   paused/assigned {paused}   rss {_bytes(frame.rss)}", ""))
    widths = [max([5, *(len(r.topic) for r in frame.partitions)]), 4, 8, 7, 8, 6]
    out += [("", ""), (_row(["TOPIC", "PART", "LAG", "LAG S", "REC/S", "PAUSED"], widths), REVERSE)]
    for r in frame.partitions:
        lag_s = "-" if r.lag_seconds is None else f"{r.lag_seconds:.2f}"
        mark = {None: "?", True: "yes", False: "no"}[r.paused]
        cells = [r.topic, r.partition, _si(r.lag, 0), lag_s, _si(r.rate), mark]
        out.append((_row(cells, widths), YELLOW if r.paused else ""))
    if not frame.partitions:
        out.append(("(no partitions)", ""))
    heads = ["MODEL", "OK/S", "ERR/S", "EXP/S", "DL/S", "BATCH", "LIMIT", "DELAY MS", "P50 MS"]
    widths = [max([6, *(len(m.model) for m in frame.models)]), 7, 6, 6, 6, 6, 5, 8, 7, 7]
    out += [("", ""), (_row([*heads, "P99 MS"], widths), REVERSE)]
    for m in frame.models:
        dl = sum(v or 0.0 for v in m.dead_letters.values()) if m.dead_letters else None
        cells = [m.model or "(none)", *(_si(m.results.get(s)) for s in ("OK", "ERROR", "EXPIRED"))]
        cells += [_si(dl), _si(m.batch_mean), _si(m.batch_limit, 0), _ms(m.batch_delay)]
        bad = any((m.results.get("ERROR"), m.results.get("EXPIRED"), dl))
        out.append((_row([*cells, *map(_ms, m.latency)], widths), RED if bad else ""))
        reasons = ", ".join(f"{k} {_si(v)}/s" for k, v in sorted(m.dead_letters.items()) if v)
        if reasons:
            out.append((f"  dead letters: {reasons}", RED))
    if not frame.models:
        out.append(("(no models)", ""))
    cut = [(text[:width], style if color and text else "") for text, style in out]
    return "\n".join(f"{style}{text}{RESET}" if style else text for text, style in cut)


def target_url(target: str) -> str:
    """``HOST:PORT``, ``HOST`` or a URL → the metrics URL (port 9464, path /metrics by default)."""
    bare = "://" not in target
    parts = urlsplit(f"http://{target}" if bare else target)
    host = parts.hostname or "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    port = parts.port or (9464 if bare else None)
    netloc = f"{host}:{port}" if port else host
    path = parts.path if parts.path not in ("", "/") else "/metrics"
    return urlunsplit((parts.scheme, netloc, path, parts.query, ""))


class ScrapeError(Exception):
    """The endpoint could not be read, or is not a kp-pipeline metrics page."""


def scrape(url: str, timeout: float = SCRAPE_TIMEOUT_S) -> Snapshot:
    """GET and parse one metrics page; ScrapeError with a one-line reason otherwise."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as e:
        raise ScrapeError(f"cannot reach {url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError) as e:
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        text = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
        raise ScrapeError(f"cannot reach {url}: {text}") from e
    try:
        snapshot = parse(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ScrapeError(f"{url} is not Prometheus text exposition ({e})") from e
    if not any(name.startswith("kp_") for name in snapshot.samples):
        raise ScrapeError(f"{url} has no kp_ metrics: is it a kp-pipeline replica?")
    return snapshot


def run(args: argparse.Namespace) -> int:
    """Scrape, compute and print frames until Ctrl-C (or one frame with --once)."""
    try:
        url = target_url(args.target or args.url)
    except ValueError as e:
        print(f"kp-pipeline top: bad target {args.target or args.url!r}: {e}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    color = not args.no_color and sys.stdout.isatty() and "NO_COLOR" not in os.environ
    try:
        prev, t0 = scrape(url), time.monotonic()
        while True:
            time.sleep(args.interval)
            try:
                cur, t1 = scrape(url), time.monotonic()
            except ScrapeError as e:
                if args.once:
                    raise
                sys.stdout.write(f"{CLEAR}kp-pipeline top: {e} (retrying)\n")
                sys.stdout.flush()
                continue
            width = shutil.get_terminal_size().columns
            text = render(replace(compute(prev, cur, t1 - t0), source=url), width, color=color)
            if args.once:
                print(text)
                return ExitCode.OK
            sys.stdout.write(f"{CLEAR}{text}\n")
            sys.stdout.flush()
            prev, t0 = cur, t1
    except ScrapeError as e:
        print(f"kp-pipeline top: {e}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    except KeyboardInterrupt:
        return ExitCode.OK


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
    return value


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``top`` on the command line's subcommands."""
    p = subparsers.add_parser("top", help="live view of a running pipeline, from its /metrics")
    p.add_argument("target", nargs="?", help=f"URL or HOST:PORT (default {DEFAULT_URL})")
    p.add_argument("--url", default=DEFAULT_URL, help="same as the positional target")
    p.add_argument("--interval", type=_seconds, default=2.0, help="seconds between scrapes")
    p.add_argument("--once", action="store_true", help="print one frame (two scrapes) and exit")
    p.add_argument("--no-color", action="store_true", help="plain text, no ANSI colors")
    p.set_defaults(func=run)
