"""Mean, CLS pooling and L2 normalisation against row-by-row NumPy references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from schemas.errors import GraphError
from schemas.tensors import TensorSpec
from stages.base import Batch
from stages.postprocess.embedding import (
    ClsPool,
    ClsPoolParams,
    L2Normalize,
    L2NormalizeParams,
    MeanPool,
    MeanPoolParams,
)


def _mean_pool(emb: np.ndarray, mask: np.ndarray, **params: object) -> Batch:
    stage = MeanPool(MeanPoolParams(**params))  # type: ignore[arg-type]
    columns = {"last_hidden_state": emb, "attention_mask": mask}
    return stage.process(Batch(list(range(len(emb))), columns))  # type: ignore[arg-type]


def _mean_reference(emb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """One row, in float64: the mean of the real tokens, zeros when there are none."""
    real = emb.astype(np.float64)[mask.astype(bool)]
    return real.mean(axis=0) if len(real) else np.zeros(emb.shape[1])


@st.composite
def _tokens(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    rows, tokens, dim = draw(st.integers(1, 4)), draw(st.integers(1, 12)), draw(st.integers(1, 8))
    emb = draw(hnp.arrays(np.float32, (rows, tokens, dim), elements=st.floats(-100, 100, width=32)))
    mask = draw(hnp.arrays(np.int64, (rows, tokens), elements=st.integers(0, 1)))
    return emb, mask


@given(_tokens(), st.sampled_from([np.int64, np.int32, np.bool_]))
@settings(max_examples=200)
def test_mean_pool_matches_a_row_by_row_reference_for_any_mask(
    case: tuple[np.ndarray, np.ndarray], mask_dtype: type
) -> None:
    emb, mask = case
    out = _mean_pool(emb, mask.astype(mask_dtype))
    assert set(out.columns) == {"embedding"}
    pooled = out.columns["embedding"]
    assert pooled.dtype == np.float32
    assert pooled.shape == (len(emb), emb.shape[2])
    for e, m, got in zip(emb, mask, pooled, strict=True):
        np.testing.assert_allclose(got, _mean_reference(e, m), rtol=1e-5, atol=1e-4)


@given(
    st.lists(st.integers(1, 16), min_size=1, max_size=6),
    st.integers(0, 8),
    st.integers(1, 16),
    st.integers(0, 2**32 - 1),
)
@settings(max_examples=100)
def test_mean_pool_of_a_padded_batch_equals_pooling_each_row_alone(
    lengths: list[int], extra: int, dim: int, seed: int
) -> None:
    """The property the text pipeline relies on: padding never changes a row's embedding."""
    rng = np.random.default_rng(seed)
    rows = [rng.standard_normal((n, dim)).astype(np.float32) for n in lengths]
    seq = max(lengths) + extra
    # Padding positions hold what a model may leave there: large values, inf and NaN.
    emb = rng.standard_normal((len(rows), seq, dim)).astype(np.float32) * 1e6
    emb[:, -1:, :1] = np.nan if extra else emb[:, -1:, :1]
    mask = np.zeros((len(rows), seq), np.int64)
    for i, row in enumerate(rows):
        emb[i, : len(row)] = row
        mask[i, : len(row)] = 1
    batched = _mean_pool(emb, mask).columns["embedding"]
    for row, got in zip(rows, batched, strict=True):
        alone = _mean_pool(row[None], np.ones((1, len(row)), np.int64)).columns["embedding"][0]
        np.testing.assert_array_equal(got, alone)  # bit for bit
        np.testing.assert_allclose(got, row.astype(np.float64).mean(axis=0), rtol=1e-6, atol=1e-7)


def test_mean_pool_of_a_row_without_real_tokens_is_zero_like_sentence_transformers() -> None:
    emb = np.ones((2, 3, 2), np.float32)
    out = _mean_pool(emb, np.array([[0, 0, 0], [1, 1, 0]]))
    assert out.columns["embedding"].tolist() == [[0.0, 0.0], [1.0, 1.0]]
    assert out.rejected == []


def test_mean_pool_rejects_non_binary_masks_and_nan_at_real_tokens() -> None:
    emb = np.ones((4, 3, 2), np.float32)
    emb[1, 0, 1] = np.nan  # a real token: the embedding is NaN
    emb[2, 2, 0] = np.inf  # a padding token: never read
    mask = np.array([[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 2, 0]])
    out = _mean_pool(emb, mask)
    assert out.rows == [0, 2]
    assert out.columns["embedding"].tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert out.rejected == [
        (1, "non_finite", "1 embedding elements are NaN or infinite"),
        (3, "bad_mask", "attention mask values other than 0 and 1"),
    ]


