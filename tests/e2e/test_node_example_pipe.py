"""The Node.js example (examples/node, kafkajs from the npm registry) against a real pipeline.

Node sends v2 JSON requests with a content-type header and a reply topic of its own, and
reads the JSON results back: the README's "other languages" path, run as written.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from e2e.kit import ROOT, Topics, start_background

from pipeline.kafka.broker import EmbeddedBroker

EXAMPLE = ROOT / "examples" / "node"


@pytest.fixture(scope="module")
def node_example() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("node and npm are needed (Debian: apt-get install nodejs npm)")
    if not (EXAMPLE / "node_modules" / "kafkajs").exists():
        done = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"],
            cwd=EXAMPLE, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
    return EXAMPLE


def test_the_node_example_gets_a_result_for_every_request(
    broker: EmbeddedBroker, topics: Topics, tiny_topology: Path, node_example: Path
) -> None:
    served = start_background(tiny_topology, broker)
    try:
        done = subprocess.run(
            ["node", "infer.js", broker.bootstrap_servers, topics.input, "tiny-mlp", "25"],
            cwd=node_example, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    finally:
        served.stop()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    *results, summary = lines
    assert (summary["sent"], summary["results"]) == (25, 25)
    assert sorted(r["id"] for r in results) == sorted(f"node-{i}" for i in range(25))
    assert {r["status"] for r in results} == {"OK"}
    assert all(len(r["scores"]) == 3 for r in results)
