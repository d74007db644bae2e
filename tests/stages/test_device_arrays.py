"""Device-array columns (CuPy after a GPU stage, torch tensors) stay device arrays.

There is no GPU here: `FakeDeviceArray` stands in for CuPy. It keeps a NumPy array
inside, speaks DLPack and the array API (``__array_namespace__``), and refuses
``np.asarray`` as CuPy does, so any stage that copies a column to the host fails here as
it would on a GPU. torch CPU tensors are device arrays too (``__dlpack__``) and run with
torch's own functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest
import torch

from schemas.devices import is_device_array
from schemas.tensors import TensorSpec
from stages.base import Batch, StageBase, stack_if_uniform
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

DEVICE = "fake:0"


def _unwrap(x: Any) -> Any:
    if isinstance(x, FakeDeviceArray):
        return x.data
    if isinstance(x, list | tuple):
        return type(x)(_unwrap(i) for i in x)
    if isinstance(x, dict):
        return {k: _unwrap(v) for k, v in x.items()}
    return x


def _wrap(x: Any) -> Any:
    if isinstance(x, np.ndarray | np.generic):
        return FakeDeviceArray(np.asarray(x))  # 0-d results stay arrays, as in CuPy
    if isinstance(x, tuple):
        return tuple(_wrap(i) for i in x)
    return x


class _FakeNamespace:
    """NumPy's functions over fake arrays, answering fake arrays (the array API's role)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(np, name)
        if isinstance(attr, type) or not callable(attr):
            return attr  # dtypes (float32, ...) and constants

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            if "device" in kwargs:  # where the array API is told to allocate
                assert kwargs.pop("device") == DEVICE
            return _wrap(attr(*_unwrap(args), **_unwrap(kwargs)))

        return call


XP = _FakeNamespace()


class FakeDeviceArray:
    """An array "on a device": NumPy inside, refusing implicit conversion like CuPy."""

    def __init__(self, data: np.ndarray) -> None:
        assert isinstance(data, np.ndarray)
        self.data = data

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise TypeError("Implicit conversion to a NumPy array is not allowed (fake device)")

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any:
        return self.data.__dlpack__()

    def __dlpack_device__(self) -> tuple[int, int]:
        return (2, 0)  # kDLCUDA, device 0

    def __array_namespace__(self, api_version: str | None = None) -> Any:
        return XP

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def device(self) -> str:
        return DEVICE

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: Any) -> FakeDeviceArray:
        return FakeDeviceArray(np.asarray(self.data[_unwrap(key)]))

    def __setitem__(self, key: Any, value: Any) -> None:
        self.data[_unwrap(key)] = _unwrap(value)

    def __bool__(self) -> bool:
        return bool(self.data)  # CuPy: a synchronising read of a one-element array

    def __int__(self) -> int:
        return int(self.data)

    def tolist(self) -> Any:
        return self.data.tolist()

    def _op(self, fn: Callable[[Any, Any], Any], other: Any) -> FakeDeviceArray:
        assert not isinstance(other, np.ndarray), "a host array mixed into device work"
        return FakeDeviceArray(np.asarray(fn(self.data, _unwrap(other))))

    def __imul__(self, other: Any) -> FakeDeviceArray:
        self.data *= _unwrap(other)
        return self

    def __iadd__(self, other: Any) -> FakeDeviceArray:
        self.data += _unwrap(other)
        return self

    def __mul__(self, other: Any) -> FakeDeviceArray:
        return self._op(np.multiply, other)

    def __add__(self, other: Any) -> FakeDeviceArray:
        return self._op(np.add, other)

    def __lt__(self, other: Any) -> FakeDeviceArray:  # type: ignore[override]
        return self._op(np.less, other)

    def __gt__(self, other: Any) -> FakeDeviceArray:  # type: ignore[override]
        return self._op(np.greater, other)

    def __ge__(self, other: Any) -> FakeDeviceArray:  # type: ignore[override]
        return self._op(np.greater_equal, other)

    def __or__(self, other: Any) -> FakeDeviceArray:
        return self._op(np.logical_or, other)

    def __invert__(self) -> FakeDeviceArray:
        return FakeDeviceArray(~self.data)


def fake(values: Any, dtype: Any = None) -> FakeDeviceArray:
    return FakeDeviceArray(np.array(values, dtype=dtype))


def test_the_fake_refuses_the_host_like_cupy() -> None:
    x = fake([1.0, 2.0])
    assert is_device_array(x)
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(x)


def _host(x: Any) -> np.ndarray:
    """A column's values for comparison (only tests may do this)."""
    if isinstance(x, FakeDeviceArray):
        return x.data
    if isinstance(x, torch.Tensor):
        return x.numpy()
    assert isinstance(x, np.ndarray), type(x)
    return x


