"""The command-line example (examples/kcat/infer.sh, Debian's kcat) against a real pipeline.

The script sends one v2 JSON request with a ``content-type`` header and a reply topic of
its own, and prints the result it reads back: the README's command-line path, run as
written. Debian 12's kcat links librdkafka 2.0.2, whose version handshake the embedded
broker (Tansu) refuses; the test runs it on the newer librdkafka that confluent-kafka's
wheel ships, as the README tells a user to.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import confluent_kafka
import numpy as np
import pytest
from e2e.kit import ROOT, Topics, start_background

from pipeline.kafka.broker import EmbeddedBroker

SCRIPT = ROOT / "examples" / "kcat" / "infer.sh"


@pytest.fixture(scope="module")
def kcat_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    if shutil.which("kcat") is None:
        pytest.fail("kcat is needed (make client-tools; Debian: apt-get install kcat)")
    libs = Path(confluent_kafka.__file__).parent.parent / "confluent_kafka.libs"
    [lib] = libs.glob("librdkafka*.so.1")
    shim = tmp_path_factory.mktemp("librdkafka")
    (shim / "librdkafka.so.1").symlink_to(lib)
    return {**os.environ, "LD_LIBRARY_PATH": str(shim)}


def _infer(bootstrap: str, topic: str, inputs: str, env: dict[str, str], wait: int = 60) -> str:
    done = subprocess.run(
        ["bash", str(SCRIPT), bootstrap, topic, "tiny-mlp", inputs, str(wait)],
        capture_output=True, text=True, timeout=wait + 30, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def test_the_kcat_example_prints_each_requests_result(
    broker: EmbeddedBroker, topics: Topics, tiny_topology: Path, kcat_env: dict[str, str]
) -> None:
    rows = np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)
    served = start_background(tiny_topology, broker)
    try:
        printed = [
            _infer(
                broker.bootstrap_servers,
                topics.input,
                json.dumps(
                    [{"name": "x", "datatype": "FP32", "shape": [64], "data": row.tolist()}]
                ),
                kcat_env,
            )
            for row in rows
        ]
    finally:
        served.stop()
    bodies = [json.loads(out) for out in printed]
    assert [len(out.splitlines()) for out in printed] == [1, 1]
    assert all(b["id"].startswith("kcat-") for b in bodies)
    assert bodies[0]["id"] != bodies[1]["id"]
    assert {b["parameters"]["status"] for b in bodies} == {"OK"}
    scores = [next(o for o in b["outputs"] if o["name"] == "scores")["data"] for b in bodies]
    assert all(len(s) == 3 for s in scores)
    assert scores[0] != scores[1]


def test_without_a_result_the_kcat_example_exits_1_naming_the_request(
    broker: EmbeddedBroker, topics: Topics, kcat_env: dict[str, str]
) -> None:
    done = subprocess.run(
        ["bash", str(SCRIPT), broker.bootstrap_servers, topics.input, "tiny-mlp", "[]", "3"],
        capture_output=True, text=True, timeout=60, env=kcat_env, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    assert "no result for kcat-" in done.stderr
    assert "dlq inspect --id kcat-" in done.stderr
