"""The load generator's pure parts: schedules, mixes, statistics, the report. No broker."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from load.generator import (
    LoadConfig,
    LoadReport,
    Samples,
    assign_kinds,
    burst_shape,
    parse_mix,
    schedule,
)
from load.plots import outstanding, per_second, percentiles, summary, write_all

TINY = Path(__file__).resolve().parents[2] / "load" / "topologies" / "tiny-mlp.yaml"


def test_constant_schedule_is_exact() -> None:
    due = schedule("constant", 2000, 1.5)
    assert len(due) == 3000
    assert due[0] == 0.0
    np.testing.assert_allclose(np.diff(due), 1 / 2000, rtol=0, atol=1e-12)
    assert due[-1] < 1.5


def test_constant_schedule_of_a_rate_that_does_not_divide_the_duration() -> None:
    due = schedule("constant", 3, 1.0)
    np.testing.assert_allclose(due, [0, 1 / 3, 2 / 3])


def test_poisson_schedule_has_the_mean_rate_and_exponential_gaps() -> None:
    rate, duration = 1000.0, 20.0
    due = schedule("poisson", rate, duration, seed=7)
    n = len(due)
    # Count: Poisson(20,000), sd ≈ 141; 4 sd is 2.8%.
    assert abs(n - rate * duration) < 4 * math.sqrt(rate * duration)
    assert np.all(np.diff(due) >= 0)
    assert due[0] > 0
    assert due[-1] < duration
    gaps = np.diff(np.concatenate([[0.0], due]))
    # Exponential(1/rate): mean = sd = 1 ms, and the coefficient of variation is 1.
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.03)
    # Kolmogorov-Smirnov against the exponential CDF: D < 1.63/sqrt(n) is the 1% level.
    x = np.sort(gaps)
    cdf = 1 - np.exp(-rate * x)
    ecdf_hi = np.arange(1, x.size + 1) / x.size
    ecdf_lo = np.arange(x.size) / x.size
    d = max(np.max(ecdf_hi - cdf), np.max(cdf - ecdf_lo))
    assert d < 1.63 / math.sqrt(x.size)


def test_poisson_schedule_is_fixed_by_the_seed() -> None:
    a, b = schedule("poisson", 500, 2, seed=3), schedule("poisson", 500, 2, seed=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, schedule("poisson", 500, 2, seed=4))


def test_uniform_gaps_fail_the_same_exponential_check() -> None:
    """The KS check above can fail: a constant schedule's gaps are far from exponential."""
    gaps = np.diff(np.concatenate([[0.0], schedule("constant", 1000, 5)]))
    x = np.sort(gaps)
    cdf = 1 - np.exp(-1000 * x)
    assert np.max(np.abs(np.arange(1, x.size + 1) / x.size - cdf)) > 1.63 / math.sqrt(x.size)


def test_burst_schedule_sends_bursts_at_the_mean_rate() -> None:
    due = schedule("burst", 2000, 5, burst_size=500)
    assert len(due) == 2000 * 5
    times, sizes = np.unique(due, return_counts=True)
    assert set(sizes.tolist()) == {500}
    np.testing.assert_allclose(np.diff(times), 0.25)  # 500 every 0.25 s = 2000/s
    assert len(due) / 5 == 2000


def test_burst_shape_takes_either_size_or_period() -> None:
    assert burst_shape(2000, None, None) == (2000, 1.0)
    assert burst_shape(2000, 500, None) == (500, 0.25)
    assert burst_shape(2000, None, 0.5) == (1000, 0.5)
    assert burst_shape(2000, 500, 0.25) == (500, 0.25)
    with pytest.raises(ValueError, match="not both"):
        burst_shape(2000, 500, 1.0)  # 500/s: a different load, not a different shape
    with pytest.raises(ValueError, match="at least 1"):
        burst_shape(2000, 0, None)


def test_bad_configs_are_refused_before_anything_starts() -> None:
    with pytest.raises(ValueError, match="one of"):
        schedule("zipf", 10, 1)
    with pytest.raises(ValueError, match="one of"):
        LoadConfig(TINY, arrival="zipf")
    with pytest.raises(ValueError, match="not both"):
        LoadConfig(TINY, rate=2000, arrival="burst", burst_size=500, burst_every=1.0)
    with pytest.raises(ValueError, match="mix"):
        LoadConfig(TINY, mix="video")


def test_parse_mix_normalises_weights() -> None:
    assert parse_mix("tiny") == {"tiny": 1.0}
    assert parse_mix("image=0.7,text=0.3") == pytest.approx({"image": 0.7, "text": 0.3})
    assert parse_mix("image=7, text=3") == pytest.approx({"image": 0.7, "text": 0.3})
    for bad in ("video", "image=0", "image=-1,text=1", "text,text", "image=nan"):
        with pytest.raises(ValueError, match="mix"):
            parse_mix(bad)


def test_assign_kinds_follows_the_weights() -> None:
    mix = {"image": 0.7, "text": 0.3}
    kinds = assign_kinds(20_000, mix, seed=7)
    share = np.bincount(kinds, minlength=2) / kinds.size
    # Binomial sd at n=20,000, p=0.3 is 0.32%; 1.5% is ~4.6 sd.
    np.testing.assert_allclose(share, [0.7, 0.3], atol=0.015)
    np.testing.assert_array_equal(kinds, assign_kinds(20_000, mix, seed=7))
    assert set(assign_kinds(100, {"tiny": 1.0}, 1).tolist()) == {0}