# -- cast ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("datatype", "dtype"), [("FP16", np.float16), ("INT32", np.int32)])
def test_cast_keeps_a_device_column_on_its_device(datatype: str, dtype: type) -> None:
    values = np.array([[1.5, -2.0], [3.0, 4.25]], np.float32)
    stage = Cast(CastParams(input="x", datatype=datatype))
    want = stage.process(Batch([0, 1], {"x": values})).columns["x"]
    out = stage.process(Batch([0, 1], {"x": FakeDeviceArray(values.copy())})).columns["x"]
    assert isinstance(out, FakeDeviceArray)
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out.data, want)


def test_cast_of_a_torch_column_stays_a_torch_tensor() -> None:
    x = torch.tensor([[1.5, -2.0], [3.0, 4.25]])
    out = Cast(CastParams(input="x", datatype="FP16")).process(Batch([0, 1], {"x": x}))
    y = out.columns["x"]
    assert isinstance(y, torch.Tensor)
    assert y.dtype == torch.float16
    assert y.tolist() == [[1.5, -2.0], [3.0, 4.25]]
    assert x.dtype == torch.float32  # a copy


def test_cast_stacks_a_list_of_device_rows_on_the_device() -> None:
    rows = [fake([1, 2], np.uint8), fake([3, 4], np.uint8)]
    out = Cast(CastParams(input="x", datatype="INT64")).process(Batch([0, 1], {"x": rows}))
    assert isinstance(out.columns["x"], FakeDeviceArray)
    assert out.columns["x"].tolist() == [[1, 2], [3, 4]]


# -- scale --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "datatype"),
    [
        (FakeDeviceArray, "FP16"),
        (FakeDeviceArray, "INT8"),
        (torch.from_numpy, "FP16"),
        (torch.from_numpy, "INT8"),
    ],
)
def test_scale_on_a_device_column_rejects_and_computes_as_on_the_host(
    make: Callable[[np.ndarray], Any], datatype: str
) -> None:
    # Row 1 overflows FP16 and INT8, row 3 is NaN; rows 0 and 2 go on.
    values = np.array([[0.5, 2.5], [1e6, 1.0], [-3.5, 7.0], [np.nan, 0.0]], np.float32)
    stage = Scale(ScaleParams(input="x", output="y", factor=2.0, offset=1.0, datatype=datatype))
    want = stage.process(Batch([0, 1, 2, 3], {"x": values.copy(), "id": np.arange(4)}))
    col = make(values.copy())
    out = stage.process(Batch([0, 1, 2, 3], {"x": col, "id": make(np.arange(4))}))
    assert type(out.columns["y"]) is type(col)
    assert type(out.columns["id"]) is type(col)  # other columns are cut on the device too
    assert out.rows == want.rows == [0, 2]
    assert out.rejected == want.rejected
    assert [reason for _, reason, _ in out.rejected] == (
        ["non_finite"] * 2 if datatype == "FP16" else ["out_of_range"] * 2
    )
    np.testing.assert_array_equal(_host(out.columns["y"]), want.columns["y"])
    np.testing.assert_array_equal(_host(out.columns["id"]), [0, 2])


def test_scale_of_a_list_of_device_rows_stacks_them_on_the_device() -> None:
    rows = [fake([1.0, 2.0], np.float32), fake([np.inf, 1.0], np.float32), fake([3.0, 4.0])]
    out = Scale(ScaleParams(input="x", factor=0.5)).process(Batch([0, 1, 2], {"x": rows}))
    assert out.rows == [0, 2]
    assert out.rejected == [(1, "non_finite", "1 elements not finite after scaling to FP32")]
    assert isinstance(out.columns["x"], FakeDeviceArray)
    assert out.columns["x"].tolist() == [[0.5, 1.0], [1.5, 2.0]]


# -- pad_crop -----------------------------------------------------------------------------


@pytest.mark.parametrize("make", [FakeDeviceArray, torch.from_numpy])
def test_pad_crop_pads_and_crops_a_device_column_on_its_device(
    make: Callable[[np.ndarray], Any],
) -> None:
    values = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
    stage = PadCrop(PadCropParams(input="x", shape=(4, 3), value=-1.0, align="center"))
    want = stage.process(Batch([0, 1], {"x": values.copy()}))
    XP.calls.clear()
    out = stage.process(Batch([0, 1], {"x": make(values.copy())}))
    assert type(out.columns["x"]) is type(make(values))
    np.testing.assert_array_equal(_host(out.columns["x"]), want.columns["x"])
    assert out.padded_elements == want.padded_elements == 2 * 3
    if make is FakeDeviceArray:
        assert "full" in XP.calls  # allocated by the array's library, told its device


