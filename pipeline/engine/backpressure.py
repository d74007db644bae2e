"""Pause consuming above a high mark of in-flight work, resume below a low mark.

Work in flight is counted twice, in requests and in record bytes: the count bounds how
much a crash redoes, the bytes bound memory when requests are large. Either high mark
pauses; resuming waits until both are at or below their low marks. Hysteresis between
the marks keeps the consumer from flapping. What is not consumed stays in Kafka, where
it is visible as consumer lag.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

__all__ = ["Backpressure", "wake_fetcher", "warn_if_narrow"]

log = logging.getLogger(__name__)


class Backpressure:
    """Decides, from the in-flight count and bytes, whether partitions should be paused."""

    def __init__(
        self, high: int, low: int, high_bytes: int | None = None, low_bytes: int = 0
    ) -> None:
        if not 0 <= low < high:
            raise ValueError(f"need 0 <= low ({low}) < high ({high})")
        if high_bytes is not None and not 0 <= low_bytes < high_bytes:
            raise ValueError(f"need 0 <= low_bytes ({low_bytes}) < high_bytes ({high_bytes})")
        self.high = high
        self.low = low
        self.high_bytes = high_bytes  # None: count only
        self.low_bytes = low_bytes
        self.paused = False

    def capacity(self, in_flight: int) -> int:
        """How many more records may be consumed now."""
        return 0 if self.paused else max(0, self.high - in_flight)

    @classmethod
    def of(cls, flow: Any) -> Backpressure:
        """The marks of a topology's ``flow`` section (`FlowSettings`)."""
        return cls(flow.max_in_flight, flow.low_mark, flow.max_in_flight_bytes, flow.low_mark_bytes)

    def update(self, in_flight: int, in_flight_bytes: int = 0) -> bool | None:
        """True when it is time to pause, False to resume, None to stay as is."""
        over_bytes = self.high_bytes is not None and in_flight_bytes >= self.high_bytes
        if not self.paused and (in_flight >= self.high or over_bytes):
            self.paused = True
            return True
        under_bytes = self.high_bytes is None or in_flight_bytes <= self.low_bytes
        if self.paused and in_flight <= self.low and under_bytes:
            self.paused = False
            return False
        return None


def wake_fetcher(consumer: Consumer, parts: list[TopicPartition]) -> None:
    """Make librdkafka fetch resumed partitions now rather than at its next timer.

    librdkafka 2.16 does not wake a broker's fetcher when partitions are resumed: it
    notices at its next periodic wake-up, and records arrived 820–900 ms after resume()
    (measured on Tansu, any fetch.wait.max.ms; confluent-kafka-go#630 shows the same
    against Kafka). A seek to where a partition already stands changes nothing, but is an
    operation the fetcher acts on at once: records then arrived 9–16 ms after resume().
    Pausing purges the prefetched records, so the fetch starts at that position anyway.
    """
    for tp in consumer.position(parts):
        if tp.offset >= 0:  # never consumed yet: nothing to restart from
            try:
                consumer.seek(tp)
            except KafkaException as e:  # e.g. revoked meanwhile; the timer still fetches
                log.debug("seek %s[%d]@%d on resume: %s", tp.topic, tp.partition, tp.offset, e)


def warn_if_narrow(max_in_flight: int, batching: Iterable[Any]) -> None:
    """Warn when the in-flight window holds fewer than 4 of the biggest batches.

    ``batching``: each model's `BatchingSettings`. Such a window fills with a few batches:
    the consumer pauses and resumes constantly, and each pause drops librdkafka's prefetch.
    """
    biggest = max((b.max_batch_size for b in batching), default=0)
    if max_in_flight < 4 * biggest:
        log.warning(
            "flow.max_in_flight (%d) holds fewer than 4 batches of %d: the consumer will "
            "pause and resume constantly, and each pause drops librdkafka's prefetch",
            max_in_flight,
            biggest,
        )
