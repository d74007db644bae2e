from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import GraphError
from pipeline.tensors import TensorSpec
from stages.base import Batch
from stages.preprocess.tensor import Cast, CastParams, Rename, RenameParams


def test_cast_and_rename() -> None:
    batch = Batch([0, 1], {"x": np.array([[1, 2], [3, 4]], np.int32)})
    batch = Cast(CastParams(input="x", datatype="FP16")).process(batch)
    batch = Rename(RenameParams(input="x", output="y")).process(batch)
    assert list(batch.columns) == ["y"]
    assert batch.columns["y"].dtype == np.float16
    assert Rename(RenameParams(input="x", output="y")).signature(
        {"x": TensorSpec("FP16", (2,))}
    ) == {"y": TensorSpec("FP16", (2,))}


def test_cast_refuses_bytes_and_unknown_types() -> None:
    with pytest.raises(GraphError, match="not a numeric datatype"):
        Cast(CastParams(input="x", datatype="BYTES"))
    with pytest.raises(GraphError, match="decode it first"):
        Cast(CastParams(input="x", datatype="FP32")).signature({"x": TensorSpec("BYTES", (1,))})
