"""`kp-pipeline top --once` against a real pipeline serving traffic on the real broker."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from e2e.kit import ROOT, Topics, produce_tiny, start_background, tiny_vectors, wait_for

from pipeline.kafka.broker import EmbeddedBroker


def test_top_shows_partitions_and_models_of_a_running_pipeline(
    broker: EmbeddedBroker, topics: Topics, tiny_topology: Path
) -> None:
    served = start_background(tiny_topology, broker)
    stop = threading.Event()

    def traffic() -> None:  # keep records flowing while top takes its two scrapes
        batch = 0
        while not stop.is_set():
            produce_tiny(broker, topics.input, tiny_vectors(500, seed=batch), f"t{batch}")
            batch += 1

    feeder = threading.Thread(target=traffic)
    feeder.start()
    try:
        assert served.pipeline is not None
        stats = served.pipeline.stats
        wait_for(lambda: stats.results > 0, 30, "traffic")
        url = served.pipeline.metrics_url
        assert url is not None
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "top", url, "--once", "--interval", "1.5"],
            capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
        )  # fmt: skip
    finally:
        stop.set()
        feeder.join()
        served.stop()
    assert done.returncode == 0, done.stderr
    frame = done.stdout
    assert "READY" in frame
    rows = [line.split() for line in frame.splitlines()]
    partitions = [r for r in rows if r and r[0] == topics.input]
    assert sorted(int(r[1]) for r in partitions) == [0, 1, 2, 3]
    assert sum(float(r[4]) for r in partitions) > 0  # records per second, measured
    model = next(r for r in rows if r and r[0] == "tiny-mlp")
    assert float(model[1]) > 0  # results per second
