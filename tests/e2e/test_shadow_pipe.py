"""A shadow version on the real broker: compared per offset, never published.

``tiny-mlp`` v1 is the default; v2 shadows it for every key. With v2 the same model, every
comparison says ``same``; with v2 a perturbed copy (class 0's logit raised by 5 where
``x[0] > 1``), exactly the requests with ``x[0] > 1`` differ, and each comparison names
the topic, partition and offset its live request was read from. The output holds one
result per request, all from v1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from e2e.kit import MODELS, Topics, read_all, start_background, tiny_vectors, tiny_version
from onnx import helper, numpy_helper

from pipeline.app import open_topology
from pipeline.config.topology import KafkaSettings
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.lifecycle.shadow import comparison_topic
from pipeline.tools.traffic import produce_requests, tensor_request
from schemas.codec import AvroCodec

N = 200

TOPOLOGY = """
kafka: {{bootstrap_servers: embedded, group_id: {group}}}
topics: {{input: [{input}], output: {output}, dead_letter: {dlq}}}
versions:
  tiny-mlp: {{default: "1", shadow: {{version: "2"}}}}
models:{one}{two}
"""


def perturbed(folder: Path) -> Path:
    """The tiny model with class 0's logit raised by 5 where x[0] > 1."""
    model = onnx.load(MODELS / "tiny_mlp.onnx")
    graph = model.graph
    graph.output[0].name = "logits_base"
    for node in graph.node:
        node.output[:] = ["logits_base" if o == "logits" else o for o in node.output]
    bump = np.zeros(10, np.float32)
    bump[0] = 5.0
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([0], np.int64), "first"),
            numpy_helper.from_array(np.array([1], np.int64), "second"),
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
            numpy_helper.from_array(np.array(1.0, np.float32), "one"),
            numpy_helper.from_array(bump, "bump"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("Slice", ["x", "first", "second", "axis1"], ["x0"]),
            helper.make_node("Greater", ["x0", "one"], ["over"]),
            helper.make_node("Cast", ["over"], ["overf"], to=onnx.TensorProto.FLOAT),
            helper.make_node("Mul", ["overf", "bump"], ["raise"]),
            helper.make_node("Add", ["logits_base", "raise"], ["logits"]),
        ]
    )
    graph.output[0].name = "logits"
    onnx.checker.check_model(model)
    path = folder / "tiny_perturbed.onnx"
    onnx.save(model, path)
    return path


def _serve(
    broker: EmbeddedBroker, topics: Topics, tmp_path: Path, v2: Path | None
) -> tuple[Any, list[Any], list[dict[str, Any]]]:
    two = tiny_version("2")
    if v2 is not None:
        two = two.replace(f"{MODELS}/tiny_mlp.onnx", str(v2))
    path = tmp_path / "shadow.yaml"
    path.write_text(
        topics.fill(
            TOPOLOGY,
            one=tiny_version("1"),
            two=two,
        )
    )
    codec = AvroCodec()
    x = tiny_vectors(N, seed=11)
    requests = [tensor_request(f"s{i}", "tiny-mlp", {"x": x[i]}) for i in range(N)]
    produce_requests(
        KafkaSettings(),
        broker.bootstrap_servers,
        topics.input,
        ((r.id.encode(), codec.encode_request(r)) for r in requests),
    )
    served = start_background(path, broker)
    try:
        results = [codec.decode_result(m.value()) for m in read_all(broker, topics.output, N)]
        topic = comparison_topic(open_topology(path).topology)
        comparisons = [json.loads(m.value()) for m in read_all(broker, topic, N)]
    finally:
        served.stop()
    return x, results, comparisons


def test_a_shadow_of_the_same_model_agrees_on_every_request(
    broker: EmbeddedBroker, topics: Topics, tmp_path: Path
) -> None:
    _, results, comparisons = _serve(broker, topics, tmp_path, None)
    assert sorted(r.id for r in results) == sorted(f"s{i}" for i in range(N))
    assert {r.model_version for r in results} == {"1"}  # the shadow publishes nothing
    assert len(comparisons) == N
    assert {c["verdict"] for c in comparisons} == {"same"}


def test_a_perturbed_shadow_differs_exactly_where_it_was_perturbed(
    broker: EmbeddedBroker, topics: Topics, tmp_path: Path
) -> None:
    x, results, comparisons = _serve(broker, topics, tmp_path, perturbed(tmp_path))
    by_id = {r.id: r for r in results}
    assert len(by_id) == N
    assert {r.model_version for r in results} == {"1"}
    differ = {c["id"] for c in comparisons if c["verdict"] == "differs"}
    assert differ == {f"s{i}" for i in range(N) if x[i, 0] > 1.0}
    assert 0 < len(differ) < N
    for c in comparisons:  # each comparison points at its live request
        live = by_id[c["id"]]
        assert (c["topic"], c["partition"], c["offset"]) == (
            topics.input,
            live.partition,
            live.offset,
        )
        assert (c["live"], c["shadow"]) == ("1", "2")
