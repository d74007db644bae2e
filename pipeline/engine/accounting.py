"""Counting what one replica did, cheaply on the hot path, and moving it into metrics.

The loop adds to plain dicts per batch (`consumed_many` per consumed run of a partition,
`acknowledged` per delivered batch); `flush` moves the sums into the Prometheus metrics
once per loop turn, so a record costs at most a dict increment, never a labelled-metric
lookup, and latencies are observed per model per turn. Gauges that can be read at scrape
time (in flight, assigned, paused) are functions of the tracker, never stale and free
until scraped.
`RunStats` is the run's summary for the closing line, the demo and the benchmarks.
"""

from __future__ import annotations

import operator
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.config.topology import TopicSettings
from pipeline.engine.offsets import OffsetTracker
from pipeline.engine.rows import kinds as count_kinds
from pipeline.observability.metrics import Metrics
from pipeline.serving.graph import ServedModel
from pipeline.serving.outcomes import Outcome
from schemas.messages import Partition

__all__ = ["REASONS", "Accounting", "RunStats"]

# What an acknowledged outcome counts as, and its record's timestamp, read in C.
_STAMP = operator.attrgetter("envelope.timestamp_ms")

REASONS = (
    "bad_request",
    "undecodable",
    "unknown_model",
    "bad_tensor",
    "preprocess_failed",
    "inference_failed",
    "undeliverable",
)
"""Dead-letter reasons the engine itself gives; their series start at zero."""


@dataclass
class RunStats:
    """Counters of one run, for the closing summary."""

    consumed: int = 0
    pauses: int = 0
    results: int = 0
    dead_letters: int = 0
    committed: dict[Partition, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    first_consumed: float | None = None
    last_delivered: float | None = None


class Accounting:
    """The run's `RunStats` and the per-record counts on their way to the metrics."""

    def __init__(self, metrics: Metrics, served: Iterable[str]) -> None:
        self.metrics = metrics
        self.stats = RunStats()
        self._served = frozenset(served)
        self._consumed_tp: defaultdict[Partition, int] = defaultdict(int)
        self._consumed_bytes: defaultdict[str, int] = defaultdict(int)
        self._acked: defaultdict[tuple[str, str, str | None, str], int] = defaultdict(int)
        self._latency: defaultdict[str, list[np.ndarray[Any, Any]]] = defaultdict(list)
        self._transactions_seen: dict[str, int] = {}

    def declare(
        self,
        graph: Iterable[ServedModel],
        topics: TopicSettings,
        tracker: OffsetTracker,
        paused: Callable[[], bool],
    ) -> None:
        """Start every known series at zero, and read the tracker's gauges at scrape time."""
        m = self.metrics
        for g in graph:
            self.declare_model(g)
        for reason in REASONS:
            m.declare_reason(reason)
        for topic in topics.input:
            m.consumed_bytes.labels(topic)
        for topic in (topics.output, topics.dead_letter):
            m.produced.labels(topic)
        m.in_flight.set_function(lambda: tracker.in_flight)
        m.in_flight_bytes.set_function(lambda: tracker.in_flight_bytes)
        m.assigned.set_function(lambda: len(tracker.partitions()))
        m.paused.set_function(lambda: len(tracker.partitions()) if paused() else 0)

    def declare_model(self, g: ServedModel) -> None:
        """Count one more served model (at start, or a version loaded while serving)."""
        self._served = self._served | {g.name}
        self.metrics.declare_model(g.name, g.devices)
        self.metrics.batch_limit.labels(g.name).set(g.settings.batching.max_batch_size)
        self.metrics.batch_delay.labels(g.name).set(g.settings.batching.max_delay_ms / 1000.0)

    def consumed_many(self, tp: Partition, n: int, size: int) -> None:
        """``n`` records of ``tp`` taken into the pipeline, ``size`` bytes in all."""
        self.stats.consumed += n
        self._consumed_tp[tp] += n
        self._consumed_bytes[tp[0]] += size

    def acknowledged(self, outs: Sequence[Outcome]) -> None:
        """A batch of outcomes readers can now see.

        Counted by kind in one pass (`pipeline.engine.rows.kinds`); latencies as one array per
        model (the usual batch is one model's results), observed at the next `flush`.
        """
        if not outs:
            return
        now = time.time()
        served, acked = self._served, self._acked
        kinds = count_kinds(outs)
        results = 0
        for (topic, model, reason, status), n in kinds.items():
            if reason is None:
                results += n
            # A model label only for served models: a request naming random models must
            # not make a new metric series each.
            acked[(topic, model if model in served else "", reason, status)] += n
        if results == len(outs) and len(kinds) == 1:  # one model's results
            stamps = np.fromiter(map(_STAMP, outs), np.float64, len(outs))
            self._latency[outs[0].model].append(now - stamps / 1000.0)
        elif results:
            by_model: defaultdict[str, list[int]] = defaultdict(list)
            for out in outs:
                if out.reason is None:
                    by_model[out.model].append(out.envelope.timestamp_ms)
            for model, ms in by_model.items():
                self._latency[model].append(now - np.asarray(ms, np.float64) / 1000.0)
        self.stats.results += results
        self.stats.dead_letters += len(outs) - results
        self.stats.last_delivered = time.monotonic()

    def committed(self, positions: Mapping[Partition, int]) -> None:
        """Offsets the broker stored for the group."""
        self.stats.committed.update(positions)

    def flush(self, transactions: Mapping[str, int]) -> None:
        """Move the counts gathered since the last flush into the metrics."""
        m = self.metrics
        for result, n in transactions.items():
            seen = self._transactions_seen.get(result, 0)
            if n != seen:
                m.transactions.labels(result).inc(n - seen)
                self._transactions_seen[result] = n
        if self._consumed_tp:
            for (topic, partition), n in self._consumed_tp.items():
                m.consumed.labels(topic, str(partition)).inc(n)
            for topic, n in self._consumed_bytes.items():
                m.consumed_bytes.labels(topic).inc(n)
            self._consumed_tp.clear()
            self._consumed_bytes.clear()
        if self._acked:
            for (topic, model, reason, status), n in self._acked.items():
                m.produced.labels(topic).inc(n)
                if reason is None:
                    m.results.labels(model, status).inc(n)
                else:
                    m.dead_letters.labels(reason, model).inc(n)
            self._acked.clear()
        if self._latency:
            for model, seconds in self._latency.items():
                m.latency.observe_many(model, np.concatenate(seconds))
            self._latency.clear()
