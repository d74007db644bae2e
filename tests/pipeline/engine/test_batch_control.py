"""The lag control loop: up while lag grows, hold while it falls, down when it is gone."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.config.topology import BatchingSettings
from pipeline.engine.batch_control import BatchLimits, LagBatchControl


def _control() -> LagBatchControl:
    return LagBatchControl(BatchLimits(8, 0.002), BatchLimits(64, 0.020), lag_seconds=1.0)


def test_grows_while_lag_rises_holds_while_it_falls_and_returns_when_gone() -> None:
    c = _control()
    assert c.step(0.5) is None  # under the threshold: configured limits
    assert c.step(2.0) == "up"
    assert c.limits == BatchLimits(16, 0.004)
    assert c.step(3.0) == "up"
    assert c.step(3.0) == "up"  # flat above the threshold is not keeping up either
    assert c.limits == BatchLimits(64, 0.016)
    assert c.step(4.0) == "up"
    assert c.limits == BatchLimits(64, 0.020)  # ceilings
    assert c.step(5.0) is None  # nothing left to raise
    assert c.step(2.0) is None  # falling: hold, the backlog is being worked off
    assert c.step(0.5) is None  # between the thresholds: hold
    assert c.step(0.1) == "down"
    assert c.limits == BatchLimits(32, 0.010)
    assert [c.step(0.0) for _ in range(4)] == ["down", "down", "down", None]
    assert c.limits == BatchLimits(8, 0.002)


def test_zero_delay_grows_from_a_millisecond_and_returns_to_zero() -> None:
    c = LagBatchControl(BatchLimits(4, 0.0), BatchLimits(16, 0.010), lag_seconds=1.0)
    c.step(2.0)
    assert c.limits == BatchLimits(8, 0.001)
    for _ in range(3):
        c.step(0.0)
    assert c.limits == BatchLimits(4, 0.0)


def test_defaults_come_from_the_settings_and_the_model_limit() -> None:
    s = BatchingSettings(max_batch_size=16, max_delay_ms=5)
    c = LagBatchControl.from_settings(s, model_limit=None)
    assert c.ceiling == BatchLimits(128, 0.020)
    assert LagBatchControl.from_settings(s, model_limit=32).ceiling.size == 32
    assert LagBatchControl.from_settings(s, model_limit=4).ceiling.size == 16  # never below
    explicit = BatchingSettings.model_validate(
        {"max_batch_size": 16, "lag_control": {"max_batch_size": 1000, "max_delay_ms": 50}}
    )
    assert LagBatchControl.from_settings(explicit, model_limit=32).ceiling == BatchLimits(
        1000, 0.050
    )


def test_a_ceiling_below_the_configured_limits_is_refused() -> None:
    with pytest.raises(ValueError, match="below the configured"):
        LagBatchControl(BatchLimits(8, 0.002), BatchLimits(4, 0.020), 1.0)


@given(st.lists(st.floats(0, 10), max_size=60))
def test_limits_stay_between_configured_and_ceiling(lags: list[float]) -> None:
    c = _control()
    for lag in lags:
        before = c.limits
        direction = c.step(lag)
        assert c.base.size <= c.limits.size <= c.ceiling.size
        assert c.base.delay_s <= c.limits.delay_s <= c.ceiling.delay_s
        if direction is None:
            assert c.limits == before
        elif direction == "up":
            assert lag > c.lag_high
        else:
            assert lag < c.lag_low
