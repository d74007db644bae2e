"""`stack_rows`: the batch's columns, as ``np.stack`` makes them, for every shape."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline.serving.steps import stack_rows

DTYPES = st.sampled_from([np.float32, np.float16, np.int64, np.uint8, np.bool_])


@given(
    st.integers(1, 20).flatmap(
        lambda n: st.tuples(
            DTYPES,
            hnp.array_shapes(min_dims=0, max_dims=3, max_side=4),
        ).flatmap(lambda spec: st.lists(hnp.arrays(spec[0], spec[1]), min_size=n, max_size=n))
    )
)
def test_rows_of_one_shape_stack_as_np_stack_does(rows: list[np.ndarray[Any, Any]]) -> None:
    got, want = stack_rows(rows), np.stack(rows)
    assert got.shape == want.shape
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_read_only_views_over_record_bytes_stack_into_a_new_writable_array() -> None:
    rows = [np.frombuffer(np.full(4, i, np.float32).tobytes(), np.float32) for i in range(3)]
    got = stack_rows(rows)
    assert got.flags.writeable
    np.testing.assert_array_equal(got[:, 0], [0, 1, 2])


@pytest.mark.parametrize(
    "shapes",
    [
        [(2,), (1,), (3,)],  # lengths that add up to 3 × the first: must not be reshaped
        [(3,), (4,)],
        [(2, 2), (4, 1)],
    ],
)
def test_rows_of_differing_shapes_are_refused_as_np_stack_refuses_them(
    shapes: list[tuple[int, ...]],
) -> None:
    with pytest.raises(ValueError, match="same shape"):
        stack_rows([np.zeros(s, np.float32) for s in shapes])
