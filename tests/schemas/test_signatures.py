"""`match_signatures`: the compiled check answers exactly as the reference does."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.codec import COMPILED
from schemas.errors import DecodeError, RequestError
from schemas.messages import Request
from schemas.signatures import Signature, match_signatures

F4, I8 = np.dtype(np.float32), np.dtype(np.int64)
TABLE: dict[str, Signature] = {
    "m": (0, "3", ("x",), (F4,), ((4,),)),
    "k": (1, "1", ("a", "b"), (I8, F4), ((2, 3), ())),
}

compiled_only = pytest.mark.skipif(not COMPILED, reason="the compiled codec was not built")


def _req(model: str = "m", version: str | None = None, **inputs: Any) -> Request:
    return Request("r", model, inputs or {"x": np.zeros(4, np.float32)}, version)


def _both(items: list[Any]) -> list[int]:
    reference = match_signatures(items, TABLE, compiled=False)
    if COMPILED:
        assert match_signatures(items, TABLE, compiled=True) == reference
    return reference


def test_requests_that_fit_get_their_models_index() -> None:
    items = [
        _req(),
        _req(version="3"),
        _req(version=""),
        _req("k", a=np.zeros((2, 3), np.int64), b=np.ones((), np.float32)),
    ]
    assert _both(items) == [0, 0, 0, 1]


def test_anything_else_is_minus_one() -> None:
    items: list[Any] = [
        DecodeError("bad"),
        RequestError("bad"),
        _req("other"),
        _req(version="2"),
        _req(x=np.zeros(5, np.float32)),  # shape
        _req(x=np.zeros(4, np.float64)),  # dtype
        _req(x=np.zeros(4, ">f4")),  # byte order: not the same dtype
        _req(x=np.zeros((1, 4), np.float32)),  # rank
        _req(y=np.zeros(4, np.float32)),  # name
        _req(x=np.zeros(4, np.float32), y=np.zeros(4, np.float32)),  # one too many
        _req("k", a=np.zeros((2, 3), np.int64)),  # one missing
        "not a request",
        _req(x=np.float32(1.0)),  # a NumPy scalar, not an array: never decoded so
    ]
    assert _both(items) == [-1] * len(items)


_DTYPES = st.sampled_from([np.float32, np.float64, np.int64, np.int32, ">f4", np.uint8])
_SHAPES = st.lists(st.integers(0, 4), max_size=3).map(tuple)


@compiled_only
@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.builds(
                lambda model, version, tensors: Request(
                    "r", model, {n: np.zeros(s, d) for n, (d, s) in tensors.items()}, version
                ),
                st.sampled_from(["m", "k", "z"]),
                st.sampled_from([None, "", "1", "3"]),
                st.dictionaries(
                    st.sampled_from(["x", "a", "b", "c"]), st.tuples(_DTYPES, _SHAPES), max_size=3
                ),
            ),
            st.just(DecodeError("bad")),
        ),
        max_size=20,
    )
)
def test_the_compiled_check_answers_as_the_reference(items: list[Any]) -> None:
    assert match_signatures(items, TABLE, compiled=True) == match_signatures(
        items, TABLE, compiled=False
    )
