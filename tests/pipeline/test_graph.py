from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import GraphError
from pipeline.graph import build_graph
from pipeline.loader import load_topology

ROOT = Path(__file__).resolve().parents[2]
TINY = (ROOT / "load" / "topologies" / "tiny-mlp.yaml").read_text()


def _build(tmp_path: Path, text: str) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(text.replace("../../models/", f"{ROOT}/models/"))
    graph = build_graph(load_topology(path, env={}), str(path), tmp_path)
    for model in graph:
        model.close()


def test_the_tiny_topology_builds(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(TINY.replace("../../models/", f"{ROOT}/models/"))
    [model] = build_graph(load_topology(path, env={}), str(path), tmp_path)
    assert len(model.instances) == 1
    assert [s.name for s in model.postprocess] == ["softmax", "topk"]
    assert str(model.outputs["classes"]) == "INT64[3]"
    model.close()


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("tiny_mlp.onnx", "nope.onnx", "models[0].artifact: no such file"),
        (
            "{name: x, datatype: FP32",
            "{name: y, datatype: FP32",
            "the model needs input 'x' FP32[64]; after preprocessing the batch has y FP32[64]",
        ),
        (
            "datatype: FP32, shape: [64]",
            "datatype: FP64, shape: [64]",
            "input 'x' is FP64[64] after preprocessing; the model wants FP32[64]",
        ),
        (
            "{stage: topk, input: probs, k: 3}",
            "{stage: topk, input: probs, k: 11}",
            "models[0].postprocess[1] (topk): topk: k=11 is more than the 10 classes",
        ),
        (
            "{stage: topk, input: probs, k: 3}",
            "{stage: topk, input: prob, k: 3}",
            "postprocess[1] (topk): topk: needs column 'prob'",
        ),
        (
            "{stage: topk, input: probs, k: 3}",
            "{stage: 'no.such.module:Stage'}",
            "postprocess[1].stage: stage 'no.such.module:Stage': cannot import no.such.module",
        ),
        (
            "    postprocess:",
            "    preprocess:\n      - {stage: cast, input: x, datatype: FP64, extra: 1}\n"
            "    postprocess:",
            "models[0].preprocess[0].extra: unknown parameter",
        ),
        ("options: {intra_op_threads: 1}", "options: {threads: 1}", "onnxruntime options"),
    ],
)
def test_graph_errors_name_the_model_and_the_step(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    assert old in TINY
    with pytest.raises(GraphError) as e:
        _build(tmp_path, TINY.replace(old, new))
    assert message in str(e.value)
    assert str(tmp_path / "t.yaml") in str(e.value)


def test_labels_that_do_not_match_the_classes(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("a\nb\n")
    text = TINY.replace(
        "{stage: topk, input: probs, k: 3}",
        f"{{stage: topk, input: probs, k: 2, labels: {tmp_path}/labels.txt}}",
    )
    with pytest.raises(GraphError, match="2 labels for 10 classes"):
        _build(tmp_path, text)
