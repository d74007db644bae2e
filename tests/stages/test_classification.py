"""Softmax and top-k against float64 references; label files; signature checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline.errors import GraphError
from pipeline.tensors import TensorSpec
from stages.base import Batch, StageContext
from stages.postprocess.classification import Softmax, SoftmaxParams, TopK, TopKParams, load_labels


def _softmax64(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _topk(x: np.ndarray, k: int, **params: object) -> Batch:
    stage = TopK(TopKParams(input="p", k=k, **params))  # type: ignore[arg-type]
    return stage.process(Batch(list(range(len(x))), {"p": x}))


def test_softmax_matches_float64_reference_and_is_stable() -> None:
    x = np.random.default_rng(0).standard_normal((5, 10)).astype(np.float32) * 30
    x[0, 0] = 1e4  # would overflow a naive exp
    x[1] = -1e4
    out = Softmax(SoftmaxParams(input="logits")).process(Batch(list(range(5)), {"logits": x}))
    y = out.columns["logits"]
    assert y.dtype == np.float32
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, _softmax64(x), rtol=0, atol=1e-6)
    np.testing.assert_allclose(y.sum(axis=1), 1.0, atol=1e-6)


@given(
    hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 4), st.integers(1, 50)),
        elements=st.floats(-50, 50, width=32),
    )
)
@settings(max_examples=100)
def test_softmax_matches_float64_reference_for_any_logits(x: np.ndarray) -> None:
    out = Softmax(SoftmaxParams(input="l")).process(Batch(list(range(len(x))), {"l": x}))
    np.testing.assert_allclose(out.columns["l"], _softmax64(x), rtol=0, atol=1e-6)


def test_softmax_accepts_half_and_double_and_writes_another_column() -> None:
    x = np.array([[1.0, 2.0, 3.0]], np.float16)
    out = Softmax(SoftmaxParams(input="l", output="p")).process(
        Batch([0], {"l": x, "keep": np.zeros(1)})
    )
    assert set(out.columns) == {"p", "keep"}
    assert out.columns["p"].dtype == np.float32
    np.testing.assert_allclose(out.columns["p"], _softmax64(x), atol=1e-6)
    spec = Softmax(SoftmaxParams(input="l", output="p")).signature({"l": TensorSpec("FP64", (3,))})
    assert spec == {"p": TensorSpec("FP32", (3,))}


@pytest.mark.parametrize(
    "spec", [TensorSpec("INT64", (10,)), TensorSpec("FP32", (2, 5)), TensorSpec("FP32", ())]
)
def test_softmax_signature_wants_a_float_vector(spec: TensorSpec) -> None:
    with pytest.raises(
        GraphError,
        match=f"softmax: 'l' must be a float vector per row, got {spec}".replace("[", r"\["),
    ):
        Softmax(SoftmaxParams(input="l")).signature({"l": spec})


def test_topk_orders_best_first() -> None:
    p = np.array([[0.1, 0.5, 0.3, 0.05, 0.05], [0.7, 0.0, 0.1, 0.2, -1.0]], np.float32)
    out = _topk(p, 3)
    assert set(out.columns) == {"classes", "scores"}
    assert out.columns["classes"].dtype == np.int64
    assert out.columns["classes"].tolist() == [[1, 2, 0], [0, 3, 2]]
    assert out.columns["scores"].dtype == np.float32
    np.testing.assert_array_equal(
        out.columns["scores"], np.array([[0.5, 0.3, 0.1], [0.7, 0.2, 0.1]], np.float32)
    )


def test_topk_with_k_equal_to_the_class_count_sorts_everything() -> None:
    p = np.array([[3.0, -1.0, 2.0, 10.0]], np.float32)
    out = _topk(p, 4)
    assert out.columns["classes"].tolist() == [[3, 0, 2, 1]]
    assert _topk(p, 1).columns["classes"].tolist() == [[3]]


@given(
    hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 5), st.integers(1, 30)),
        elements=st.integers(-3, 3).map(float),
    ),
    st.data(),
)
@settings(max_examples=200)
def test_topk_picks_the_k_best_scores_best_first_even_with_ties(
    x: np.ndarray, data: st.DataObject
) -> None:
    k = data.draw(st.integers(1, x.shape[1]))
    out = _topk(x, k)
    classes, scores = out.columns["classes"], out.columns["scores"]
    assert classes.shape == scores.shape == (len(x), k)
    for row, cls, sc in zip(x, classes, scores, strict=True):
        assert len(set(cls.tolist())) == k  # no class twice
        np.testing.assert_array_equal(sc, row[cls])  # scores belong to their classes
        np.testing.assert_array_equal(sc, np.sort(row)[::-1][:k])  # the k best, best first


def test_topk_of_an_all_equal_row_returns_distinct_classes() -> None:
    out = _topk(np.ones((1, 10), np.float32), 5)
    classes = out.columns["classes"][0].tolist()
    assert len(set(classes)) == 5
    assert set(classes) <= set(range(10))
    assert out.columns["scores"].tolist() == [[1.0] * 5]


def test_topk_keeps_its_input_when_asked_and_names_outputs() -> None:
    p = np.array([[0.2, 0.8]], np.float32)
    out = _topk(p, 1, keep_input=True, classes_output="c", scores_output="s")
    assert set(out.columns) == {"p", "c", "s"}
    assert out.columns["p"] is p
    assert out.columns["c"].tolist() == [[1]]


def test_topk_labels_follow_the_classes(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("zero\none\ntwo\nthree\n\n\n")
    stage = TopK(TopKParams(input="p", k=3, labels=Path("labels.txt")))
    stage.setup(StageContext("m", base_dir=tmp_path))  # relative to the topology's folder
    p = np.array([[0.1, 0.5, 0.3, 0.1], [0.7, 0.0, 0.1, 0.2]], np.float32)
    out = stage.process(Batch([0, 1], {"p": p}))
    assert out.columns["labels"].tolist() == [
        [b"one", b"two", b"zero"],
        [b"zero", b"three", b"two"],
    ]
    assert stage.signature({"p": TensorSpec("FP32", (4,))})["labels"] == TensorSpec("BYTES", (3,))


def test_load_labels_keeps_inner_blank_lines_and_drops_trailing_ones(tmp_path: Path) -> None:
    path = tmp_path / "l.txt"
    path.write_text("a\n\nc  \n \n\n", encoding="utf-8")
    assert load_labels(path) == ["a", "", "c  "]
    path.write_text("ünïcode\r\nb", encoding="utf-8")
    assert load_labels(path) == ["ünïcode", "b"]


def test_topk_signature_checks_k_and_label_count(tmp_path: Path) -> None:
    (tmp_path / "l.txt").write_text("a\nb\n")
    stage = TopK(TopKParams(input="p", k=2, labels=tmp_path / "l.txt"))
    stage.setup(StageContext("m"))
    with pytest.raises(GraphError, match="topk: 2 labels for 3 classes in 'p'"):
        stage.signature({"p": TensorSpec("FP32", (3,))})
    assert set(stage.signature({"p": TensorSpec("FP32", (2,))})) == {"classes", "scores", "labels"}
    with pytest.raises(GraphError, match="topk: k=5 is more than the 3 classes of 'p'"):
        TopK(TopKParams(input="p", k=5)).signature({"p": TensorSpec("FP32", (3,))})
    with pytest.raises(GraphError, match="must be a float vector"):
        TopK(TopKParams(input="p")).signature({"p": TensorSpec("INT32", (10,))})
    with pytest.raises(GraphError, match="needs column 'p'"):
        TopK(TopKParams(input="p")).signature({"q": TensorSpec("FP32", (10,))})


def test_topk_signature_with_a_free_class_count_defers_the_check() -> None:
    spec = TopK(TopKParams(input="p", k=5)).signature({"p": TensorSpec("FP32", (None,))})
    assert spec == {"classes": TensorSpec("INT64", (5,)), "scores": TensorSpec("FP32", (5,))}


def test_missing_label_file_is_a_graph_error(tmp_path: Path) -> None:
    stage = TopK(TopKParams(input="p", labels=Path("missing.txt")))
    with pytest.raises(GraphError, match=f"topk: cannot read labels {tmp_path / 'missing.txt'}"):
        stage.setup(StageContext("m", base_dir=tmp_path))


def test_k_must_be_positive() -> None:
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        TopKParams(input="p", k=0)
