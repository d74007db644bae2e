from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import GraphError
from pipeline.tensors import TensorSpec
from stages.base import Batch, StageContext
from stages.postprocess.classification import Softmax, SoftmaxParams, TopK, TopKParams


def test_softmax_matches_float64_reference_and_is_stable() -> None:
    x = np.random.default_rng(0).standard_normal((5, 10)).astype(np.float32) * 30
    x[0, 0] = 1e4  # would overflow a naive exp
    out = Softmax(SoftmaxParams(input="logits")).process(Batch(list(range(5)), {"logits": x}))
    ref = np.exp(x.astype(np.float64) - x.max(axis=1, keepdims=True))
    ref /= ref.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(out.columns["logits"], ref, atol=1e-6)


def test_topk_orders_best_first_with_labels(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("zero\none\ntwo\nthree\n\n")
    stage = TopK(TopKParams(input="p", k=3, labels=Path("labels.txt")))
    stage.setup(StageContext("m", base_dir=tmp_path))
    p = np.array([[0.1, 0.5, 0.3, 0.1], [0.7, 0.0, 0.1, 0.2]], np.float32)
    out = stage.process(Batch([0, 1], {"p": p}))
    assert "p" not in out.columns
    assert out.columns["classes"].tolist() == [[1, 2, 0], [0, 3, 2]]
    np.testing.assert_allclose(out.columns["scores"], [[0.5, 0.3, 0.1], [0.7, 0.2, 0.1]])
    assert out.columns["labels"].tolist() == [
        [b"one", b"two", b"zero"],
        [b"zero", b"three", b"two"],
    ]


def test_topk_signature_checks_k_and_label_count(tmp_path: Path) -> None:
    (tmp_path / "l.txt").write_text("a\nb\n")
    stage = TopK(TopKParams(input="p", k=2, labels=tmp_path / "l.txt"))
    stage.setup(StageContext("m"))
    with pytest.raises(GraphError, match="2 labels for 3 classes"):
        stage.signature({"p": TensorSpec("FP32", (3,))})
    with pytest.raises(GraphError, match="k=5 is more than the 3 classes"):
        TopK(TopKParams(input="p", k=5)).signature({"p": TensorSpec("FP32", (3,))})
    with pytest.raises(GraphError, match="cannot read labels"):
        TopK(TopKParams(input="p", labels=Path("missing.txt"))).setup(
            StageContext("m", base_dir=tmp_path)
        )
    assert TopK(TopKParams(input="p", k=2, keep_input=True)).signature(
        {"p": TensorSpec("FP32", (3,))}
    ) == {
        "p": TensorSpec("FP32", (3,)),
        "classes": TensorSpec("INT64", (2,)),
        "scores": TensorSpec("FP32", (2,)),
    }
