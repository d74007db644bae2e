"""Consumer lag per partition, in records and in seconds.

Records: the partition's high watermark minus the oldest offset this replica has not yet
served (consumed and in flight, or still in Kafka). The high watermark comes from fetch
responses (``get_watermark_offsets(cached=True)``): free, fresh while a partition is
fetched, and right on every broker tried, where a ListOffsets query is not (Tansu's
advances once per record batch, ../shared/NOTES.md). A paused partition is not fetched,
so its cached watermark goes stale: a background thread queries those (and the
committed offset of partitions not consumed yet) every few seconds, and the larger of
the two watermarks wins.

Seconds: the age of the oldest record not yet served. For a record in flight the
tracker knows its timestamp. For one still in Kafka it is dated from the history of
watermarks: the record at offset ``o`` arrived between the last time the watermark was
at or below ``o`` and the first time it was above (interpolated), the way
kafka-lag-exporter estimates lag in time. A record older than the history is dated by
the newest record this replica did consume (an upper bound on its age), or else by the
first watermark seen.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaException, TopicPartition

from pipeline.engine.offsets import OffsetTracker
from schemas.messages import Partition, partition_of

__all__ = ["LagMonitor", "PartitionLag", "WatermarkHistory"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PartitionLag:
    """One partition's lag: records not yet served, and the age of the oldest of them."""

    messages: int
    seconds: float


class WatermarkHistory:
    """When each high watermark of one partition was first seen (wall-clock seconds)."""

    def __init__(self, limit: int = 512) -> None:
        self._points: deque[tuple[int, float]] = deque(maxlen=limit)

    def observe(self, high: int, now: float) -> None:
        """Record ``high`` if it moved forward."""
        if not self._points or high > self._points[-1][0]:
            self._points.append((high, now))

    def arrival(self, offset: int) -> float | None:
        """When the record at ``offset`` reached the broker; None if before the history."""
        prev: tuple[int, float] | None = None
        for high, seen in self._points:
            if high > offset:
                if prev is None:
                    return None
                low, since = prev  # the record is one of low .. high-1
                return since + (seen - since) * (offset - low + 1) / (high - low)
            prev = (high, seen)
        return None

    @property
    def first_seen(self) -> float | None:
        """When this history started."""
        return self._points[0][1] if self._points else None


class LagMonitor:
    """Measures lag for the partitions a runner serves (call `measure` on its thread)."""

    def __init__(
        self, consumer: Consumer, refresh_s: float = 5.0, query_timeout_s: float = 2.0
    ) -> None:
        self._consumer = consumer
        self._refresh_s = refresh_s
        self._timeout = query_timeout_s
        self._history: dict[Partition, WatermarkHistory] = {}
        self._queried_high: dict[Partition, int] = {}
        self._queried_start: dict[Partition, int] = {}
        self._wanted: tuple[list[Partition], list[Partition]] = ([], [])
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the background refresher -----------------------------------------------------------

    def start(self) -> None:
        """Start the thread that queries what fetch responses cannot tell."""
        self._thread = threading.Thread(target=self._refresh_loop, name="lag", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the refresher (before the consumer is closed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self._timeout * 2 + 1)

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self._refresh_s):
            with self._lock:
                stale, unstarted = self._wanted
            try:
                self._refresh(stale, unstarted)
            except Exception as e:  # a broker away now; the next round tries again
                log.debug("lag refresh failed: %s", e)

    def _refresh(self, stale: list[Partition], unstarted: list[Partition]) -> None:
        for tp in stale:
            low, high = self._consumer.get_watermark_offsets(
                TopicPartition(*tp), timeout=self._timeout, cached=False
            )
            with self._lock:
                self._queried_high[tp] = max(high, self._queried_high.get(tp, -1))
                if tp in unstarted:
                    self._queried_start.setdefault(tp, low)
        if unstarted:
            parts = [TopicPartition(*tp) for tp in unstarted]
            for p in self._consumer.committed(parts, timeout=self._timeout):
                if p.offset >= 0:
                    with self._lock:
                        self._queried_start[partition_of(p)] = p.offset

    # -- measuring ---------------------------------------------------------------------------

    def measure(
        self,
        tracker: OffsetTracker,
        partitions: Iterable[Partition],
        paused: bool,
        now: float | None = None,
    ) -> dict[Partition, PartitionLag]:
        """Lag of each partition whose watermark and position are known."""
        now = time.time() if now is None else now
        out: dict[Partition, PartitionLag] = {}
        stale: list[Partition] = []
        unstarted: list[Partition] = []
        for tp in partitions:
            high = self._high(tp)
            if high is None or paused:
                stale.append(tp)
            start = self._start(tracker, tp)
            if start is None:
                unstarted.append(tp)
                stale.append(tp)
            if high is None or start is None:
                continue
            history = self._history.setdefault(tp, WatermarkHistory())
            history.observe(high, now)
            messages = max(0, high - start)
            out[tp] = PartitionLag(messages, self._age(tracker, tp, start, messages, now))
        with self._lock:
            self._wanted = (sorted(set(stale)), unstarted)
        return out

    def forget(self, tp: Partition) -> None:
        """Drop what is known of a partition this replica no longer serves."""
        self._history.pop(tp, None)
        with self._lock:
            self._queried_high.pop(tp, None)
            self._queried_start.pop(tp, None)

    def _high(self, tp: Partition) -> int | None:
        try:
            _, cached = self._consumer.get_watermark_offsets(TopicPartition(*tp), cached=True)
        except KafkaException:
            cached = -1
        with self._lock:
            queried = self._queried_high.get(tp, -1)
        high = max(cached, queried)
        return high if high >= 0 else None

    def _start(self, tracker: OffsetTracker, tp: Partition) -> int | None:
        oldest = tracker.oldest(tp)
        if oldest is not None:
            return oldest[0]
        start = tracker.next_offset(tp)
        if start is not None:
            return start
        position = self._consumer.position([TopicPartition(*tp)])[0].offset
        if position >= 0:
            return position
        with self._lock:
            return self._queried_start.get(tp)

    def _age(
        self, tracker: OffsetTracker, tp: Partition, start: int, messages: int, now: float
    ) -> float:
        oldest = tracker.oldest(tp)
        if oldest is not None:
            return max(0.0, now - oldest[1] / 1000.0)
        if messages == 0:
            return 0.0
        history = self._history[tp]
        arrived = history.arrival(start)
        if arrived is None:
            newest = tracker.last_timestamp_ms(tp)
            arrived = newest / 1000.0 if newest else history.first_seen
        return 0.0 if arrived is None else max(0.0, now - arrived)
