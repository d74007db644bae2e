"""Being worker I of a group: its own replica id, transactional id and loopback endpoints."""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.app import OpenTopology
from pipeline.config.topology import Topology
from pipeline.workers.launch import as_worker, worker_argv

ROOT = Path(__file__).resolve().parents[3]


def _opened(transactional_id: str | None) -> OpenTopology:
    kafka: dict[str, object] = {"bootstrap_servers": "k:9092", "group_id": "g"}
    if transactional_id:
        kafka["transactional_id"] = transactional_id
    topology = Topology.model_validate(
        {
            "kafka": kafka,
            "topics": {"input": ["in"], "output": "out", "dead_letter": "dlq"},
            "models": [
                {
                    "name": "m",
                    "backend": "onnxruntime",
                    "artifact": "m.onnx",
                    "inputs": [{"name": "x", "datatype": "FP32", "shape": [4]}],
                }
            ],
        }
    )
    return OpenTopology(topology, "t.yaml", ROOT)


def test_each_worker_has_its_own_names_and_serves_its_endpoints_on_loopback() -> None:
    opened = _opened(None)
    ones = [as_worker(opened, i, "pod-7") for i in range(2)]
    assert [name for _, name in ones] == ["pod-7-w0", "pod-7-w1"]
    assert {o.topology.metrics.host for o, _ in ones} == {"127.0.0.1"}
    assert opened.topology.metrics.host == "0.0.0.0"  # the group's port stays public
    assert ones[0][0].topology.kafka.transactional_id is None  # derived from the replica id


def test_a_configured_transactional_id_gets_the_workers_suffix() -> None:
    opened = _opened("payments-eos")
    ids = [as_worker(opened, i, None)[0].topology.kafka.transactional_id for i in range(2)]
    assert ids == ["payments-eos-w0", "payments-eos-w1"]


def test_the_worker_command_is_the_same_command_with_its_index_and_port() -> None:
    argv = worker_argv(["run", "t.yaml", "--bootstrap", "k:1"], 1, 4567, verbose=True)
    assert argv == [
        sys.executable, "-m", "pipeline.cli", "-v", "run", "t.yaml", "--bootstrap", "k:1",
        "--worker", "1", "--metrics-port", "4567",
    ]  # fmt: skip
    assert "--metrics-port" not in worker_argv(["run"], 0, None, verbose=False)
