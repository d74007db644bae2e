"""Cast, rename, scale and pad_crop: plain column stages, against NumPy references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from schemas.errors import GraphError
from schemas.tensors import TensorSpec
from stages.base import Batch
from stages.preprocess.tensor import (
    Cast,
    CastParams,
    PadCrop,
    PadCropParams,
    Rename,
    RenameParams,
    Scale,
    ScaleParams,
)


@pytest.mark.parametrize(
    ("datatype", "dtype", "expected"),
    [
        ("FP16", np.float16, [[1.5, -2.0], [3.0, 4.25]]),
        ("FP64", np.float64, [[1.5, -2.0], [3.0, 4.25]]),
        ("INT32", np.int32, [[1, -2], [3, 4]]),  # truncation toward zero, like NumPy
        ("BOOL", np.bool_, [[True, True], [True, True]]),
    ],
)
def test_cast_converts_the_whole_column(
    datatype: str, dtype: type, expected: list[list[object]]
) -> None:
    x = np.array([[1.5, -2.0], [3.0, 4.25]], np.float32)
    batch = Batch([0, 1], {"x": x, "other": np.zeros(2, np.int8)})
    out = Cast(CastParams(input="x", datatype=datatype)).process(batch)
    assert out.columns["x"].dtype == np.dtype(dtype)
    assert out.columns["x"].tolist() == expected
    assert out.columns["other"] is batch.columns["other"]
    assert out.rows == [0, 1]


def test_cast_of_a_list_column_stacks_it() -> None:
    out = Cast(CastParams(input="x", datatype="INT64")).process(
        Batch([0, 1], {"x": [np.array([1, 2], np.uint8), np.array([3, 4], np.uint8)]})
    )
    assert out.columns["x"].dtype == np.int64
    assert out.columns["x"].tolist() == [[1, 2], [3, 4]]


def test_cast_signature_changes_only_the_datatype() -> None:
    stage = Cast(CastParams(input="x", datatype="FP16"))
    specs = {"x": TensorSpec("UINT8", (None, 3)), "y": TensorSpec("INT8", ())}
    assert stage.signature(specs) == {
        "x": TensorSpec("FP16", (None, 3)),
        "y": TensorSpec("INT8", ()),
    }


@pytest.mark.parametrize("datatype", ["BYTES", "FLOAT", "fp32"])
def test_cast_refuses_non_numeric_targets(datatype: str) -> None:
    with pytest.raises(GraphError, match=f"cast: '{datatype}' is not a numeric datatype"):
        Cast(CastParams(input="x", datatype=datatype))


def test_cast_signature_refuses_bytes_and_missing_columns() -> None:
    stage = Cast(CastParams(input="x", datatype="FP32"))
    with pytest.raises(GraphError, match="cast: 'x' is BYTES; decode it first"):
        stage.signature({"x": TensorSpec("BYTES", (1,))})
    with pytest.raises(GraphError, match="cast: needs column 'x', but the batch has y FP32"):
        stage.signature({"y": TensorSpec("FP32", (1,))})


def test_rename_moves_the_column_without_copying() -> None:
    x = np.arange(4).reshape(2, 2)
    out = Rename(RenameParams(input="x", output="y")).process(Batch([0, 1], {"x": x, "z": [1, 2]}))
    assert set(out.columns) == {"y", "z"}
    assert out.columns["y"] is x


def test_rename_signature() -> None:
    stage = Rename(RenameParams(input="x", output="y"))
    specs = {"x": TensorSpec("FP16", (2,)), "z": TensorSpec("INT8", ())}
    assert stage.signature(specs) == {"y": TensorSpec("FP16", (2,)), "z": TensorSpec("INT8", ())}
    with pytest.raises(GraphError, match="rename: needs column 'x'"):
        stage.signature({"z": TensorSpec("INT8", ())})


def test_unknown_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        RenameParams.model_validate({"input": "x", "output": "y", "outptu": "z"})


# -- scale ------------------------------------------------------------------------------


def _scale(x: object, **params: object) -> Batch:
    stage = Scale(ScaleParams(input="x", **params))  # type: ignore[arg-type]
    rows = len(x)  # type: ignore[arg-type]
    return stage.process(Batch(list(range(rows)), {"x": x}))  # type: ignore[dict-item]


def test_scale_maps_uint8_images_to_float32_like_the_reference() -> None:
    x = np.random.default_rng(0).integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
    out = _scale(x, factor=1 / 127.5, offset=-1.0)
    y = out.columns["x"]
    assert y.dtype == np.float32
    assert y.shape == x.shape
    for row, got in zip(x, y, strict=True):  # row by row, in float64
        np.testing.assert_allclose(got, row.astype(np.float64) / 127.5 - 1.0, rtol=0, atol=1e-6)
    assert out.rows == [0, 1, 2]
    assert out.rejected == []


@given(
    hnp.arrays(
        np.int16,
        hnp.array_shapes(min_dims=1, max_dims=4, max_side=5),
        elements=st.integers(-100, 100),
    ),
    st.sampled_from([np.uint8, np.int16, np.int32, np.float32, np.float64]),
    st.floats(-10, 10),
    st.floats(-10, 10),
    st.sampled_from(["FP32", "FP64"]),
)
@settings(max_examples=200)
def test_scale_matches_a_float64_reference_for_any_shape(
    values: np.ndarray, dtype: type, factor: float, offset: float, datatype: str
) -> None:
    x = (np.abs(values) if dtype is np.uint8 else values).astype(dtype)
    before = x.copy()
    out = _scale(x, factor=factor, offset=offset, datatype=datatype)
    y = out.columns["x"]
    assert y.dtype == np.dtype(datatype.replace("FP", "float"))
    assert y.shape == x.shape
    tol = 1e-15 if datatype == "FP64" else 2e-7
    for row, got in zip(x, y, strict=True):
        ref = row.astype(np.float64) * factor + offset
        bound = 4 * tol * (np.abs(row.astype(np.float64) * factor) + abs(offset)) + 1e-30
        assert (np.abs(got.astype(np.float64) - ref) <= bound).all()
    np.testing.assert_array_equal(x, before)  # the input is never written


def test_scale_to_integers_rounds_half_to_even_and_rejects_out_of_range_rows() -> None:
    x = np.array([[0.5, 1.5, 2.5, -0.5], [100.0, 127.4, -128.4, 0.0], [127.6, 0, 0, 0]])
    out = _scale(x, datatype="INT8")
    assert out.columns["x"].dtype == np.int8
    assert out.columns["x"].tolist() == [[0, 2, 2, 0], [100, 127, -128, 0]]
    assert out.rows == [0, 1]
    assert out.rejected == [
        (2, "out_of_range", "1 elements not finite or outside the range of INT8")
    ]


@pytest.mark.parametrize(
    ("value", "ok"),
    [(2.0**63 - 2**10, True), (2.0**63, False), (-(2.0**63), True), (-(2.0**63) - 2**11, False)],
)
def test_scale_to_int64_checks_the_range_at_its_edges(value: float, ok: bool) -> None:
    out = _scale(np.array([[value]]), datatype="INT64")
    assert len(out.rows) == int(ok)
    if ok:
        assert out.columns["x"].tolist() == [[int(value)]]


def test_scale_rejects_rows_that_are_not_finite_and_keeps_the_rest() -> None:
    x = np.array([[1.0, 2.0], [np.nan, 0.0], [1.0, np.inf], [3.0, 4.0]], np.float32)
    out = _scale(x, factor=2.0)
    assert out.rows == [0, 3]
    assert out.columns["x"].tolist() == [[2.0, 4.0], [6.0, 8.0]]
    assert [(r, reason) for r, reason, _ in out.rejected] == [(1, "non_finite"), (2, "non_finite")]
    assert out.rejected[0][2] == "1 elements not finite after scaling to FP32"


def test_scale_rejects_a_row_that_overflows_half_precision() -> None:
    out = _scale(np.array([[1.0], [70000.0]], np.float32), datatype="FP16")
    assert out.rows == [0]
    assert out.columns["x"].dtype == np.float16
    assert out.rejected[0][:2] == (1, "non_finite")


def test_scale_of_a_list_column_scales_each_row() -> None:
    rows = [np.array([1, 2], np.uint8), np.array([3, 4, 5], np.uint8), np.array([6], np.uint8)]
    out = _scale(rows, factor=0.5, offset=1.0, output="y")
    assert set(out.columns) == {"y"}
    assert [r.tolist() for r in out.columns["y"]] == [[1.5, 2.0], [2.5, 3.0, 3.5], [4.0]]
    rows = [np.array([1.0, np.nan]), np.array([2.0, 3.0])]
    out = _scale(rows, factor=2.0)
    assert out.columns["x"].tolist() == [[4.0, 6.0]]  # one row left: stacked
    assert out.rejected[0][:2] == (0, "non_finite")


def test_scale_signature_changes_the_datatype_and_may_rename() -> None:
    stage = Scale(ScaleParams(input="x", output="y", factor=2.0, datatype="FP16"))
    specs = {"x": TensorSpec("UINT8", (None, 3)), "z": TensorSpec("INT8", ())}
    assert stage.signature(specs) == {
        "y": TensorSpec("FP16", (None, 3)),
        "z": TensorSpec("INT8", ()),
    }
    with pytest.raises(GraphError, match="scale: 'x' is BYTES; decode it first"):
        stage.signature({"x": TensorSpec("BYTES", (1,))})
    with pytest.raises(GraphError, match="scale: needs column 'x', but the batch has z INT8"):
        stage.signature({"z": TensorSpec("INT8", ())})


@pytest.mark.parametrize("datatype", ["BYTES", "BOOL", "float32"])
def test_scale_refuses_non_numeric_targets(datatype: str) -> None:
    with pytest.raises(GraphError, match=f"scale: '{datatype}' is not a numeric datatype"):
        Scale(ScaleParams(input="x", datatype=datatype))


def test_scale_refuses_non_finite_parameters() -> None:
    with pytest.raises(GraphError, match="scale: factor and offset must be finite numbers"):
        Scale(ScaleParams(input="x", factor=float("nan")))
    with pytest.raises(GraphError, match="scale: factor and offset must be finite numbers"):
        Scale(ScaleParams(input="x", offset=float("inf")))


# -- pad_crop ---------------------------------------------------------------------------


def _pad_crop_reference(
    row: np.ndarray, shape: tuple[int | None, ...], value: float, align: str
) -> np.ndarray:
    """One row, one dimension at a time: np.pad to grow, a slice to shrink."""
    out = row
    for axis, want in enumerate(shape):
        have = out.shape[axis]
        if want is None or want == have:
            continue
        if want > have:
            before = (want - have) // 2 if align == "center" else 0
            width = [(0, 0)] * out.ndim
            width[axis] = (before, want - have - before)
            out = np.pad(out, width, constant_values=value)
        else:
            start = (have - want) // 2 if align == "center" else 0
            out = np.take(out, np.arange(start, start + want), axis=axis)
    return out


def _pad_crop(col: object, shape: tuple[int | None, ...], **params: object) -> Batch:
    stage = PadCrop(PadCropParams(input="x", shape=shape, **params))  # type: ignore[arg-type]
    return stage.process(Batch(list(range(len(col))), {"x": col}))  # type: ignore[arg-type,dict-item]


def test_pad_crop_pads_at_the_end_and_crops_the_end_with_start_alignment() -> None:
    x = np.array([[1, 2, 3], [4, 5, 6]], np.int64)
    out = _pad_crop(x, (5,), value=-1)
    assert out.columns["x"].tolist() == [[1, 2, 3, -1, -1], [4, 5, 6, -1, -1]]
    assert out.padded_elements == 4
    out = _pad_crop(x, (2,))
    assert out.columns["x"].tolist() == [[1, 2], [4, 5]]
    assert out.padded_elements == 0


def test_pad_crop_centers_with_the_extra_element_at_the_end() -> None:
    x = np.arange(1, 5, dtype=np.float32)[None]  # [1, 2, 3, 4]
    assert _pad_crop(x, (7,), align="center").columns["x"].tolist() == [[0, 1, 2, 3, 4, 0, 0]]
    assert _pad_crop(x, (1,), align="center").columns["x"].tolist() == [[2]]
    img = np.arange(16).reshape(1, 4, 4)
    out = _pad_crop(img, (2, 6), align="center", value=9)  # crop rows, pad columns
    assert out.columns["x"].tolist() == [[[9, 4, 5, 6, 7, 9], [9, 8, 9, 10, 11, 9]]]
    assert out.padded_elements == 4


def test_pad_crop_returns_the_column_itself_when_it_already_fits() -> None:
    x = np.zeros((2, 3, 4), np.uint8)
    out = _pad_crop(x, (3, None))
    assert out.columns["x"] is x
    assert out.padded_elements == 0


@st.composite
def _rows_and_target(
    draw: st.DrawFn,
) -> tuple[list[np.ndarray], tuple[int | None, ...], str]:
    rank = draw(st.integers(1, 3))
    count = draw(st.integers(1, 4))
    same = draw(st.booleans())
    first = draw(st.tuples(*[st.integers(1, 6)] * rank))
    rows = []
    for _ in range(count):
        shape = first if same else draw(st.tuples(*[st.integers(1, 6)] * rank))
        rows.append(draw(hnp.arrays(np.float32, shape, elements=st.floats(-9, 9, width=32))))
    target = draw(st.tuples(*[st.one_of(st.none(), st.integers(1, 7))] * rank))
    if not same:  # a free dimension would leave rows of different shapes: only fixed ones
        target = tuple(t if t is not None else 3 for t in target)
    return rows, target, draw(st.sampled_from(["start", "center"]))


@given(_rows_and_target(), st.booleans())
@settings(max_examples=300)
def test_pad_crop_matches_the_reference_row_by_row_and_counts_padding(
    case: tuple[list[np.ndarray], tuple[int | None, ...], str], stacked: bool
) -> None:
    rows, target, align = case
    same = all(r.shape == rows[0].shape for r in rows)
    col: object = np.stack(rows) if stacked and same else rows
    out = _pad_crop(col, target, value=np.nan, align=align)
    got = out.columns["x"]
    assert isinstance(got, np.ndarray)  # every row has the target shape: stacked
    for row, fixed in zip(rows, got, strict=True):
        np.testing.assert_array_equal(fixed, _pad_crop_reference(row, target, np.nan, align))
    # NaN never occurs in the data, so the NaNs are exactly the padding.
    assert out.padded_elements == int(np.isnan(got).sum())


def test_pad_crop_adds_to_the_padding_already_counted() -> None:
    batch = Batch([0], {"x": np.ones((1, 2), np.int32)}, padded_elements=7)
    out = PadCrop(PadCropParams(input="x", shape=(5,))).process(batch)
    assert out.padded_elements == 10


def test_pad_crop_rejects_rows_of_the_wrong_rank_and_counts_only_kept_rows() -> None:
    rows = [np.ones(2, np.int64), np.ones((2, 2), np.int64), np.ones(5, np.int64)]
    out = _pad_crop(rows, (4,), output="y")
    assert set(out.columns) == {"y"}
    assert out.columns["y"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert out.rows == [0, 2]
    assert out.rejected == [(1, "bad_shape", "row has 2 dimensions, want 1")]
    assert out.padded_elements == 2


def test_pad_crop_of_a_stacked_column_of_the_wrong_rank_rejects_every_row() -> None:
    out = _pad_crop(np.ones((2, 3, 3)), (4,))
    assert out.rows == []
    assert {reason for _, reason, _ in out.rejected} == {"bad_shape"}


def test_pad_crop_signature_fixes_dimensions_and_keeps_free_ones() -> None:
    stage = PadCrop(PadCropParams(input="ids", shape=(128, None), value=0))
    specs = {"ids": TensorSpec("INT64", (None, 3)), "m": TensorSpec("INT64", (None,))}
    assert stage.signature(specs) == {
        "ids": TensorSpec("INT64", (128, 3)),
        "m": TensorSpec("INT64", (None,)),
    }
    renamed = PadCrop(PadCropParams(input="ids", output="x", shape=(4, 4)))
    assert renamed.signature(specs) == {
        "x": TensorSpec("INT64", (4, 4)),
        "m": TensorSpec("INT64", (None,)),
    }


def test_pad_crop_signature_errors() -> None:
    stage = PadCrop(PadCropParams(input="x", shape=(8,)))
    with pytest.raises(
        GraphError, match=r"pad_crop: shape has 1 dimensions but 'x' has 2: FP32\[\?,3\]"
    ):
        stage.signature({"x": TensorSpec("FP32", (None, 3))})
    with pytest.raises(GraphError, match="pad_crop: 'x' is BYTES; decode it first"):
        stage.signature({"x": TensorSpec("BYTES", (1,))})
    with pytest.raises(GraphError, match="pad_crop: needs column 'x', but the batch has y FP32"):
        stage.signature({"y": TensorSpec("FP32", (8,))})


@pytest.mark.parametrize(
    ("value", "datatype", "ok"),
    [
        (0.5, "INT64", False),
        (-1, "UINT8", False),
        (256, "UINT8", False),
        (255, "UINT8", True),
        (2, "BOOL", False),
        (1, "BOOL", True),
        (float("nan"), "INT32", False),
        (float("nan"), "FP32", True),
        (-1e9, "FP16", False),
        (-1e9, "FP32", True),
    ],
)
def test_pad_crop_signature_checks_the_pad_value_fits(
    value: float, datatype: str, ok: bool
) -> None:
    stage = PadCrop(PadCropParams(input="x", shape=(2,), value=value))
    if ok:
        assert stage.signature({"x": TensorSpec(datatype, (1,))})["x"] == TensorSpec(datatype, (2,))
    else:
        with pytest.raises(GraphError, match=f"pad_crop: pad value .* does not fit {datatype}"):
            stage.signature({"x": TensorSpec(datatype, (1,))})


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"shape": []}, "at least 1 item"),
        ({"shape": [0]}, "greater than or equal to 1"),
        ({"shape": [2], "align": "end"}, "'start' or 'center'"),
        ({"shape": [2], "pad": 0}, "Extra inputs are not permitted"),
    ],
)
def test_pad_crop_params_are_validated(params: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PadCropParams.model_validate({"input": "x", **params})
