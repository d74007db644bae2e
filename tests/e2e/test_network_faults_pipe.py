"""The network between the pipeline and its broker fails; nothing is lost.

`load.faults.run_faults` puts a fault proxy between every client and a broker of its own
and runs the pipeline (``kp-pipeline run``, at least once) through it under 100
requests/s: 250 ms of latency, every connection closed, every connection reset (RST), a
20 s black hole, then 24 closes and resets in a row (50 in ``python -m load.faults``).
The guarantees checked here; the figures are printed by ``python -m load.faults`` (README).

Exactly once under these faults is not shown: Tansu does not hide aborted transactions
from read_committed readers (see e2e/brokers.py), and noida-db, which does, cannot
advertise a proxy in front of it.
"""

from __future__ import annotations

from pathlib import Path

from load.faults import FaultConfig, run_faults

SOCKET_TIMEOUT_S = 15.0  # pipeline.kafka.clients: socket.timeout.ms and connection setup


def test_no_request_is_lost_through_latency_closes_resets_and_a_black_hole(tmp_path: Path) -> None:
    config = FaultConfig(rate=100, latency_s=3, blackhole_s=20, quick_faults=24, settle_s=3)
    log = tmp_path / "run.log"
    report = run_faults(config, log)
    tail = log.read_text(errors="replace")[-3000:]
    assert report.pipeline_exit is None, tail  # it rode through every fault
    assert report.sent > 5000
    assert report.lost == 0, report
    # At least once: a redelivery repeats at most what was consumed and not committed when
    # the fault struck; far below a fault's worth of traffic per fault.
    assert report.duplicates <= config.rate * (config.blackhole_s + 5) * len(report.faults)
    assert all(f.recovery_s is not None for f in report.faults), report.faults
    hole = next(f for f in report.faults if f.name.startswith("black hole"))
    # Not ready within a request timeout (and a statistics interval) of the black hole...
    assert hole.not_ready_after_s is not None, report.faults
    assert hole.not_ready_after_s <= SOCKET_TIMEOUT_S + 2
    # ... and ready again within a connection setup timeout (and a group rejoin) after.
    assert hole.ready_again_after_s is not None
    assert hole.ready_again_after_s <= SOCKET_TIMEOUT_S + 10
    # No thread or memory leak across the quick faults (one thread each would be +24).
    assert report.threads_after <= report.threads_before + 2, report
    assert report.rss_after_mb - report.rss_before_mb < 50, report