def test_mean_pool_rejects_every_row_when_mask_and_tokens_differ_in_length() -> None:
    out = _mean_pool(np.ones((2, 4, 3), np.float32), np.ones((2, 5), np.int64))
    assert out.rows == []
    assert out.rejected[0] == (0, "bad_mask", "mask [5] does not match embeddings [4, 3]")


def test_mean_pool_names_its_columns_and_can_keep_its_inputs() -> None:
    emb, mask = np.ones((1, 2, 3), np.float32), np.ones((1, 2), np.int32)
    stage = MeanPool(
        MeanPoolParams(input="tok", mask="m", output="v", keep_input=True, keep_mask=True)
    )
    out = stage.process(Batch([0], {"tok": emb, "m": mask, "other": np.zeros(1)}))
    assert set(out.columns) == {"tok", "m", "v", "other"}
    specs = {"tok": TensorSpec("FP16", (None, 384)), "m": TensorSpec("INT32", (None,))}
    assert stage.signature(specs) == {**specs, "v": TensorSpec("FP32", (384,))}
    default = MeanPool(MeanPoolParams())
    specs = {
        "last_hidden_state": TensorSpec("FP32", (128, 384)),
        "attention_mask": TensorSpec("INT64", (128,)),
        "input_ids": TensorSpec("INT64", (128,)),
    }
    assert default.signature(specs) == {
        "input_ids": TensorSpec("INT64", (128,)),
        "embedding": TensorSpec("FP32", (384,)),
    }


@pytest.mark.parametrize(
    ("emb", "mask", "message"),
    [
        (
            TensorSpec("INT64", (8, 4)),
            TensorSpec("INT64", (8,)),
            r"'e' must be float \[tokens, dim\]",
        ),
        (TensorSpec("FP32", (4,)), TensorSpec("INT64", (8,)), r"'e' must be float \[tokens, dim\]"),
        (
            TensorSpec("FP32", (8, 4)),
            TensorSpec("FP32", (8,)),
            "mask 'm' must be INT64, INT32 or BOOL",
        ),
        (
            TensorSpec("FP32", (8, 4)),
            TensorSpec("INT64", (1, 8)),
            r"mask 'm' must be .* \[tokens\] per row, got INT64\[1,8\]",
        ),
        (
            TensorSpec("FP32", (8, 4)),
            TensorSpec("INT64", (9,)),
            "mask 'm' has 9 tokens but 'e' has 8",
        ),
    ],
)
def test_mean_pool_signature_errors(emb: TensorSpec, mask: TensorSpec, message: str) -> None:
    stage = MeanPool(MeanPoolParams(input="e", mask="m"))
    with pytest.raises(GraphError, match=f"mean_pool: {message}"):
        stage.signature({"e": emb, "m": mask})


def test_mean_pool_signature_names_a_missing_mask_column() -> None:
    stage = MeanPool(MeanPoolParams())
    with pytest.raises(
        GraphError,
        match=r"mean_pool: needs column 'attention_mask', but the batch has last_hidden_state",
    ):
        stage.signature({"last_hidden_state": TensorSpec("FP32", (None, 8))})
    with pytest.raises(GraphError, match="mean_pool: needs column 'last_hidden_state'"):
        stage.signature({"attention_mask": TensorSpec("INT64", (None,))})
    free = stage.signature(
        {
            "last_hidden_state": TensorSpec("FP32", (None, 8)),
            "attention_mask": TensorSpec("INT64", (None,)),
        }
    )
    assert free == {"embedding": TensorSpec("FP32", (8,))}


# -- cls_pool ---------------------------------------------------------------------------


@given(_tokens())
@settings(max_examples=50)
def test_cls_pool_takes_the_first_token_of_each_row(case: tuple[np.ndarray, np.ndarray]) -> None:
    emb, _ = case
    out = ClsPool(ClsPoolParams()).process(Batch(list(range(len(emb))), {"last_hidden_state": emb}))
    assert set(out.columns) == {"embedding"}
    for row, got in zip(emb, out.columns["embedding"], strict=True):
        np.testing.assert_array_equal(got, row[0])
    assert not np.shares_memory(out.columns["embedding"], emb)


def test_cls_pool_rejects_a_non_finite_first_token_and_keeps_its_input_on_request() -> None:
    emb = np.zeros((2, 3, 2), np.float16)
    emb[0, 0, 1] = np.nan
    emb[1, 1, 1] = np.nan  # not the first token: irrelevant
    stage = ClsPool(ClsPoolParams(input="h", output="cls", keep_input=True))
    out = stage.process(Batch([0, 1], {"h": emb}))
    assert out.rows == [1]
    assert out.columns["cls"].dtype == np.float32
    assert out.columns["h"].shape == (1, 3, 2)
    assert out.rejected == [(0, "non_finite", "1 embedding elements are NaN or infinite")]


