"""Pause consuming above a high mark of in-flight work, resume below a low mark.

Work in flight is counted twice, in requests and in record bytes: the count bounds how
much a crash redoes, the bytes bound memory when requests are large. Either high mark
pauses; resuming waits until both are at or below their low marks. Hysteresis between
the marks keeps the consumer from flapping. What is not consumed stays in Kafka, where
it is visible as consumer lag.
"""

from __future__ import annotations

import logging

from confluent_kafka import Consumer, KafkaException, TopicPartition

__all__ = ["Backpressure", "wake_fetcher"]

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
