"""Cast and rename: plain column stages."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import GraphError
from pipeline.tensors import TensorSpec
from stages.base import Batch
from stages.preprocess.tensor import Cast, CastParams, Rename, RenameParams


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