def test_pad_crop_of_device_rows_of_different_shapes_stacks_them_on_the_device() -> None:
    rows = [fake([1, 2, 3], np.int32), fake([4], np.int32), fake([[5]], np.int32)]
    out = PadCrop(PadCropParams(input="x", shape=(2,))).process(Batch([0, 1, 2], {"x": rows}))
    assert out.rows == [0, 1]
    assert [why for _, why, _ in out.rejected] == ["bad_shape"]
    assert isinstance(out.columns["x"], FakeDeviceArray)
    assert out.columns["x"].tolist() == [[1, 2], [4, 0]]
    assert out.padded_elements == 1


def test_pad_crop_of_torch_rows_stacks_a_torch_tensor() -> None:
    rows = [torch.tensor([1, 2, 3]), torch.tensor([4])]
    out = PadCrop(PadCropParams(input="x", shape=(2,))).process(Batch([0, 1], {"x": rows}))
    assert isinstance(out.columns["x"], torch.Tensor)
    assert out.columns["x"].tolist() == [[1, 2], [4, 0]]


# -- Batch.reject, stacking, rename -------------------------------------------------------


@pytest.mark.parametrize("make", [FakeDeviceArray, torch.from_numpy])
def test_reject_cuts_a_device_column_with_its_own_indexing(
    make: Callable[[np.ndarray], Any],
) -> None:
    col = make(np.arange(8, dtype=np.float32).reshape(4, 2))
    batch = Batch(["a", "b", "c", "d"], {"x": col, "host": np.arange(4), "items": [1, 2, 3, 4]})
    out = batch.reject({1: ("bad", "one"), 3: ("bad", "three")})
    assert type(out.columns["x"]) is type(col)
    assert _host(out.columns["x"]).tolist() == [[0.0, 1.0], [4.0, 5.0]]
    assert out.columns["host"].tolist() == [0, 2]
    assert out.columns["items"] == [1, 3]
    assert out.rows == ["a", "c"]
    every = batch.reject({i: ("bad", "x") for i in range(4)})
    assert type(every.columns["x"]) is type(col)
    assert tuple(every.columns["x"].shape) == (0, 2)


def test_stack_if_uniform_stacks_device_rows_of_one_shape_with_their_library() -> None:
    stacked = stack_if_uniform([fake([1, 2]), fake([3, 4])])
    assert isinstance(stacked, FakeDeviceArray)
    assert stacked.tolist() == [[1, 2], [3, 4]]
    assert isinstance(stack_if_uniform([torch.zeros(2), torch.ones(2)]), torch.Tensor)
    ragged = [fake([1, 2]), fake([3])]
    assert stack_if_uniform(ragged) == ragged
    assert stack_if_uniform([b"a", b"b"]) == [b"a", b"b"]


def test_rename_moves_a_device_column_as_it_is() -> None:
    col = fake([1.0, 2.0])
    out = Rename(RenameParams(input="x", output="y")).process(Batch([0, 1], {"x": col}))
    assert out.columns["y"] is col


def test_array_namespace_is_the_arrays_own_library() -> None:
    from stages.base import array_namespace

    assert array_namespace(np.zeros(2)) is np
    assert array_namespace([np.zeros(2)]) is np
    assert array_namespace(fake([1.0])) is XP
    assert array_namespace(torch.zeros(2)) is torch


def test_the_tensor_stages_say_they_take_device_arrays_and_others_do_not() -> None:
    class HostOnly(StageBase):
        def signature(self, inputs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
            return dict(inputs)

    for stage in (
        Cast(CastParams(input="x", datatype="FP16")),
        Scale(ScaleParams(input="x")),
        PadCrop(PadCropParams(input="x", shape=(2,))),
        Rename(RenameParams(input="x", output="y")),
    ):
        assert stage.takes_device_arrays
        assert not stage.leaves_device_arrays  # type: ignore[attr-defined]
    assert not HostOnly(None).takes_device_arrays  # type: ignore[arg-type]


def test_the_gpu_stages_leave_device_arrays_only_on_cuda() -> None:
    from stages.preprocess.image_dali import DaliImage, DaliImageParams
    from stages.preprocess.image_fused import NormalizeNCHW, NormalizeNCHWParams

    fused = NormalizeNCHW(NormalizeNCHWParams(mean=[0, 0, 0], std=[1, 1, 1]))
    dali = DaliImage(DaliImageParams(resize=4, crop=4, mean=[0, 0, 0], std=[1, 1, 1]))
    for stage in (fused, dali):
        assert not stage.leaves_device_arrays  # as on the CPU
        stage._gpu = 0  # as `setup` leaves it on cuda:0 (no GPU here to set it up on)
        assert stage.leaves_device_arrays
