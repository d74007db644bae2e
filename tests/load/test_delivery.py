"""The delivery benchmark's report: the cost is computed from medians, and judged."""

from __future__ import annotations

from load.delivery import Drain, Steady, markdown

MACHINE = {
    "nproc": 2,
    "cpu": "test",
    "memory_gib": 1.0,
    "python": "3.11",
    "broker": "Tansu",
    "packages": {},
    "date": "today",
}


def _drains(alos: list[float], eos: list[float]) -> list[Drain]:
    return [Drain("at_least_once", i, 1000, 1000 / r, 0) for i, r in enumerate(alos, 1)] + [
        Drain("exactly_once", i, 1000, 1000 / r, 4) for i, r in enumerate(eos, 1)
    ]


def test_cost_is_one_minus_the_ratio_of_medians() -> None:
    text = markdown(_drains([100, 90, 110], [95, 50, 92]), [], MACHINE)
    assert "exactly-once costs 8.0% (target ≤ 10%: MET)" in text


def test_a_cost_above_ten_percent_is_reported_missed() -> None:
    text = markdown(_drains([100], [80]), [Steady("exactly_once", 100, 500, 60.0, 90.0)], MACHINE)
    assert "costs 20.0% (target ≤ 10%: MISSED)" in text
    assert "| exactly_once | 100 | 500 | 60.0 | 90.0 |" in text
