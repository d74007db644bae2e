"""Backlogs on the real broker: memory stays flat, lag is seen and falls, batches adapt.

The backlog is produced before the pipeline starts, as after an outage. Peak RSS is the
kernel's high-water mark of a `kp-pipeline run` process (`load.backlog.memory_run`, the
same code that `python -m load.backlog` reports figures with).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from e2e.kit import MODELS, ROOT, Topics, start_background, wait_for

from load.backlog import memory_run, produce_tiny, scrape, total
from pipeline.kafka.broker import EmbeddedBroker

# Peak RSS bound for the tiny model, whatever the backlog: measured 127–162 MiB here
# (Python, NumPy, ONNX Runtime, librdkafka's 16 MiB prefetch, 2048 requests in flight).
RSS_BOUND_MIB = 300
# 4x the backlog may cost at most this much more at the peak (measured 1.14–1.28x).
RSS_GROWTH_BOUND = 1.5


def test_peak_memory_does_not_follow_the_backlog(broker: EmbeddedBroker, tmp_path: Path) -> None:
    small = memory_run(broker.bootstrap_servers, 50_000, tmp_path, "rss")
    large = memory_run(broker.bootstrap_servers, 200_000, tmp_path, "rss")
    print(f"peak RSS: {small.peak_rss_mib:.0f} MiB at 50k, {large.peak_rss_mib:.0f} MiB at 200k")
    for row in (small, large):
        assert row.results == row.backlog  # nothing lost, nothing twice
        assert row.dead_letters == 0
        assert row.peak_rss_mib < RSS_BOUND_MIB
        assert row.pauses >= 1  # the high mark was hit: the backlog stayed in Kafka
        assert row.resumes >= 1
        assert row.max_lag > 0  # lag was visible while draining...
        assert row.final_lag == 0  # ...and gone once drained
    assert large.max_lag > small.max_lag
    assert large.peak_rss_mib < small.peak_rss_mib * RSS_GROWTH_BOUND


CONTROLLED = """
kafka: {{bootstrap_servers: embedded, group_id: {group}}}
topics: {{input: [{input}], output: {output}, dead_letter: {dead_letter}, create: false}}
flow: {{max_in_flight: 4096, lag_interval_ms: 200}}
models:
  - name: tiny-mlp
    backend: onnxruntime
    artifact: {models}/tiny_mlp.onnx
    options: {{intra_op_threads: 1}}
    inputs: [{{name: x, datatype: FP32, shape: [64]}}]
    batching:
      max_batch_size: 8
      max_delay_ms: 2
      lag_control: {{lag_seconds: 0.3, max_batch_size: 256}}
"""


def test_batches_grow_under_lag_and_return_after(
    broker: EmbeddedBroker, topics: Topics, tmp_path: Path
) -> None:
    path = tmp_path / "controlled.yaml"
    path.write_text(
        CONTROLLED.format(
            group=topics.group,
            input=topics.input,
            output=topics.output,
            dead_letter=topics.dead_letter,
            models=MODELS,
        )
    )
    n = 60_000
    produce_tiny(broker.bootstrap_servers, topics.input, n, "lag")
    time.sleep(0.5)  # the backlog is older than lag_seconds before the pipeline starts
    served = start_background(path, broker)
    try:
        assert served.pipeline is not None
        url = served.pipeline.metrics_url
        assert url is not None
        limits: list[float] = []

        def drained() -> bool:
            s = scrape(url)
            limits.append(total(s, "kp_batch_max_size_requests"))
            return total(s, "kp_results_total") >= n

        wait_for(drained, 120, "the backlog to drain")
        wait_for(lambda: total(scrape(url), "kp_batch_max_size_requests") == 8, 10, "limit back")
        s = scrape(url)
    finally:
        served.stop()
    assert max(limits) > 8, f"the batch limit never rose: {sorted(set(limits))}"
    assert s["kp_batch_adjustments_total{direction=up,model=tiny-mlp}"] >= 1
    assert s["kp_batch_adjustments_total{direction=down,model=tiny-mlp}"] >= 1
    batches = s["kp_batch_size_requests_count{model=tiny-mlp}"]
    up_to_8 = s["kp_batch_size_requests_bucket{le=8.0,model=tiny-mlp}"]
    assert batches > up_to_8, "no batch was larger than the configured 8"
    assert s["kp_batch_max_delay_seconds{model=tiny-mlp}"] == pytest.approx(0.002)


def test_readyz_says_the_broker_is_unreachable_while_healthz_stays_up(
    tiny_topology: Path, tmp_path: Path
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens once closed
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "run.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", str(tiny_topology), "--bootstrap", dead,
         "--metrics-port", str(port)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:

        def answers() -> bool:
            try:
                urllib.request.urlopen(base + "/healthz", timeout=1)
                return True
            except OSError:
                return False

        wait_for(answers, 60, "/healthz")
        time.sleep(2.0)  # a few failed connection attempts
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base + "/readyz", timeout=2)
        assert refused.value.code == 503
        body = refused.value.read().decode()
        assert '"broker_reachable": false' in body
        assert '"models_loaded": true' in body
        assert urllib.request.urlopen(base + "/healthz", timeout=2).status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0, log.read_text()[-2000:]


def test_a_metrics_port_in_use_is_refused_before_anything_loads(
    tiny_topology: Path, broker: EmbeddedBroker
) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "run", str(tiny_topology), "--bootstrap",
             broker.bootstrap_servers, "--metrics-port", str(port)],
            capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"--metrics-port: cannot listen on 0.0.0.0:{port}" in done.stderr
