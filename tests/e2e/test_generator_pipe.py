"""The open-loop load generator against a real pipeline on the real broker (tiny model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from e2e.kit import Topics, start_background

from load.generator import LoadConfig, run_load
from pipeline.kafka.broker import EmbeddedBroker

RATE, SECONDS = 1000.0, 3.0
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(60)
def test_generator_holds_the_rate_and_measures_every_request(
    broker: EmbeddedBroker, topics: Topics, tiny_topology: Path, tmp_path: Path
) -> None:
    served = start_background(tiny_topology, broker)
    try:
        assert served.pipeline is not None
        reports = {
            arrival: run_load(
                LoadConfig(
                    tiny_topology,
                    rate=RATE,
                    duration=SECONDS,
                    arrival=arrival,
                    mix="tiny",
                    seed=7,
                    bootstrap=broker.bootstrap_servers,
                    metrics_url=served.pipeline.metrics_url,
                    out=tmp_path / arrival,
                    drain_timeout=15,
                )
            )
            for arrival in ("constant", "poisson")
        }
    finally:
        served.stop()
    for arrival, r in reports.items():
        s = r.samples
        assert s is not None
        sent = np.sort(s.sent_s)
        assert r.counts["sent"] == r.counts["scheduled"] == len(s.due_s) > 0
        # The rate, from the recorded send times: requests ÷ time from the first send to
        # the last, against the schedule's own pace (Poisson: random, fixed by the seed).
        measured = (sent.size - 1) / (sent[-1] - sent[0])
        planned = (s.due_s.size - 1) / (s.due_s[-1] - s.due_s[0])
        assert measured == pytest.approx(planned, rel=0.05), arrival
        assert measured == pytest.approx(RATE, rel=0.05), arrival
        assert r.achieved_rate == pytest.approx(RATE, rel=0.05), arrival
        # Every request got exactly one outcome, and the latencies make sense.
        assert r.missing == 0, arrival
        assert r.counts["ok"] == r.counts["sent"]
        assert r.counts["duplicates"] == r.counts["send_failures"] == 0
        assert not np.isnan(s.latency_ms).any()
        ordered = [r.latency_ms[k] for k in ("min", "p50", "p90", "p99", "p99.9", "max")]
        assert None not in ordered
        assert ordered[0] > 0  # type: ignore[operator]
        assert np.all(np.diff(np.asarray(ordered, dtype=float)) >= 0), ordered
        assert r.pipeline_e2e_ms["count"] == r.counts["ok"]
        assert r.lag["scrapes"]  # /metrics was scraped during the run
        for name in ("latency.png", "latency_cdf.png", "throughput.png", "backlog.png"):
            assert (tmp_path / arrival / name).read_bytes()[:8] == PNG
        assert (tmp_path / arrival / "report.json").exists()
