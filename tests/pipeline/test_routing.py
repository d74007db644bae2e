from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import RoutingError, TensorError
from pipeline.messages import Request
from pipeline.routing import ModelRoute, Router
from pipeline.tensors import TensorSpec

FIXED = ModelRoute("m", "2", {"x": TensorSpec("FP32", (4,))})
FREE = ModelRoute(
    "t", "1", {"ids": TensorSpec("INT64", (None,)), "mask": TensorSpec("INT64", (None,))}
)
ROUTER = Router({"m": FIXED, "t": FREE})


def _req(model: str = "m", version: str | None = None, **inputs: np.ndarray) -> Request:
    return Request("r", model, inputs or {"x": np.zeros(4, np.float32)}, model_version=version)


def test_fixed_shapes_share_one_batch_key() -> None:
    assert FIXED.batch_key(_req()) == FIXED.batch_key(_req(x=np.ones(4, np.float32))) == "m"


def test_free_dimensions_batch_by_actual_shape() -> None:
    def key(n: int) -> object:
        ids = np.zeros(n, np.int64)
        return FREE.batch_key(Request("r", "t", {"ids": ids, "mask": ids}))

    assert key(3) == key(3)
    assert key(3) != key(5)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"x": np.zeros(5, np.float32)}, "input 'x' is FP32[5]; model 'm' takes FP32[4]"),
        ({"x": np.zeros(4, np.float64)}, "input 'x' is FP64[4]; model 'm' takes FP32[4]"),
        ({"y": np.zeros(4, np.float32)}, "missing ['x']; unexpected ['y']"),
        ({"x": np.zeros(4, np.float32), "y": np.zeros(1, np.float32)}, "unexpected ['y']"),
    ],
)
def test_tensors_that_do_not_fit_are_refused(inputs: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(TensorError) as e:
        FIXED.batch_key(Request("r", "m", inputs))
    assert message in str(e.value)
    assert e.value.reason == "bad_tensor"


def test_unknown_model_and_version() -> None:
    assert ROUTER.route(_req(version="2")) is FIXED
    assert ROUTER.route(_req(version="")) is FIXED
    with pytest.raises(RoutingError, match=r"unknown model 'nope' \(served: m, t\)"):
        ROUTER.route(_req("nope"))
    with pytest.raises(RoutingError, match="version '9' is not served"):
        ROUTER.route(_req(version="9"))