def test_cls_pool_signature() -> None:
    stage = ClsPool(ClsPoolParams())
    specs = {"last_hidden_state": TensorSpec("FP64", (None, 768))}
    assert stage.signature(specs) == {"embedding": TensorSpec("FP32", (768,))}
    with pytest.raises(GraphError, match="cls_pool: 'last_hidden_state' must be float"):
        stage.signature({"last_hidden_state": TensorSpec("FP32", (768,))})
    with pytest.raises(GraphError, match="cls_pool: 'last_hidden_state' must be float"):
        stage.signature({"last_hidden_state": TensorSpec("UINT8", (4, 768))})
    with pytest.raises(GraphError, match="cls_pool: 'last_hidden_state' has no tokens"):
        stage.signature({"last_hidden_state": TensorSpec("FP32", (0, 768))})
    with pytest.raises(GraphError, match="cls_pool: needs column 'last_hidden_state'"):
        stage.signature({})


def test_cls_pool_rejects_every_row_of_a_batch_without_tokens() -> None:
    out = ClsPool(ClsPoolParams()).process(
        Batch([0, 1], {"last_hidden_state": np.zeros((2, 0, 4), np.float32)})
    )
    assert out.rows == []
    assert [r[:2] for r in out.rejected] == [(0, "no_tokens"), (1, "no_tokens")]


# -- l2_normalize -----------------------------------------------------------------------


def _l2(x: np.ndarray, **params: object) -> Batch:
    stage = L2Normalize(L2NormalizeParams(**params))  # type: ignore[arg-type]
    return stage.process(Batch(list(range(len(x))), {"embedding": x}))


@given(
    hnp.arrays(
        st.sampled_from([np.float16, np.float32, np.float64]),
        hnp.array_shapes(min_dims=2, max_dims=3, max_side=8),
        elements=st.floats(-1e4, 1e4, width=16),
    )
)
@settings(max_examples=200)
def test_l2_normalize_matches_a_row_by_row_reference(x: np.ndarray) -> None:
    out = _l2(x)
    y = out.columns["embedding"]
    assert y.dtype == np.float32
    assert y.shape == x.shape
    for row, got in zip(x, y, strict=True):
        r = row.astype(np.float64)
        norms = np.linalg.norm(r, axis=-1, keepdims=True)
        np.testing.assert_allclose(got, r / np.maximum(norms, 1e-12), rtol=1e-6, atol=1e-7)
        unit = norms[..., 0] > 0
        np.testing.assert_allclose(np.linalg.norm(got, axis=-1)[unit], 1.0, rtol=1e-6)


def test_l2_normalize_keeps_zero_vectors_zero_and_handles_huge_components() -> None:
    x = np.array([[0.0, 0.0, 0.0], [3e30, 4e30, 0.0], [1e-30, 0.0, 0.0]], np.float32)
    y = _l2(x, output="unit").columns["unit"]
    assert y[0].tolist() == [0.0, 0.0, 0.0]
    np.testing.assert_allclose(y[1], [0.6, 0.8, 0.0], rtol=1e-6)  # 3e30**2 overflows float32
    np.testing.assert_allclose(
        y[2], [1e-30 / 1e-12, 0.0, 0.0], rtol=1e-6
    )  # below eps: divided by eps


def test_l2_normalize_rejects_non_finite_rows() -> None:
    x = np.array([[1.0, np.nan], [np.inf, 1.0], [0.0, 2.0]], np.float32)
    out = _l2(x)
    assert out.rows == [2]
    assert out.columns["embedding"].tolist() == [[0.0, 1.0]]
    assert [r[:2] for r in out.rejected] == [(0, "non_finite"), (1, "non_finite")]


def test_l2_normalize_signature() -> None:
    stage = L2Normalize(L2NormalizeParams(input="e", output="u"))
    assert stage.signature({"e": TensorSpec("FP16", (384,)), "x": TensorSpec("INT8", ())}) == {
        "u": TensorSpec("FP32", (384,)),
        "x": TensorSpec("INT8", ()),
    }
    assert stage.signature({"e": TensorSpec("FP32", (4, None))}) == {
        "u": TensorSpec("FP32", (4, None))
    }
    with pytest.raises(GraphError, match=r"l2_normalize: 'e' must be float \[..., dim\] per row"):
        stage.signature({"e": TensorSpec("INT64", (384,))})
    with pytest.raises(GraphError, match=r"l2_normalize: 'e' must be float .*got FP32\[\]"):
        stage.signature({"e": TensorSpec("FP32", ())})
    with pytest.raises(GraphError, match="l2_normalize: needs column 'e'"):
        stage.signature({"x": TensorSpec("FP32", (3,))})


def test_l2_normalize_eps_must_be_positive() -> None:
    with pytest.raises(ValueError, match="greater than 0"):
        L2NormalizeParams(eps=0)
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        L2NormalizeParams.model_validate({"epsilon": 1e-6})
