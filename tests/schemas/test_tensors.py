"""Open Inference Protocol tensors: datatype names, row-major bytes, BYTES packing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from schemas.errors import RequestError, TensorError
from schemas.tensors import (
    DATATYPES,
    TensorSpec,
    array_to_bytes,
    bytes_to_array,
    numpy_dtype,
    oip_datatype,
    oip_datatype_named,
    pack_bytes_elements,
    unpack_bytes_elements,
)

NUMERIC = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


def _objects(*items: object) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = list(items)
    return arr


def test_datatypes_are_the_twelve_numeric_ones_and_bytes() -> None:
    assert frozenset([*NUMERIC, "BYTES"]) == DATATYPES


@pytest.mark.parametrize(("name", "scalar"), NUMERIC.items())
def test_numeric_datatypes_map_both_ways(name: str, scalar: type) -> None:
    assert numpy_dtype(name) == np.dtype(scalar)
    assert oip_datatype(np.dtype(scalar)) == name


def test_bytes_maps_to_object_and_strings_map_to_bytes() -> None:
    assert numpy_dtype("BYTES") == np.dtype(object)
    assert oip_datatype(np.dtype(object)) == "BYTES"
    assert oip_datatype(np.dtype("S5")) == "BYTES"
    assert oip_datatype(np.dtype("U3")) == "BYTES"


@pytest.mark.parametrize("name", ["FP8", "fp32", "STRING", ""])
def test_unknown_datatype_names_are_tensor_errors(name: str) -> None:
    with pytest.raises(TensorError, match="unsupported datatype"):
        numpy_dtype(name)


@pytest.mark.parametrize("dtype", [np.complex64, "V4", "datetime64[s]"])
def test_dtypes_without_a_datatype_are_tensor_errors(dtype: object) -> None:
    with pytest.raises(TensorError, match="no Open Inference Protocol datatype"):
        oip_datatype(np.dtype(dtype))


@pytest.mark.parametrize(("name", "scalar"), NUMERIC.items())
@pytest.mark.parametrize("shape", [(), (3,), (2, 3), (0, 4)])
def test_numeric_round_trip(name: str, scalar: type, shape: tuple[int, ...]) -> None:
    arr = (np.arange(int(np.prod(shape))) % 7).astype(scalar).reshape(shape)
    datatype, dims, data = array_to_bytes(arr)
    assert (datatype, dims) == (name, list(shape))
    assert len(data) == arr.size * np.dtype(scalar).itemsize
    back = bytes_to_array(datatype, dims, data)
    assert back.shape == shape
    assert back.dtype == np.dtype(scalar)
    np.testing.assert_array_equal(back, arr)


def test_bytes_are_little_endian_and_row_major() -> None:
    arr = np.array([[1, 256], [-1, 2]], np.int32)
    assert array_to_bytes(arr)[2] == bytes.fromhex("0100000000010000ffffffff02000000")
    assert array_to_bytes(np.asfortranarray(arr))[2] == array_to_bytes(arr)[2]
    assert array_to_bytes(arr.T)[2] == bytes.fromhex("01000000ffffffff0001000002000000")
    assert bytes_to_array("UINT16", [2], b"\x01\x02\x03\x04").tolist() == [0x0201, 0x0403]


def test_decoded_numeric_arrays_are_read_only_views() -> None:
    data = np.arange(4, dtype=np.float32).tobytes()
    arr = bytes_to_array("FP32", [2, 2], data)
    assert not arr.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        arr[0, 0] = 1


@given(
    hnp.arrays(
        st.sampled_from([np.int8, np.uint16, np.int32, np.int64, np.float16, np.float64]),
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5),
    )
)
def test_any_numeric_array_round_trips_bit_for_bit(arr: np.ndarray) -> None:
    back = bytes_to_array(*array_to_bytes(arr))
    assert back.shape == arr.shape
    assert back.tobytes() == arr.tobytes()  # bitwise, so NaNs and -0.0 count too


def test_big_endian_arrays_are_written_little_endian() -> None:
    arr = np.array([1.5, -2.0], dtype=">f4")
    datatype, shape, data = array_to_bytes(arr)
    assert (datatype, shape) == ("FP32", [2])
    assert data == np.array([1.5, -2.0], dtype="<f4").tobytes()


def test_bytes_elements_are_length_prefixed_little_endian() -> None:
    packed = pack_bytes_elements([b"ab", b"", b"\x00" * 3])
    assert packed == b"\x02\x00\x00\x00ab" + b"\x00\x00\x00\x00" + b"\x03\x00\x00\x00\x00\x00\x00"
    assert unpack_bytes_elements(packed, 3) == [b"ab", b"", b"\x00" * 3]
    assert pack_bytes_elements([]) == b""
    assert unpack_bytes_elements(b"", 0) == []


@given(st.lists(st.binary(max_size=40), max_size=10))
def test_bytes_elements_round_trip(elements: list[bytes]) -> None:
    assert unpack_bytes_elements(pack_bytes_elements(elements), len(elements)) == elements


def test_bytes_tensor_round_trip_keeps_shape_and_encodes_strings() -> None:
    arr = _objects(b"\xff\xd8jpeg", b"", b"x", b"yz").reshape(2, 2)
    datatype, shape, data = array_to_bytes(arr)
    assert (datatype, shape) == ("BYTES", [2, 2])
    back = bytes_to_array(datatype, shape, data)
    assert back.dtype == object
    assert back.tolist() == [[b"\xff\xd8jpeg", b""], [b"x", b"yz"]]
    assert bytes_to_array(*array_to_bytes(np.array(["héllo", "a"]))).tolist() == [
        "héllo".encode(),
        b"a",
    ]
    assert bytes_to_array(*array_to_bytes(_objects(b"only").reshape(()))).tolist() == b"only"


@pytest.mark.parametrize(
    ("data", "count", "message"),
    [
        (b"\x01\x00", 1, "ends inside element 0's length prefix"),
        (b"\x01\x00\x00\x00a\x01\x00", 2, "ends inside element 1's length prefix"),
        (b"\x05\x00\x00\x00abc", 1, "element 0 claims 5 bytes past the data's end"),
        (b"\x01\x00\x00\x00ab", 1, "1 bytes after its 1 elements"),
        (b"\x00\x00\x00\x00", 0, "4 bytes after its 0 elements"),
    ],
)
def test_malformed_bytes_elements_are_tensor_errors(data: bytes, count: int, message: str) -> None:
    with pytest.raises(TensorError, match=message):
        unpack_bytes_elements(data, count)


@pytest.mark.parametrize(
    ("datatype", "shape", "data", "message"),
    [
        ("FP32", [3], b"\x00" * 8, r"FP32\[3\] needs 12 bytes, got 8"),
        ("INT64", [2, 2], b"\x00" * 33, r"INT64\[2, 2\] needs 32 bytes, got 33"),
        ("FP16", [], b"\x00", r"FP16\[\] needs 2 bytes, got 1"),
        ("INT8", [2, -1], b"", "negative dimension"),
        ("BYTES", [-2], b"", "negative dimension"),
        ("COMPLEX64", [1], b"\x00" * 8, "unsupported datatype 'COMPLEX64'"),
        ("BYTES", [2], b"\x00\x00\x00\x00", "needs at least 8 bytes of length prefixes, got 4"),
    ],
)
def test_tensors_that_do_not_fit_their_bytes_are_tensor_errors(
    datatype: str, shape: list[int], data: bytes, message: str
) -> None:
    with pytest.raises(TensorError, match=message) as e:
        bytes_to_array(datatype, shape, data)
    assert isinstance(e.value, RequestError)
    assert e.value.reason == "bad_tensor"


def test_spec_accepts_concrete_tensors_matching_fixed_dims() -> None:
    spec = TensorSpec("FP32", (None, 3))
    assert spec.accepts("FP32", (7, 3))
    assert spec.accepts("FP32", [1, 3])
    assert not spec.accepts("FP32", (7, 4))
    assert not spec.accepts("FP64", (7, 3))
    assert not spec.accepts("FP32", (3,))
    assert not spec.accepts("FP32", (1, 7, 3))
    assert TensorSpec("INT8", ()).accepts("INT8", ())


def test_spec_fits_another_only_when_every_tensor_would_be_accepted() -> None:
    fixed, free = TensorSpec("FP32", (4, 3)), TensorSpec("FP32", (None, 3))
    assert fixed.fits(free)
    assert fixed.fits(fixed)
    assert not free.fits(fixed)  # a free dimension may be anything, not just 4
    assert not fixed.fits(TensorSpec("FP16", (4, 3)))
    assert not fixed.fits(TensorSpec("FP32", (4, 3, 1)))


def test_spec_prints_free_dims_as_question_marks() -> None:
    assert str(TensorSpec("UINT8", (None, None, 3))) == "UINT8[?,?,3]"
    assert str(TensorSpec("BYTES", ())) == "BYTES[]"


@pytest.mark.parametrize(
    ("name", "datatype"),
    [
        ("float32", "FP32"),
        ("float16", "FP16"),
        ("int64", "INT64"),
        ("uint8", "UINT8"),
        ("bool", "BOOL"),
        ("string", "BYTES"),
        ("bfloat16", None),
        ("complex64", None),
        ("resource", None),
    ],
)
def test_datatype_by_framework_dtype_name(name: str, datatype: str | None) -> None:
    assert oip_datatype_named(name) == datatype
