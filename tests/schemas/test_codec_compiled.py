"""The compiled codec (schemas/_codec_fast.pyx) against the pure-Python reference.

Requests: on valid records both give equal `Request`s (same fields, arrays of the same
dtype, shape, bytes, writability and alignment); on bad bytes (truncations, random bytes,
bit flips, forged varints, too many tensors / parameters / dimensions, negative lengths,
wrong byte lengths, bad datatypes, duplicate names, bad reply topics) both give the same
error class, reason and message. Because the compiled reader hands every value it refuses
to the reference, equal outputs alone would prove little about its own checks, so
`classify` (what the compiled reader concluded by itself) is also checked: it never
accepts what the reference refuses, and it builds, rather than hands over, every valid
request except zero-size tensors whose shape NumPy might refuse.

Results: `ResultBatch.encode_all` gives the same bytes, byte for byte, with the Schema
Registry framing on and off, for every numeric datatype, BYTES and multi-dimensional rows.

Every comparison is skipped, with the reason shown, where the extension was not built;
`KP_REQUIRE_COMPILED_CODEC=1` (set by `make ci`) makes its absence a failure instead.
"""

from __future__ import annotations

import io
import math
import os
import struct
from typing import Any

import fastavro
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from schemas.binary import MAX_PARAMETERS, MAX_TENSORS, encode_long
from schemas.codec import COMPILED, AvroCodec, ResultBatch, load_schema
from schemas.errors import RequestError
from schemas.messages import Request
from schemas.tensors import MAX_DIMS

compiled_only = pytest.mark.skipif(
    not COMPILED,
    reason="compiled codec not built (no C compiler at install): nothing to compare it with",
)

FAST = AvroCodec()
PURE = AvroCodec(compiled=False)
REQUEST_SCHEMA = fastavro.parse_schema(load_schema("request"))


def fuzz(examples: int) -> settings:
    """Same examples every run, no deadline (pytest-timeout catches a hang)."""
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def test_the_compiled_codec_is_built_where_ci_requires_it() -> None:
    if os.environ.get("KP_REQUIRE_COMPILED_CODEC") != "1":
        pytest.skip("KP_REQUIRE_COMPILED_CODEC is not set (make ci sets it)")
    assert COMPILED, "schemas/_codec_fast.pyx was not built: is gcc or python3-dev missing?"


# -- comparing -----------------------------------------------------------------------------


def same_array(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> None:
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    assert a.flags.writeable == b.flags.writeable
    assert a.flags.aligned == b.flags.aligned
    assert a.flags.c_contiguous == b.flags.c_contiguous
    if a.dtype == object:
        assert a.tolist() == b.tolist()
    else:
        assert a.tobytes() == b.tobytes()  # NaNs and signed zeros included


def same_outcome(a: Request | RequestError, b: Request | RequestError) -> None:
    """The compiled codec's entry ``a`` is the reference's ``b``."""
    if isinstance(b, RequestError):
        assert isinstance(a, RequestError), f"compiled accepted what the reference refuses: {b}"
        assert (type(a), a.reason, str(a)) == (type(b), b.reason, str(b))
        return
    assert isinstance(a, Request), f"compiled refused a valid request: {a}"
    assert (a.id, a.model, a.model_version, a.deadline_ms, a.reply_topic) == (
        b.id,
        b.model,
        b.model_version,
        b.deadline_ms,
        b.reply_topic,
    )
    assert list(a.parameters.items()) == list(b.parameters.items())
    assert list(a.inputs) == list(b.inputs)
    for name in b.inputs:
        same_array(a.inputs[name], b.inputs[name])


def has_empty_tensor(value: bytes) -> bool:
    """Whether the reference reads a zero-size tensor from ``value`` (the one hand-over)."""
    result = PURE.decode_requests([value])[0]
    return isinstance(result, Request) and any(a.size == 0 for a in result.inputs.values())


def check(values: list[bytes]) -> None:
    """Batch against batch, and each value against the compiled reader's own verdict."""
    fast = FAST.decode_requests(values)
    pure = PURE.decode_requests(values)
    assert len(fast) == len(pure) == len(values)
    for a, b in zip(fast, pure, strict=True):
        same_outcome(a, b)
    from schemas import _codec_fast

    for value, b in zip(values, pure, strict=True):
        if type(value) is not bytes:
            continue
        verdict = _codec_fast.classify(value)
        if isinstance(b, RequestError):
            assert verdict in ("bad", "unsure"), (
                f"compiled built a request the reference refuses: {b}"
            )
        elif isinstance(verdict, Request):
            same_outcome(verdict, b)
        else:
            assert verdict == "unsure", verdict
            assert has_empty_tensor(value)


# -- valid requests --------------------------------------------------------------------------


def _bytes_array(items: list[bytes], shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr.reshape(shape)


NUMERIC = [
    np.bool_,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.float16,
    np.float32,
    np.float64,
]
shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4)
numeric_arrays = st.sampled_from(NUMERIC).flatmap(lambda dt: hnp.arrays(dt, shapes))


@st.composite
def bytes_arrays(draw: st.DrawFn) -> np.ndarray[Any, Any]:
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=3))
    items = draw(
        st.lists(st.binary(max_size=12), min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))
    )
    return _bytes_array(items, shape)


