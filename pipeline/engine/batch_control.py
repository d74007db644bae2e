"""The lag-driven batching control loop: under lag, trade latency for throughput.

Bigger batches cost each request more waiting but serve more requests per second (per
batch costs: a model call, a produce round, Python overhead, spread over more rows).
Without lag that trade is wrong: the configured ``max_batch_size`` and ``max_delay_ms``
are the latency the user asked for. So the loop watches the age of the oldest unserved
request (lag in seconds, `pipeline.engine.lag`) once per tick:

* above ``lag_seconds`` and not falling: double the size and delay limits (up to the
  ceilings), because what is in force now is not keeping up;
* above ``lag_seconds`` and falling: hold, the backlog is being worked off;
* below a quarter of ``lag_seconds``: halve them, back down to the configured values.

Multiplicative steps reach the ceiling in a few ticks and come back as fast; the gap
between the two thresholds keeps it from oscillating around one value. Pure: the caller
passes the lag, and `steer` applies the limits to the batchers, so it is tested without
Kafka.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.config.topology import BatchingSettings
from pipeline.engine.batcher import MicroBatcher
from pipeline.observability.metrics import Metrics

__all__ = ["BatchLimits", "LagBatchControl", "steer"]

log = logging.getLogger(__name__)

_MIN_CEILING_DELAY_S = 0.020


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """What the batcher may do now."""

    size: int
    delay_s: float


class LagBatchControl:
    """One model's batch limits, moved between the configured values and the ceilings."""

    def __init__(self, base: BatchLimits, ceiling: BatchLimits, lag_seconds: float) -> None:
        if ceiling.size < base.size or ceiling.delay_s < base.delay_s:
            raise ValueError(f"ceiling {ceiling} is below the configured limits {base}")
        self.base = base
        self.ceiling = ceiling
        self.lag_high = lag_seconds
        self.lag_low = lag_seconds / 4
        self.limits = base
        self._last_lag: float | None = None

    @classmethod
    def from_settings(cls, s: BatchingSettings, model_limit: int | None) -> LagBatchControl:
        """Defaults: ceilings at 8x the size (within the model's limit) and 4x the delay."""
        c = s.lag_control
        size = c.max_batch_size or s.max_batch_size * 8
        if model_limit is not None and c.max_batch_size is None:
            size = max(s.max_batch_size, min(size, model_limit))
        base_delay = s.max_delay_ms / 1000.0
        delay = (
            c.max_delay_ms / 1000.0
            if c.max_delay_ms is not None
            else max(base_delay * 4, _MIN_CEILING_DELAY_S)
        )
        return cls(
            BatchLimits(s.max_batch_size, base_delay), BatchLimits(size, delay), c.lag_seconds
        )

    def step(self, lag_s: float) -> str | None:
        """One tick: returns "up" or "down" when the limits changed, else None."""
        last, self._last_lag = self._last_lag, lag_s
        now = self.limits
        if lag_s > self.lag_high and (last is None or lag_s >= last):
            grown = BatchLimits(
                min(self.ceiling.size, now.size * 2),
                min(self.ceiling.delay_s, max(now.delay_s * 2, 0.001)),
            )
            return self._move(grown, "up")
        if lag_s < self.lag_low:
            shrunk = BatchLimits(
                max(self.base.size, now.size // 2),
                max(self.base.delay_s, now.delay_s / 2),
            )
            if shrunk.delay_s < 0.001 and self.base.delay_s < 0.001:
                shrunk = BatchLimits(shrunk.size, self.base.delay_s)
            return self._move(shrunk, "down")
        return None

    def _move(self, limits: BatchLimits, direction: str) -> str | None:
        if limits == self.limits:
            return None
        self.limits = limits
        return direction


def steer(
    controls: Mapping[str, LagBatchControl],
    batchers: Mapping[str, MicroBatcher[Any, Any]],
    worst_lag_s: float,
    metrics: Metrics,
) -> None:
    """One tick of every model's control: apply, count and log each change of limits."""
    for name, control in controls.items():
        direction = control.step(worst_lag_s)
        if direction is None:
            continue
        batcher, limits = batchers[name], control.limits
        batcher.max_batch_size, batcher.max_delay_s = limits.size, limits.delay_s
        metrics.batch_adjustments.labels(name, direction).inc()
        metrics.batch_limit.labels(name).set(limits.size)
        metrics.batch_delay.labels(name).set(limits.delay_s)
        log.info(
            "model %s: lag %.1f s, batches %s to %d requests / %.0f ms",
            *(name, worst_lag_s, direction, limits.size, limits.delay_s * 1000.0),
        )
