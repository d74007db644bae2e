"""Routing: which model a request goes to, whether its tensors fit, which batch it joins."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from pipeline.serving.routing import ModelRoute, Router
from schemas.errors import RoutingError, TensorError
from schemas.messages import Request
from schemas.tensors import TensorSpec

FIXED = ModelRoute("m", "2", {"x": TensorSpec("FP32", (4,))})
FREE = ModelRoute(
    "t", "1", {"ids": TensorSpec("INT64", (None,)), "mask": TensorSpec("INT64", (None,))}
)
IMAGES = ModelRoute("img", "1", {"image": TensorSpec("BYTES", (1,))})
ROUTER = Router({"m": FIXED, "t": FREE, "img": IMAGES})


def _req(model: str = "m", version: str | None = None, **inputs: np.ndarray) -> Request:
    return Request("r", model, inputs or {"x": np.zeros(4, np.float32)}, model_version=version)


def _tokens(n: int, m: int | None = None) -> Request:
    return Request(
        "r", "t", {"ids": np.zeros(n, np.int64), "mask": np.ones(n if m is None else m, np.int64)}
    )


def test_fixed_shapes_share_one_batch_key() -> None:
    assert FIXED.batch_key(_req()) == FIXED.batch_key(_req(x=np.ones(4, np.float32))) == "m"


def test_fixed_bytes_inputs_share_one_batch_key() -> None:
    one = np.empty(1, dtype=object)
    one[0] = b"\xff\xd8"
    other = np.empty(1, dtype=object)
    other[0] = b"a much longer encoded image"
    key = IMAGES.batch_key(Request("r", "img", {"image": one}))
    assert key == IMAGES.batch_key(Request("r", "img", {"image": other})) == "img"


def test_free_dimensions_batch_by_actual_shape() -> None:
    assert FREE.batch_key(_tokens(3)) == FREE.batch_key(_tokens(3))
    assert FREE.batch_key(_tokens(3)) != FREE.batch_key(_tokens(5))
    assert FREE.batch_key(_tokens(3, 5)) not in {
        FREE.batch_key(_tokens(3)),
        FREE.batch_key(_tokens(5)),
    }
    assert FREE.batch_key(_tokens(3)) != FIXED.batch_key(_req())


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"x": np.zeros(5, np.float32)}, "input 'x' is FP32[5]; model 'm' takes FP32[4]"),
        ({"x": np.zeros(4, np.float64)}, "input 'x' is FP64[4]; model 'm' takes FP32[4]"),
        ({"x": np.zeros((1, 4), np.float32)}, "input 'x' is FP32[1, 4]; model 'm' takes FP32[4]"),
        ({"x": np.zeros((), np.float32)}, "input 'x' is FP32[]; model 'm' takes FP32[4]"),
        ({}, "model 'm': missing ['x'] (it takes 1 input: 'x')"),
        ({"y": np.zeros(4, np.float32)}, "missing ['x']; unexpected ['y']"),
        (
            {"x": np.zeros(4, np.float32), "y": np.zeros(1, np.float32)},
            "model 'm': unexpected ['y'] (it takes 1 input: 'x')",
        ),
    ],
)
def test_tensors_that_do_not_fit_a_fixed_model_are_refused(
    inputs: dict[str, np.ndarray], message: str
) -> None:
    with pytest.raises(TensorError) as e:
        FIXED.batch_key(Request("r", "m", inputs))
    assert message in str(e.value)
    assert e.value.reason == "bad_tensor"


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"ids": np.zeros(3, np.int32), "mask": np.zeros(3, np.int64)}, "input 'ids' is INT32[3]"),
        ({"ids": np.zeros((2, 3), np.int64), "mask": np.zeros(3, np.int64)}, "takes INT64[?]"),
        ({"ids": np.zeros(3, np.int64)}, "missing ['mask']"),
    ],
)
def test_tensors_that_do_not_fit_a_free_model_are_refused(
    inputs: dict[str, np.ndarray], message: str
) -> None:
    with pytest.raises(TensorError, match=message.replace("[", r"\[").replace("?", r"\?")):
        FREE.batch_key(Request("r", "t", inputs))


def test_bytes_input_with_wrong_element_count_is_refused() -> None:
    two = np.empty(2, dtype=object)
    two[:] = [b"a", b"b"]
    with pytest.raises(
        TensorError, match=r"input 'image' is BYTES\[2\]; model 'img' takes BYTES\[1\]"
    ):
        IMAGES.batch_key(Request("r", "img", {"image": two}))


def test_route_by_name_and_version() -> None:
    assert ROUTER.route(_req()) is FIXED
    assert ROUTER.route(_req(version="2")) is FIXED
    assert ROUTER.route(_req(version="")) is FIXED  # empty means "any", like None
    assert ROUTER.route(_tokens(2)) is FREE


def test_unknown_model_names_what_is_served() -> None:
    with pytest.raises(RoutingError, match=r"unknown model 'nope' \(served: img, m, t\)") as e:
        ROUTER.route(_req("nope"))
    assert e.value.reason == "unknown_model"


def test_wrong_version_names_the_served_version() -> None:
    with pytest.raises(RoutingError, match=r"model 'm' version '9' is not served \(serving '2'\)"):
        ROUTER.route(_req(version="9"))


def test_a_bucketer_splits_one_signature_into_batches_and_may_refuse() -> None:
    def by_length(tensors: Any) -> int:
        n = len(tensors["text"].reshape(-1)[0])
        if n > 10:
            raise TensorError(f"{n} bytes is too long")
        return 4 if n <= 4 else 10

    route = ModelRoute("txt", "1", {"text": TensorSpec("BYTES", (1,))}, bucketer=by_length)

    def req(text: bytes) -> Request:
        return Request("r", "txt", {"text": np.array([text], dtype=object)})

    assert route.batch_key(req(b"abc")) == ("txt", 4)
    assert route.batch_key(req(b"abcdefg")) == ("txt", 10)
    with pytest.raises(TensorError, match="too long"):
        route.batch_key(req(b"x" * 11))