topics = st.from_regex(r"\A[A-Za-z0-9._-]{1,20}\Z") | st.sampled_from(
    ["", "a\n", "a" * 249, "a" * 250, "a b", "\n", "a\n\n", "é", "topic/x", "ok-topic\n"]
)
requests = st.builds(
    Request,
    id=st.text(max_size=12),
    model=st.sampled_from(["tiny-mlp", "efficientnet-lite0"]) | st.text(max_size=8),
    inputs=st.dictionaries(st.text(max_size=6), numeric_arrays | bytes_arrays(), max_size=4),
    model_version=st.none() | st.text(max_size=4),
    parameters=st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=4),
    deadline_ms=st.none() | st.integers(-(2**63), 2**63 - 1),
    reply_topic=st.none() | topics,
)


@compiled_only
@given(st.lists(requests, min_size=1, max_size=4))
@fuzz(400)
def test_requests_decode_to_equal_requests(batch: list[Request]) -> None:
    check([PURE.encode_request(r) for r in batch])


@compiled_only
def test_the_tiny_and_image_requests_are_built_by_the_compiled_reader() -> None:
    tiny = Request("r-1", "tiny-mlp", {"x": np.arange(64, dtype=np.float32)})
    image = Request("i-1", "efficientnet-lite0", {"image": _bytes_array([bytes(57_000)], (1,))})
    from schemas import _codec_fast

    for request in (tiny, image):
        value = PURE.encode_request(request)
        assert isinstance(_codec_fast.classify(value), Request)
        check([value])


# -- records that fastavro can write but may not be requests ---------------------------------


def record_bytes(record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, REQUEST_SCHEMA, record)
    return buf.getvalue()


ITEMSIZE = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2}
ITEMSIZE |= {"UINT32": 4, "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8}
BAD_DATATYPES = ["FP8", "fp32", "", "BYTES\x00", "FLOAT", "FP32 ", "Ü", "BF16"]
dims = st.integers(0, 5) | st.sampled_from([-1, -(2**63), 2**31, 2**40, 2**62, 2**63 - 1])


@st.composite
def raw_tensors(draw: st.DrawFn) -> dict[str, Any]:
    datatype = draw(st.sampled_from([*ITEMSIZE, "BYTES", *BAD_DATATYPES]))
    shape = draw(st.lists(dims, max_size=5))
    count = math.prod(max(d, 0) for d in shape)
    fits = all(d >= 0 for d in shape) and count <= 64
    if datatype == "BYTES" and fits and draw(st.booleans()):
        items = draw(st.lists(st.binary(max_size=6), min_size=count, max_size=count))
        data = b"".join(struct.pack("<I", len(e)) + e for e in items)
        data += draw(st.sampled_from([b"", b"", b"\x01", b"\x05\x00\x00\x00ab"]))
    elif datatype in ITEMSIZE and fits and draw(st.booleans()):
        data = draw(
            st.binary(min_size=count * ITEMSIZE[datatype], max_size=count * ITEMSIZE[datatype])
        )
        data = data[: len(data) - draw(st.sampled_from([0, 0, 0, 1]))]
    else:
        data = draw(st.binary(max_size=40))
    return {
        "name": draw(st.sampled_from(["x", "y", "é"])),
        "datatype": datatype,
        "shape": shape,
        "data": data,
    }


raw_records = st.fixed_dictionaries(
    {
        "id": st.text(max_size=8),
        "model": st.text(max_size=8),
        "model_version": st.none() | st.text(max_size=4),
        "inputs": st.lists(raw_tensors(), max_size=4),
        "parameters": st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=3),
        "deadline_ms": st.none() | st.integers(-(2**63), 2**63 - 1),
        "reply_topic": st.none() | topics,
    }
)


