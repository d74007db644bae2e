"""A new model version rolled onto running replicas: load, promote, unload, no restart.

Real broker, real tiny ONNX model. The topology serves ``tiny-mlp`` v1 only; v2 is an
artifact the replicas have never seen, loaded into both while they serve under steady
load, shadowed (its answers compared with v1's, never published), promoted, then v1 is
unloaded: every request gets exactly one outcome, those sent before the load from v1 and
those sent after the promotion from v2, and the swap is in the metrics. A replica started
after the swap comes back on v2 alone. Broken artifacts (missing, not a model, another
signature) are refused while v1 keeps serving, and the refusal is visible on /readyz
until the load is withdrawn; a promotion to a refused version is not applied and says
why.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from e2e.kit import (
    MODELS,
    PacedProducer,
    Topics,
    produce_tiny,
    read_all,
    start_background,
    tiny_vectors,
    tiny_version,
    wait_for,
)
from onnx import helper, numpy_helper

from backends.artifacts import artifact_sha256
from pipeline.app import open_topology
from pipeline.config.topology import Topology
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.lifecycle.admin import (
    ControlLog,
    load,
    promote,
    rollback,
    send,
    shadow,
    status_lines,
    unload,
)
from pipeline.tools.demo import BackgroundPipeline
from schemas.codec import AvroCodec

TOPOLOGY = """
kafka: {{bootstrap_servers: embedded, group_id: {group}, consumer: {{session.timeout.ms: 6000}}}}
topics: {{input: [{input}], output: {output}, dead_letter: {dlq}}}
flow: {{commit_interval_ms: 100}}
models:{model}
"""


def _topology(tmp_path: Path, topics: Topics) -> tuple[Path, Topology]:
    path = tmp_path / "one.yaml"
    path.write_text(
        topics.fill(
            TOPOLOGY,
            model=tiny_version("1"),
        )
    )
    return path, open_topology(path).topology


def _traffic(served: BackgroundPipeline) -> Any:
    return served.pipeline.intake.router.traffic["tiny-mlp"]  # type: ignore[union-attr]


def _loads(served: BackgroundPipeline, result: str) -> Any:
    registry = served.pipeline.metrics.registry  # type: ignore[union-attr]
    return registry.get_sample_value(
        "kp_version_loads_total", {"model": "tiny-mlp", "result": result}
    )


def _compared(served: BackgroundPipeline, verdict: str) -> float:
    registry = served.pipeline.metrics.registry  # type: ignore[union-attr]
    labels = {"model": "tiny-mlp@2", "verdict": verdict}
    return registry.get_sample_value("kp_shadow_comparisons_total", labels) or 0.0


def _other_signature(folder: Path) -> Path:
    """A model taking x FP32[64] like tiny-mlp, but answering 5 logits instead of 10."""
    w = numpy_helper.from_array(np.ones((64, 5), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"])],
        "five",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["n", 5])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "five.onnx"
    onnx.save(model, path)
    return path


def test_a_version_rolled_onto_two_serving_replicas_loses_and_repeats_nothing(
    broker: EmbeddedBroker, topics: Topics, tmp_path: Path
) -> None:
    path, topology = _topology(tmp_path, topics)
    v2 = shutil.copy(MODELS / "tiny_mlp.onnx", tmp_path / "tiny_v2.onnx")
    address = broker.bootstrap_servers
    replicas = [start_background(path, broker), start_background(path, broker)]
    late = None
    try:
        wait_for(
            lambda: sum(r.pipeline.health.assignment or 0 for r in replicas) == 4,  # type: ignore[union-attr]
            30,
            "both replicas assigned",
        )
        producer = PacedProducer(broker, topics.input, n=1600, chunk=40, every_s=0.02)
        wait_for(lambda: producer.produced >= 400, 60, "400 requests sent before the load")
        before_load = producer.produced
        sha = artifact_sha256(Path(v2))
        send(topology, address, "tiny-mlp", load(topology, "2", str(v2), sha), "load 2")
        wait_for(lambda: all(_loads(r, "loaded") == 1 for r in replicas), 30, "v2 loaded")
        assert all(set(_traffic(r).keys) == {"1", "2"} for r in replicas)
        assert all(_traffic(r).default == "1" for r in replicas)  # loaded, not promoted
        send(topology, address, "tiny-mlp", shadow("2", 1.0), "shadow 2 1")  # then compared
        wait_for(lambda: all(_compared(r, "same") > 20 for r in replicas), 30, "compared")
        send(topology, address, "tiny-mlp", promote("2"), "promote 2")
        wait_for(lambda: all(_traffic(r).default == "2" for r in replicas), 10, "promoted")
        after_promotion = producer.produced
        send(topology, address, "tiny-mlp", unload(topology, "1"), "unload 1")
        wait_for(lambda: all(_loads(r, "unloaded") == 1 for r in replicas), 30, "v1 unloaded")
        assert all(set(r.pipeline.runtimes) == {"tiny-mlp@2"} for r in replicas)  # type: ignore[union-attr]
        wait_for(lambda: producer.produced >= after_promotion + 400, 60, "400 after")
        produced = producer.finish()
        results = [
            AvroCodec().decode_result(m.value()) for m in read_all(broker, topics.output, produced)
        ]
        extra = list(read_all(broker, topics.output, produced + 1, timeout=2))
        ready = [r.pipeline.health.ready()[0] for r in replicas]  # type: ignore[union-attr]
        differing = [_compared(r, "differs") + _compared(r, "status") for r in replicas]
        late = start_background(path, broker)  # started after the swap: v2 alone, at once
        late_keys = dict(_traffic(late).keys)
    finally:
        for r in [*replicas, *([late] if late else [])]:
            r.stop()

    versions = {r.id: r.model_version for r in results}
    assert len(results) == len(versions) == produced  # nothing lost, nothing repeated
    assert len(extra) == produced
    assert {versions[f"r-{i}"] for i in range(before_load)} == {"1"}
    assert {versions[f"r-{i}"] for i in range(after_promotion, produced)} == {"2"}
    assert ready == [True, True]
    assert late_keys == {"2": "tiny-mlp@2"}
    assert differing == [0.0, 0.0]  # the same model, shadowed: no disagreement


def test_broken_artifacts_are_refused_while_the_live_version_serves(
    broker: EmbeddedBroker, topics: Topics, tmp_path: Path
) -> None:
    path, topology = _topology(tmp_path, topics)
    address = broker.bootstrap_servers
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a model")
    five = _other_signature(tmp_path)
    served = start_background(path, broker)
    try:
        refusals = [
            ("2", str(tmp_path / "missing.onnx"), "no such file"),
            ("3", str(garbage), "garbage.onnx"),
            ("4", str(five), "is not version 1's"),
        ]
        for i, (version, artifact, words) in enumerate(refusals, start=1):
            change = load(topology, version, artifact)
            send(topology, address, "tiny-mlp", change, f"load {version}")
            wait_for(lambda i=i: _loads(served, "failed") == i, 30, f"v{version} refused")
            ready, detail = served.pipeline.health.ready()  # type: ignore[union-attr]
            assert not ready
            assert words in detail["versions_behind"]["tiny-mlp"], detail
        assert set(_traffic(served).keys) == {"1"}
        # The operator sees the refusals in `versions status`, from the replica's own record.
        wait_for(lambda: "refused v4" in _status(topology, address), 10, "the status record")
        status = _status(topology, address)
        assert "serving versions 1, 2, 3, 4: loaded v2" in status
        assert "  replica " in status
        assert "serving 1; v1 (default)" in status
        assert "refused v2: control record #1 (load 2): tiny-mlp v2.artifact: no such" in status
        # A promotion the replica cannot follow is not applied, and says why.
        send(topology, address, "tiny-mlp", promote("4"), "promote 4")
        wait_for(lambda: "v1 (default)" in _behind(served), 10, "promotion unapplied")
        assert "version 4 was refused" in _behind(served)
        assert _traffic(served).default == "1"
        produce_tiny(broker, topics.input, tiny_vectors(40), prefix="s")
        results = [
            AvroCodec().decode_result(m.value()) for m in read_all(broker, topics.output, 40)
        ]
        send(topology, address, "tiny-mlp", rollback, "rollback")
        for version in ("2", "3", "4"):
            send(topology, address, "tiny-mlp", unload(topology, version), f"unload {version}")
        wait_for(lambda: served.pipeline.health.ready()[0], 10, "ready again")  # type: ignore[union-attr]
        wait_for(lambda: "refused" not in _status(topology, address), 10, "refusals gone")
        after = _status(topology, address)
    finally:
        served.stop()
    gone = _status(topology, address)  # a replica that stopped cleanly withdrew its record
    assert "  replica " in after
    assert "  replica " not in gone
    assert {r.model_version for r in results} == {"1"}
    assert all(r.status == "OK" for r in results)


def _status(topology: Topology, address: str) -> str:
    return "\n".join(status_lines(topology, ControlLog.read(topology, address)))


def _behind(served: BackgroundPipeline) -> str:
    behind = served.pipeline.health.versions_behind  # type: ignore[union-attr]
    return str(behind.get("tiny-mlp", ""))