def test_percentiles_match_numpy_and_ignore_nan() -> None:
    rng = np.random.default_rng(1)
    v = rng.lognormal(3, 1, 10_001)
    with_nan = np.concatenate([v, [np.nan] * 50])
    got = percentiles(with_nan)
    assert got["count"] == v.size
    for key, q in (("p50", 50), ("p90", 90), ("p99", 99), ("p99.9", 99.9)):
        assert got[key] == pytest.approx(np.percentile(v, q), rel=1e-12)
    assert got["max"] == v.max()
    assert got["min"] == v.min()
    assert got["mean"] == pytest.approx(v.mean())
    ordered = [got[k] for k in ("min", "p50", "p90", "p99", "p99.9", "max")]
    assert np.all(np.diff(np.asarray(ordered, dtype=float)) >= 0)
    empty = percentiles(np.array([np.nan]))
    assert empty["count"] == 0
    assert empty["p99"] is None


def _fake_samples() -> Samples:
    """Three seconds at 100/s, latency 10 ms, the last 5 requests unanswered."""
    due = schedule("constant", 100, 3)
    s = Samples.empty({"tiny": 1.0}, np.zeros(due.size, int), due)
    s.sent_s[:] = due + 0.0002
    s.recv_s[:-5] = s.sent_s[:-5] + 0.010
    s.pipeline_ms[:-5] = 8.0
    s.work_ms[:-5] = 3.0
    s.outcome[:-5] = 1
    s.lag = [(0.0, 0.0, 0.0), (1.2, 7.0, 0.05), (1.7, 3.0, 0.01)]
    return s


def test_per_second_series_and_outstanding() -> None:
    s = _fake_samples()
    series = per_second(s, 3.0)
    assert series["sent"] == [100.0, 100.0, 100.0]
    assert sum(v or 0 for v in series["received"]) == 295
    assert series["outstanding"][-1] == 5
    assert series["p50_ms"][0] == pytest.approx(10.0)
    assert series["lag_messages"] == [0.0, 7.0, None]
    assert series["lag_seconds"][1] == pytest.approx(0.05)
    t, waiting = outstanding(s)
    assert waiting.max() >= 1
    assert waiting[-1] == 5
    assert t.size == waiting.size


def test_overhead_is_client_latency_minus_the_models_own_work() -> None:
    s = _fake_samples()
    over = s.overhead_ms
    assert over[:-5] == pytest.approx(10.0 - 3.0, abs=1e-6)
    assert np.isnan(over[-5:]).all()  # no result, no overhead
    assert percentiles(over)["count"] == len(over) - 5


def _report(tmp: Path) -> LoadReport:
    s = _fake_samples()
    lat = s.latency_ms
    return LoadReport(
        config=LoadConfig(TINY, rate=100, duration=3, arrival="constant", out=tmp),
        target={
            "bootstrap": "x:1",
            "where": "x:1",
            "input": "in",
            "output": "out",
            "dead_letter": "dlq",
            "metrics": None,
            "models": ["tiny-mlp"],
        },
        mix=s.mix,
        started_at="2026-01-01T00:00:00Z",
        counts={
            "scheduled": 300,
            "sent": 300,
            "send_failures": 0,
            "ok": 295,
            "error": 0,
            "dead_letter": 0,
            "received": 295,
            "duplicates": 0,
            "missing": 5,
        },
        rates={"target": 100.0, "scheduled": 100.0, "achieved": 99.9},
        lateness_ms=percentiles((s.sent_s - s.due_s) * 1000),
        latency_ms=percentiles(lat),
        pipeline_e2e_ms=percentiles(s.pipeline_ms),
        by_kind={"tiny": {"sent": 300.0, **percentiles(lat)}},
        drain_s=0.01,
        series=per_second(s, 3.0),
        lag={"scrapes": [list(r) for r in s.lag], "errors": 0},
        machine={"nproc": 2},
        samples=s,
    )


def test_report_json_round_trip(tmp_path: Path) -> None:
    report = _report(tmp_path)
    back = LoadReport.from_json(report.to_json())
    assert back == report  # every field but the raw samples
    assert back.samples is None
    assert back.config.topology == TINY
    assert back.config.out == tmp_path
    assert back.missing == 5
    assert back.achieved_rate == 99.9
    assert "NaN" not in report.to_json()


def test_write_all_writes_json_csv_and_pngs(tmp_path: Path) -> None:
    report = _report(tmp_path)
    paths = write_all(report, tmp_path / "run")
    assert [p.name for p in paths] == [
        "report.json", "samples.csv", "latency.png", "latency_cdf.png", "throughput.png",
        "backlog.png",
    ]  # fmt: skip
    for png in paths[2:]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert LoadReport.from_json(paths[0].read_text()).files == [str(p) for p in paths]
    rows = paths[1].read_text().splitlines()
    assert len(rows) == 301
    assert rows[-1].endswith(",,,0")
    text = summary(report)
    assert "5 missing" in text
    assert "p99" in text
    assert "run/" in text