@compiled_only
@given(st.lists(raw_records.map(record_bytes), min_size=1, max_size=4))
@fuzz(1500)
def test_datatypes_shapes_lengths_names_and_topics_are_checked_alike(values: list[bytes]) -> None:
    check(values)


# -- broken bytes ----------------------------------------------------------------------------

valid_values = requests.map(PURE.encode_request) | raw_records.map(record_bytes)


@st.composite
def one_element_bytes(draw: st.DrawFn) -> bytes:
    """A BYTES tensor of one element, framed, bare, or bare with a prefix that nearly fits."""
    element = draw(st.binary(max_size=24))
    data = draw(
        st.sampled_from(
            [
                element,
                struct.pack("<I", len(element)) + element,
                struct.pack("<I", len(element) + 1) + element,
                struct.pack("<I", max(len(element) - 1, 0)) + element,
            ]
        )
    )
    shape = draw(st.sampled_from([[1], [1, 1], [], [1, 1, 1]]))
    tensor = {"name": "s", "datatype": "BYTES", "shape": shape, "data": data}
    return record_bytes({**draw(raw_records), "inputs": [tensor]})


@compiled_only
@given(st.lists(one_element_bytes(), min_size=1, max_size=4))
@fuzz(800)
def test_one_element_bytes_bare_or_framed_decode_alike(values: list[bytes]) -> None:
    check(values)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = draw(valid_values)
    n = len(data)
    op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite", "varint"]))
    at = draw(st.integers(0, n))
    if op == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            if out:
                out[draw(st.integers(0, n - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(out)
    if op == "truncate":
        return data[:at]
    if op == "insert":
        return data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    if op == "delete":
        return data[:at] + data[at + draw(st.integers(1, 8)) :]
    if op == "overwrite":
        junk = draw(st.binary(min_size=1, max_size=8))
        return data[:at] + junk + data[at + len(junk) :]
    fake = draw(
        st.sampled_from(
            [
                encode_long(-1),
                encode_long(-(2**63)),
                encode_long(2**63 - 1),
                encode_long(2**31),
                b"\xff" * 9 + b"\x7f",  # 70 bits
                b"\x80" * 9 + b"\x01",  # 2**63 before zig-zag: the longest legal varint
                b"\x80" * 9 + b"\x02",  # one bit too many
                b"\xff" * 12,  # never ends
                b"\x80\x80\x80\x00",  # zero, padded
            ]
        )
    )
    return data[:at] + fake + data[at + draw(st.integers(0, 3)) :]


@compiled_only
@given(st.lists(mutated() | st.binary(max_size=64), min_size=1, max_size=4))
@fuzz(3000)
def test_broken_bytes_give_the_same_errors(values: list[bytes]) -> None:
    check(values)


def _tensor(
    name: bytes, datatype: bytes = b"FP32", shape: bytes = b"\x00", data: bytes = b"\x00"
) -> bytes:
    return encode_long(len(name)) + name + encode_long(len(datatype)) + datatype + shape + data


HEAD = b"\x02r\x02m\x00"  # id "r", model "m", version null
TAIL = b"\x00\x00\x00"  # deadline null, reply null (after parameters)


def _pairs(n: int) -> bytes:
    return b"".join(encode_long(len(k)) + k + b"\x00" for k in (str(i).encode() for i in range(n)))


LIMITS = {
    "tensors at the limit": HEAD
    + encode_long(MAX_TENSORS)
    + b"".join(_tensor(str(i).encode(), data=encode_long(4) + bytes(4)) for i in range(MAX_TENSORS))
    + b"\x00\x00"
    + TAIL[1:],
    "one tensor too many": HEAD
    + encode_long(MAX_TENSORS + 1)
    + b"".join(_tensor(str(i).encode()) for i in range(MAX_TENSORS + 1))
    + b"\x00\x00"
    + TAIL[1:],
    "too many tensors over two blocks": HEAD
    + encode_long(MAX_TENSORS)
    + b"".join(_tensor(str(i).encode()) for i in range(MAX_TENSORS))
    + encode_long(1)
    + _tensor(b"last")
    + b"\x00\x00"
    + TAIL[1:],
    "a block count of -2**63": HEAD + encode_long(-(2**63)) + b"\x00",
    "a negative block count and its size": HEAD
    + encode_long(-1)
    + encode_long(99)
    + _tensor(b"x", shape=encode_long(1) + encode_long(1) + b"\x00", data=encode_long(4) + bytes(4))
    + b"\x00\x00"
    + TAIL[1:],
    "parameters at the limit": HEAD
    + b"\x00"
    + encode_long(MAX_PARAMETERS)
    + _pairs(MAX_PARAMETERS)
    + TAIL,
    "one parameter too many": HEAD
    + b"\x00"
    + encode_long(MAX_PARAMETERS + 1)
    + _pairs(MAX_PARAMETERS + 1)
    + TAIL,
    "dimensions at the limit": HEAD
    + encode_long(1)
    + _tensor(
        b"x",
        shape=encode_long(MAX_DIMS) + b"\x02" * MAX_DIMS + b"\x00",
        data=encode_long(4) + bytes(4),
    )
    + b"\x00\x00"
    + TAIL[1:],
    "one dimension too many": HEAD
    + encode_long(1)
    + _tensor(b"x", shape=encode_long(MAX_DIMS + 1) + b"\x02" * (MAX_DIMS + 1) + b"\x00")
    + b"\x00\x00"
    + TAIL[1:],
    "a negative length": b"\x01",
    "a length past the end": encode_long(2**40) + b"abc",
    "a zero-size tensor NumPy cannot shape": HEAD
    + encode_long(1)
    + _tensor(
        b"x", shape=encode_long(3) + encode_long(0) + encode_long(2**62) * 2 + b"\x00", data=b"\x00"
    )
    + b"\x00\x00"
    + TAIL[1:],
    "a zero-size tensor NumPy can shape": HEAD
    + encode_long(1)
    + _tensor(
        b"x",
        datatype=b"UINT8",
        shape=encode_long(2) + encode_long(0) + encode_long(2**40) + b"\x00",
        data=b"\x00",
    )
    + b"\x00\x00"
    + TAIL[1:],
    "a reply topic of 249 characters": HEAD + b"\x00\x00\x00\x02" + encode_long(249) + b"t" * 249,
    "a reply topic of 250 characters": HEAD + b"\x00\x00\x00\x02" + encode_long(250) + b"t" * 250,
    "a union branch of 2": HEAD[:-1] + b"\x04",
    "a union branch of -1": HEAD[:-1] + b"\x01",
    "a deadline of 2**63 before zig-zag (ten bytes)": HEAD
    + b"\x00\x00\x02"
    + b"\x80" * 9
    + b"\x01\x00",
    "a deadline of ten bytes, one bit too many": HEAD + b"\x00\x00\x02" + b"\x80" * 9 + b"\x02\x00",
    "a deadline of 70 bits": HEAD + b"\x00\x00\x02" + b"\xff" * 9 + b"\x7f\x00",
    "a deadline of eleven bytes": HEAD + b"\x00\x00\x02" + b"\x80" * 10 + b"\x00\x00",
    "a deadline padded with zeros": HEAD + b"\x00\x00\x02" + b"\x81\x80\x80\x00\x00",
    "a deadline cut inside its varint": HEAD + b"\x00\x00\x02" + b"\x80" * 9,
    "trailing bytes": HEAD + b"\x00\x00" + TAIL[1:] + b"\x00",
    "not UTF-8": b"\x02\xff\x02m\x00\x00\x00\x00\x00",
    "empty": b"",
}


@compiled_only
@pytest.mark.parametrize("value", LIMITS.values(), ids=LIMITS.keys())
def test_limits_and_edges(value: bytes) -> None:
    check([value])


@compiled_only
def test_values_that_are_not_bytes_are_the_references() -> None:
    good = PURE.encode_request(Request("r", "m", {"x": np.zeros(3, np.float32)}))
    values: list[Any] = [bytearray(good), memoryview(good), None, good]
    fast = FAST.decode_requests(values)
    pure = PURE.decode_requests(values)
    for a, b in zip(fast, pure, strict=True):
        same_outcome(a, b)
    assert isinstance(fast[0], Request)
    assert fast[0].inputs["x"].flags.writeable  # a bytearray's arrays are, in the reference


# -- results ---------------------------------------------------------------------------------


@st.composite
def columns(draw: st.DrawFn, rows: int) -> dict[str, np.ndarray[Any, Any]]:
    out: dict[str, np.ndarray[Any, Any]] = {}
    for name in draw(st.lists(st.text(max_size=6), unique=True, max_size=4)):
        row_shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3))
        if draw(st.integers(0, 4)) == 0:
            n = rows * int(np.prod(row_shape))
            items = draw(
                st.lists(st.binary(max_size=8) | st.text(max_size=4), min_size=n, max_size=n)
            )
            arr = np.empty(n, dtype=object)
            arr[:] = items
            out[name] = arr.reshape((rows, *row_shape))
        else:
            dtype = draw(st.sampled_from(NUMERIC))
            big_endian = draw(st.booleans()) and np.dtype(dtype).itemsize > 1
            dt = np.dtype(dtype).newbyteorder(">") if big_endian else np.dtype(dtype)
            out[name] = draw(hnp.arrays(dt, (rows, *row_shape)))
    return out


floats = st.floats(allow_nan=True, allow_infinity=True)
longs = st.integers(-(2**63), 2**63 - 1)


@st.composite
def result_batches(draw: st.DrawFn) -> tuple[Any, ...]:
    rows = draw(st.integers(0, 5))
    cols = draw(columns(rows))
    schema_id = draw(st.none() | st.integers(0, 2**32 - 1))
    rids = draw(st.lists(st.text(max_size=10), min_size=rows, max_size=rows))
    timings = draw(
        st.lists(st.tuples(floats, floats, floats, floats, floats), min_size=rows, max_size=rows)
    )
    topics_ = draw(st.lists(st.text(max_size=10), min_size=rows, max_size=rows))
    partitions = draw(st.lists(longs, min_size=rows, max_size=rows))
    offsets = draw(st.lists(longs, min_size=rows, max_size=rows))
    model, version = draw(st.text(max_size=10)), draw(st.text(max_size=4))
    size = draw(st.integers(0, 2**63 - 1))
    return schema_id, model, version, cols, (rids, timings, size, topics_, partitions, offsets)


def _batches(
    schema_id: int | None, model: str, version: str, cols: Any
) -> tuple[ResultBatch, ResultBatch]:
    fast = AvroCodec(result_schema_id=schema_id).result_batch(model, version, cols)
    pure = AvroCodec(result_schema_id=schema_id, compiled=False).result_batch(model, version, cols)
    return fast, pure


@compiled_only
@given(result_batches())
@fuzz(600)
def test_results_are_the_same_bytes(batch: tuple[Any, ...]) -> None:
    schema_id, model, version, cols, args = batch
    fast, pure = _batches(schema_id, model, version, cols)
    expected = pure.encode_all(*args)
    assert fast.encode_all(*args) == expected
    rids, timings, size, topics_, partitions, offsets = args
    assert expected == [
        pure.encode(i, rids[i], timings[i], size, topics_[i], partitions[i], offsets[i])
        for i in range(len(rids))
    ]


class Name(str):
    """A str subclass: written by the reference's own path."""


ODD_ROWS = {
    "int timings": (["a"], [(1, 2, 3, 4, 5)], 1, ["t"], [0], [0]),
    "list timings": (["a"], [[1.0, 2.0, 3.0, 4.0, 5.0]], 1, ["t"], [0], [0]),
    "four timings": (["a"], [(1.0, 2.0, 3.0, 4.0)], 1, ["t"], [0], [0]),
    "a str subclass": ([Name("a")], [(1.0,) * 5], 1, [Name("t")], [0], [0]),
    "a bool partition": (["a"], [(1.0,) * 5], True, ["t"], [True], [False]),
    "an offset past 64 bits": (["a"], [(1.0,) * 5], 1, ["t"], [0], [2**64]),
    "a batch size past 64 bits": (["a"], [(1.0,) * 5], 2**70, ["t"], [0], [1]),
    "a lone surrogate": (["\ud800"], [(1.0,) * 5], 1, ["t"], [0], [0]),
    "an id that is not a str": ([7], [(1.0,) * 5], 1, ["t"], [0], [0]),
    "more rows than the batch": (["a", "b", "c"], [(1.0,) * 5] * 3, 3, ["t"] * 3, [0] * 3, [0] * 3),
    "lengths that differ": (["a", "b"], [(1.0,) * 5], 2, ["t"] * 2, [0] * 2, [0] * 2),
}


@compiled_only
@pytest.mark.parametrize("schema_id", [None, 7, 2**32])
@pytest.mark.parametrize("args", ODD_ROWS.values(), ids=ODD_ROWS.keys())
def test_odd_rows_are_written_or_refused_as_the_reference_does(
    args: tuple[Any, ...], schema_id: int | None
) -> None:
    cols = {
        "y": np.arange(4, dtype=np.float32).reshape(2, 2),
        "s": np.array([b"a", b"bc"], dtype=object),
    }
    fast, pure = _batches(schema_id, "m", "1", cols)
    try:
        expected: Any = pure.encode_all(*args)
    except Exception as e:
        expected = (type(e), str(e))
    try:
        got: Any = fast.encode_all(*args)
    except Exception as e:
        got = (type(e), str(e))
    assert got == expected


def _objects(items: list[Any], shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr.reshape(shape)


ODD_COLUMNS = {
    "NumPy S strings": np.array([b"a\x00", b"bc"]),
    "NumPy U strings": np.array([["x", "é"], ["", "yz"]]),
    "ints in an object column": _objects([1, 2], (2,)),
    "a lone surrogate": _objects(["ok", "\ud800"], (2,)),
    "lists as cells": _objects([[b"a", b"b"], [b"c"]], (2,)),
    "a bytes subclass": _objects([np.bytes_(b"ab"), b"c"], (2,)),
    "rows of two": _objects([b"a", "b", b"", "dé"], (2, 2)),
    "an empty row shape": _objects([], (2, 0)),
}


@compiled_only
@pytest.mark.parametrize("column", ODD_COLUMNS.values(), ids=ODD_COLUMNS.keys())
def test_odd_bytes_columns_are_written_or_refused_as_the_reference_does(
    column: np.ndarray[Any, Any],
) -> None:
    args = (["a", "b"], [(1.0,) * 5] * 2, 2, ["t"] * 2, [0, 1], [5, 6])
    outcomes = []
    for codec in (AvroCodec(), AvroCodec(compiled=False)):
        try:
            outcomes.append(codec.result_batch("m", "1", {"c": column}).encode_all(*args))
        except Exception as e:
            outcomes.append((type(e), str(e)))
    assert outcomes[0] == outcomes[1]


@compiled_only
def test_plain_bytes_columns_are_built_by_the_compiled_codec() -> None:
    from schemas import _codec_fast
    from schemas.binary import ResultBatchEncoder

    column = _objects([b"cat", "tabby", b"", "dé", b"x" * 300, "y"], (3, 2))
    cells = _codec_fast.bytes_cells(column)
    assert cells is not None
    _, tensors = ResultBatchEncoder("m", "1", {"c": column}).parts
    assert cells == tensors[0][3]
