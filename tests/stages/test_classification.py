"""Softmax, top-k, argmax and threshold against references; label files; signature checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from schemas.errors import GraphError
from schemas.tensors import TensorSpec
from stages.base import Batch, StageContext
from stages.postprocess.classification import (
    Argmax,
    ArgmaxParams,
    Softmax,
    SoftmaxParams,
    Threshold,
    ThresholdParams,
    TopK,
    TopKParams,
    load_labels,
)


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


# -- argmax -----------------------------------------------------------------------------


def _argmax(x: np.ndarray, **params: object) -> Batch:
    stage = Argmax(ArgmaxParams(input="p", **params))  # type: ignore[arg-type]
    return stage.process(Batch(list(range(len(x))), {"p": x}))


@given(
    hnp.arrays(
        st.sampled_from([np.float16, np.float32, np.float64]),
        st.tuples(st.integers(1, 5), st.integers(1, 30)),
        elements=st.integers(-3, 3).map(float),  # small integers: many ties
    )
)
@settings(max_examples=200)
def test_argmax_matches_a_row_by_row_reference_with_ties_to_the_lowest_index(
    x: np.ndarray,
) -> None:
    out = _argmax(x)
    assert set(out.columns) == {"class", "score"}
    classes, scores = out.columns["class"], out.columns["score"]
    assert classes.dtype == np.int64
    assert scores.dtype == np.float32
    assert classes.shape == scores.shape == (len(x),)
    for row, cls, score in zip(x, classes, scores, strict=True):
        best = max(row.tolist())
        assert cls == row.tolist().index(best)  # the first of the best
        assert score == best


def test_argmax_labels_follow_the_class_and_the_input_can_stay(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("cat\ndog\nfox\n")
    stage = Argmax(ArgmaxParams(input="p", labels=Path("labels.txt"), keep_input=True))
    stage.setup(StageContext("m", base_dir=tmp_path))
    p = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3], [0.0, 0.0, 1.0]], np.float32)
    out = stage.process(Batch([0, 1, 2], {"p": p}))
    assert set(out.columns) == {"p", "class", "score", "label"}
    assert out.columns["p"] is p
    assert out.columns["class"].tolist() == [1, 0, 2]
    assert out.columns["label"].tolist() == [b"dog", b"cat", b"fox"]
    np.testing.assert_array_equal(out.columns["score"], np.array([0.7, 0.5, 1.0], np.float32))
    assert stage.signature({"p": TensorSpec("FP32", (3,))}) == {
        "p": TensorSpec("FP32", (3,)),
        "class": TensorSpec("INT64", ()),
        "score": TensorSpec("FP32", ()),
        "label": TensorSpec("BYTES", ()),
    }


def test_argmax_rejects_rows_with_a_nan_score_and_keeps_the_rest() -> None:
    p = np.array([[0.1, 0.9], [np.nan, 0.2], [0.8, 0.2], [np.nan, np.nan]], np.float32)
    out = _argmax(p, class_output="c", score_output="s")
    assert out.rows == [0, 2]
    assert out.columns["c"].tolist() == [1, 0]
    assert out.rejected == [(1, "nan_score", "1 NaN scores"), (3, "nan_score", "2 NaN scores")]


def test_argmax_rejects_every_row_when_a_free_class_count_misses_the_labels(
    tmp_path: Path,
) -> None:
    (tmp_path / "l.txt").write_text("a\nb\n")
    stage = Argmax(ArgmaxParams(input="p", labels=tmp_path / "l.txt"))
    stage.setup(StageContext("m"))
    assert "label" in stage.signature({"p": TensorSpec("FP32", (None,))})
    out = stage.process(Batch([0, 1], {"p": np.zeros((2, 3), np.float32)}))
    assert out.rows == []
    assert out.rejected == [
        (0, "class_count", "3 classes but 2 labels"),
        (1, "class_count", "3 classes but 2 labels"),
    ]


def test_argmax_signature_errors(tmp_path: Path) -> None:
    (tmp_path / "l.txt").write_text("a\nb\n")
    stage = Argmax(ArgmaxParams(input="p", labels=tmp_path / "l.txt"))
    stage.setup(StageContext("m"))
    with pytest.raises(GraphError, match="argmax: 2 labels for 3 classes in 'p'"):
        stage.signature({"p": TensorSpec("FP32", (3,))})
    plain = Argmax(ArgmaxParams(input="p"))
    with pytest.raises(GraphError, match=r"argmax: 'p' must be a float vector per row, got INT64"):
        plain.signature({"p": TensorSpec("INT64", (3,))})
    with pytest.raises(GraphError, match=r"argmax: 'p' must be a float vector per row, got FP32\["):
        plain.signature({"p": TensorSpec("FP32", (3, 2))})
    with pytest.raises(GraphError, match="argmax: needs column 'p', but the batch has q FP32"):
        plain.signature({"q": TensorSpec("FP32", (3,))})
    with pytest.raises(GraphError, match="argmax: cannot read labels"):
        Argmax(ArgmaxParams(input="p", labels=Path("nope.txt"))).setup(
            StageContext("m", base_dir=tmp_path)
        )


# -- threshold --------------------------------------------------------------------------


def _threshold(x: np.ndarray, **params: object) -> Batch:
    stage = Threshold(ThresholdParams(input="p", **params))  # type: ignore[arg-type]
    return stage.process(Batch(list(range(len(x))), {"p": x}))


def _passing(row: np.ndarray, t: list[float]) -> list[int]:
    """The classes at or above their threshold, best first, ties by index (the reference)."""
    scores = [float(np.float32(s)) for s in row.tolist()]
    chosen = [c for c in range(len(scores)) if scores[c] >= float(np.float32(t[c]))]
    return sorted(chosen, key=lambda c: (-scores[c], c))


_SCORES = hnp.arrays(
    np.float32,
    st.tuples(st.integers(1, 5), st.integers(1, 20)),
    elements=st.integers(0, 8).map(lambda i: i / 8),  # exact in float32, with ties
)


@given(_SCORES, st.data())
@settings(max_examples=200)
def test_threshold_mask_matches_a_row_by_row_reference(x: np.ndarray, data: st.DataObject) -> None:
    n = x.shape[1]
    per_class = data.draw(st.booleans())
    t = data.draw(st.lists(st.integers(0, 8).map(lambda i: i / 8), min_size=n, max_size=n))
    threshold: float | list[float] = t if per_class else t[0]
    datatype = data.draw(st.sampled_from(["BOOL", "UINT8", "INT32", "INT64"]))
    out = _threshold(x, threshold=threshold, mask_datatype=datatype)
    assert set(out.columns) == {"mask"}
    mask = out.columns["mask"]
    assert mask.dtype == np.dtype(datatype.lower().replace("bool", "bool_"))
    thresholds = t if per_class else [t[0]] * n
    for row, got in zip(x, mask, strict=True):
        assert sorted(np.flatnonzero(got).tolist()) == sorted(_passing(row, thresholds))


@given(_SCORES, st.data())
@settings(max_examples=200)
def test_threshold_classes_match_a_row_by_row_reference(x: np.ndarray, data: st.DataObject) -> None:
    n = x.shape[1]
    t = data.draw(st.integers(0, 8).map(lambda i: i / 8))
    k = data.draw(st.one_of(st.none(), st.integers(1, 25)))
    out = _threshold(x, threshold=t, format="classes", max_classes=k)
    width = k or n
    classes, scores, count = out.columns["classes"], out.columns["scores"], out.columns["count"]
    assert set(out.columns) == {"classes", "scores", "count"}
    assert classes.shape == scores.shape == (len(x), width)
    assert (classes.dtype, scores.dtype, count.dtype) == (np.int64, np.float32, np.int64)
    for row, cls, sc, c in zip(x, classes, scores, count, strict=True):
        want = _passing(row, [t] * n)[:width]
        assert c == len(want)
        assert cls.tolist() == want + [-1] * (width - len(want))
        np.testing.assert_array_equal(sc[: len(want)], row[want])
        assert np.isnan(sc[len(want) :]).all()


def test_threshold_classes_with_labels_and_per_class_thresholds(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("cat\ndog\nfox\n")
    stage = Threshold(
        ThresholdParams(
            input="p",
            threshold=[0.5, 0.9, 0.1],
            format="classes",
            labels=Path("labels.txt"),
            max_classes=2,
        )
    )
    stage.setup(StageContext("m", base_dir=tmp_path))
    p = np.array([[0.6, 0.8, 0.2], [0.1, 0.95, 0.05], [0.7, 0.9, 0.3]], np.float32)
    out = stage.process(Batch([0, 1, 2], {"p": p}))
    assert out.columns["classes"].tolist() == [[0, 2], [1, -1], [1, 0]]  # dog 0.8 < 0.9
    assert out.columns["labels"].tolist() == [[b"cat", b"fox"], [b"dog", b""], [b"dog", b"cat"]]
    assert out.columns["count"].tolist() == [2, 1, 2]  # row 2 had three, max_classes is 2
    assert out.columns["scores"][0].tolist() == pytest.approx([0.6, 0.2])
    assert stage.signature({"p": TensorSpec("FP32", (3,))}) == {
        "classes": TensorSpec("INT64", (2,)),
        "scores": TensorSpec("FP32", (2,)),
        "labels": TensorSpec("BYTES", (2,)),
        "count": TensorSpec("INT64", ()),
    }


def test_threshold_compares_at_the_boundary_inclusively_in_float32() -> None:
    p = np.array([[0.7, 0.6]], np.float32)  # float32(0.7) < 0.7, but equals it in float32
    assert _threshold(p, threshold=0.7).columns["mask"].tolist() == [[True, False]]
    assert _threshold(p, threshold=[0.7, 0.6]).columns["mask"].tolist() == [[True, True]]
    assert _threshold(p, threshold=0.70001).columns["mask"].tolist() == [[False, False]]


def test_threshold_rejects_rows_with_a_nan_score() -> None:
    p = np.array([[0.9, np.nan], [0.9, 0.1]], np.float32)
    out = _threshold(p, threshold=0.5, format="classes", keep_input=True)
    assert out.rows == [1]
    np.testing.assert_array_equal(out.columns["p"], np.array([[0.9, 0.1]], np.float32))
    assert out.columns["classes"].tolist() == [[0, -1]]
    assert out.rejected == [(0, "nan_score", "1 NaN scores")]


def test_threshold_rejects_every_row_when_a_free_class_count_misses_the_thresholds() -> None:
    stage = Threshold(ThresholdParams(input="p", threshold=[0.5, 0.5]))
    assert stage.signature({"p": TensorSpec("FP32", (None,))}) == {
        "mask": TensorSpec("BOOL", (None,))
    }
    out = stage.process(Batch([0, 1], {"p": np.zeros((2, 3), np.float32)}))
    assert out.rows == []
    assert [r[:2] for r in out.rejected] == [(0, "class_count"), (1, "class_count")]


def test_threshold_signature_errors(tmp_path: Path) -> None:
    with pytest.raises(GraphError, match="threshold: 2 thresholds for 3 classes in 'p'"):
        Threshold(ThresholdParams(input="p", threshold=[0.1, 0.2])).signature(
            {"p": TensorSpec("FP32", (3,))}
        )
    (tmp_path / "l.txt").write_text("a\nb\n")
    stage = Threshold(
        ThresholdParams(input="p", threshold=0.5, format="classes", labels=tmp_path / "l.txt")
    )
    stage.setup(StageContext("m"))
    with pytest.raises(GraphError, match="threshold: 2 labels for 3 classes in 'p'"):
        stage.signature({"p": TensorSpec("FP32", (3,))})
    plain = Threshold(ThresholdParams(input="p", threshold=0.5))
    with pytest.raises(GraphError, match="threshold: 'p' must be a float vector per row"):
        plain.signature({"p": TensorSpec("INT32", (3,))})
    with pytest.raises(GraphError, match="threshold: 'p' must be a float vector per row"):
        plain.signature({"p": TensorSpec("FP32", ())})
    with pytest.raises(GraphError, match="threshold: needs column 'p'"):
        plain.signature({"q": TensorSpec("FP32", (3,))})


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"threshold": float("nan")}, "threshold: a threshold is NaN"),
        ({"threshold": []}, "threshold: an empty list of thresholds"),
        ({"threshold": 0.5, "max_classes": 3}, "labels and max_classes need format: classes"),
        ({"threshold": 0.5, "labels": "l.txt"}, "labels and max_classes need format: classes"),
    ],
)
def test_threshold_refuses_unusable_parameters(params: dict[str, object], message: str) -> None:
    with pytest.raises(GraphError, match=message):
        Threshold(ThresholdParams.model_validate({"input": "p", **params}))


def test_threshold_params_are_validated() -> None:
    with pytest.raises(ValueError, match="'mask' or 'classes'"):
        ThresholdParams.model_validate({"input": "p", "threshold": 0.5, "format": "list"})
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        ThresholdParams.model_validate({"input": "p", "threshold": 0.5, "k": 3})
