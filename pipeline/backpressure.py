"""Pause consuming above a high mark of in-flight requests, resume below a low mark.

Hysteresis between the marks keeps the consumer from flapping. What is not consumed
stays in Kafka, where it is visible as consumer lag.
"""

from __future__ import annotations

__all__ = ["Backpressure"]


class Backpressure:
    """Decides, from the in-flight count, whether partitions should be paused."""

    def __init__(self, high: int, low: int) -> None:
        if not 0 <= low < high:
            raise ValueError(f"need 0 <= low ({low}) < high ({high})")
        self.high = high
        self.low = low
        self.paused = False

    def capacity(self, in_flight: int) -> int:
        """How many more records may be consumed now."""
        return 0 if self.paused else max(0, self.high - in_flight)

    def update(self, in_flight: int) -> bool | None:
        """True when it is time to pause, False to resume, None to stay as is."""
        if not self.paused and in_flight >= self.high:
            self.paused = True
            return True
        if self.paused and in_flight <= self.low:
            self.paused = False
            return False
        return None
