"""Plain Avro requests, results and dead letters: round trips, and defects as RequestErrors."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import fastavro
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.codec import MAX_TENSORS, AvroCodec, load_schema
from schemas.errors import DecodeError, RequestError, RequestIdentity, TensorError
from schemas.messages import DeadLetter, Request, Status, Timings

CODEC = AvroCodec()
REQUEST_SCHEMA = fastavro.parse_schema(load_schema("request"))

NUMERIC_DTYPES = [
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


def _objects(*items: bytes) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = list(items)
    return arr


def _record(**over: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "id": "r",
        "model": "m",
        "model_version": None,
        "parameters": {},
        "deadline_ms": None,
        "reply_topic": None,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": b"\x00" * 8}],
    }
    rec.update(over)
    return rec


def _avro(rec: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, REQUEST_SCHEMA, rec)
    return buf.getvalue()


def _tensor(name: str, datatype: str, shape: list[int], data: bytes) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


@pytest.mark.parametrize("dtype", NUMERIC_DTYPES)
def test_request_round_trips_every_numeric_dtype(dtype: type) -> None:
    arr = (np.arange(6) % 5).astype(dtype).reshape(2, 3)
    back = CODEC.decode_request(CODEC.encode_request(Request("r", "m", {"t": arr})))
    assert back.inputs["t"].dtype == np.dtype(dtype)
    assert back.inputs["t"].shape == (2, 3)
    np.testing.assert_array_equal(back.inputs["t"], arr)


def test_request_round_trip_keeps_every_field() -> None:
    inputs = {
        "x": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
        "ids": np.array([1, -2, 2**40], np.int64),
        "scalar": np.array(7, np.int16),
        "image": _objects(b"\xff\xd8jpeg", b"", b"\x00\x01"),
    }
    req = Request(
        "id-1",
        "resnet",
        inputs,
        model_version="7",
        parameters={"tenant": "acme", "priority": "high"},
        deadline_ms=1_900_000_000_000,
        reply_topic="replies.acme",
    )
    back = CODEC.decode_request(CODEC.encode_request(req))
    assert (back.id, back.model, back.model_version) == ("id-1", "resnet", "7")
    assert back.parameters == {"tenant": "acme", "priority": "high"}
    assert (back.deadline_ms, back.reply_topic) == (1_900_000_000_000, "replies.acme")
    assert list(back.inputs) == ["x", "ids", "scalar", "image"]
    for name, arr in inputs.items():
        assert back.inputs[name].dtype == arr.dtype
        assert back.inputs[name].shape == arr.shape
        np.testing.assert_array_equal(back.inputs[name], arr)


def test_request_optional_fields_default_to_none_and_empty() -> None:
    back = CODEC.decode_request(CODEC.encode_request(Request("", "m", {})))
    assert back == Request("", "m", {}, None, {}, None, None)


def test_encoded_request_equals_fastavro_bytes() -> None:
    req = Request("r", "m", {"x": np.zeros(2, np.float32)})
    assert CODEC.encode_request(req) == _avro(_record())


def test_result_round_trip() -> None:
    outputs = {
        "scores": np.array([[0.9, 0.1]], np.float32),
        "classes": np.array([3, 1], np.int64),
        "labels": _objects(b"cat", b"dog"),
    }
    value = CODEC.result_batch("m", "2", {k: v[None] for k, v in outputs.items()}).encode(
        0, "r", (1.5, 2, 3, 4, 5.25), 8, "in", 3, 2**40
    )
    back = CODEC.decode_result(value)
    assert (back.id, back.model, back.model_version, back.status) == ("r", "m", "2", Status.OK)
    assert (back.batch_size, back.topic, back.partition, back.offset) == (8, "in", 3, 2**40)
    assert back.timings == Timings(1.5, 2, 3, 4, 5.25)
    assert back.error is None
    assert back.outputs["scores"].dtype == np.float32
    np.testing.assert_array_equal(back.outputs["scores"], outputs["scores"])
    assert back.outputs["classes"].tolist() == [3, 1]
    assert back.outputs["labels"].tolist() == [b"cat", b"dog"]


def test_error_result_round_trip() -> None:
    record = {
        "id": "r",
        "model": "m",
        "model_version": "1",
        "status": "EXPIRED",
        "outputs": [],
        "error": "deadline passed",
        "batch_size": 1,
        "timings": dict.fromkeys(Timings.__slots__, 0.0),
        "source": {"topic": "t", "partition": 0, "offset": 0},
    }
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(load_schema("result")), record)
    back = CODEC.decode_result(buf.getvalue())
    assert (back.status, back.error, back.outputs) == (Status.EXPIRED, "deadline passed", {})


@pytest.mark.parametrize(("rid", "model"), [("r", "m"), (None, None)])
def test_dead_letter_round_trip(rid: str | None, model: str | None) -> None:
    letter = DeadLetter("bad_tensor", "why", "t", 1, 2**35, b"\x00raw\xff", 123, rid, model)
    assert CODEC.decode_dead_letter(CODEC.encode_dead_letter(letter)) == letter
    letter.model_version, letter.reply_topic = "2", "svc.replies"
    assert CODEC.decode_dead_letter(CODEC.encode_dead_letter(letter)) == letter


def test_dead_letters_written_before_version_and_reply_topic_still_read() -> None:
    old = load_schema("dead_letter")
    old["fields"] = [f for f in old["fields"] if f["name"] not in ("model_version", "reply_topic")]
    record = {
        "id": "r", "model": "m", "reason": "bad_tensor", "error": "why",
        "source": {"topic": "t", "partition": 1, "offset": 5}, "payload": b"x",
        "failed_at_ms": 9,
    }  # fmt: skip
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(old), record)
    letter = CODEC.decode_dead_letter(buf.getvalue())
    assert letter == DeadLetter("bad_tensor", "why", "t", 1, 5, b"x", 9, "r", "m", None, None)


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (b"", DecodeError, "not an InferenceRequest"),
        (b"\xff" * 11, DecodeError, "not an InferenceRequest"),
        (b"\x02r\x02m\x04", DecodeError, "not an InferenceRequest"),  # bad union branch
        (_avro(_record()) + b"!", DecodeError, "1 bytes after the record"),
        (_avro(_record()) + b"\x00\x00", DecodeError, "2 bytes after the record"),
        (_avro(_record())[:-1], DecodeError, "not an InferenceRequest"),
        (_avro(_record())[:-12], DecodeError, "not an InferenceRequest"),
        (_avro(_record())[:3], DecodeError, "not an InferenceRequest"),
        (
            _avro(_record(inputs=[_tensor("x", "FP32", [3], b"\x00" * 8)])),
            TensorError,
            "input 'x': FP32[3] needs 12 bytes, got 8",
        ),
        (
            _avro(_record(inputs=[_tensor("x", "INT16", [2, 2], b"\x00" * 9)])),
            TensorError,
            "input 'x': INT16[2, 2] needs 8 bytes, got 9",
        ),
        (
            _avro(_record(inputs=[_tensor("x", "COMPLEX", [1], b"")])),
            TensorError,
            "input 'x': unsupported datatype 'COMPLEX'",
        ),
        (
            _avro(_record(inputs=[_tensor("x", "INT8", [-1], b"")])),
            TensorError,
            "negative dimension",
        ),
        (
            _avro(_record(inputs=[_tensor("x", "INT8", [1], b"\x01")] * 2)),
            DecodeError,
            "input 'x' appears twice",
        ),
        (
            _avro(_record(inputs=[_tensor("s", "BYTES", [2], b"\x01\x00\x00\x00a")])),
            TensorError,
            "input 's': BYTES[2] needs at least 8 bytes of length prefixes, got 5",
        ),
        (
            _avro(_record(inputs=[_tensor("s", "BYTES", [2], b"\x01\x00\x00\x00a" * 2 + b"!")])),
            TensorError,
            "input 's': BYTES tensor has 1 bytes after its 2 elements; each BYTES element is "
            "its 4-byte little-endian length then its bytes",
        ),
        (
            _avro(_record(inputs=[_tensor("s", "BYTES", [2], b"\xff\xd8\xff\xe0JFIF")])),
            TensorError,
            "input 's': BYTES element 0 claims 3774863615 bytes past the data's end; each "
            "BYTES element is its 4-byte little-endian length then its bytes, elements back to "
            "back (the Open Inference Protocol's binary form); only a tensor of one element may "
            "be sent without it",
        ),
        (
            _avro(_record(inputs=[_tensor(f"t{i}", "INT8", [], b"\x00") for i in range(65)])),
            DecodeError,
            f"request has more than {MAX_TENSORS} tensors",
        ),
    ],
)
def test_defects_become_request_errors_with_a_reason(
    data: bytes, error: type[RequestError], message: str
) -> None:
    with pytest.raises(error) as e:
        CODEC.decode_request(data)
    assert message in str(e.value)
    assert e.value.reason == {DecodeError: "undecodable", TensorError: "bad_tensor"}[error]


JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 4


@pytest.mark.parametrize(
    ("data", "element"),
    [
        (JPEG, JPEG),  # a file as it is: its first 4 bytes claim ~3.7 GB
        ("héllo wörld".encode(), "héllo wörld".encode()),
        (b"", b""),
        (b"abc", b"abc"),  # shorter than a length prefix
        (b"\x03\x00\x00\x00abc", b"abc"),  # framed: the prefix is the rest's length
        (b"\x02\x00\x00\x00abc", b"\x02\x00\x00\x00abc"),  # not exactly one element: bare
        (b"\x00\x00\x00\x00", b""),  # one framed empty element
    ],
)
@pytest.mark.parametrize("shape", [[1], [1, 1], []])
def test_one_bytes_element_may_come_bare_or_framed(
    data: bytes, element: bytes, shape: list[int]
) -> None:
    wire = _avro(_record(inputs=[_tensor("s", "BYTES", shape, data)]))
    for codec in (CODEC, AvroCodec(compiled=False)):
        [request] = codec.decode_requests([wire])
        assert isinstance(request, Request), request
        got = request.inputs["s"]
        assert got.shape == tuple(shape)
        assert got.reshape(-1)[0] == element
    # What the client side writes for that element decodes back to it.
    arr = np.empty(shape, dtype=object)
    arr.reshape(-1)[0] = element
    again = CODEC.decode_request(CODEC.encode_request(Request("r", "m", {"s": arr})))
    assert again.inputs["s"].reshape(-1)[0] == element


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({"inputs": [_tensor("x", "FP32", [2], np.zeros(2, np.float64).tobytes())]}, "bad_tensor"),
        ({"reply_topic": "no spaces allowed"}, "bad_request"),
        ({"inputs": [_tensor("x", "INT8", [1], b"\x01")] * 2}, "undecodable"),
        ({"inputs": [_tensor("s", "BYTES", [2], JPEG)]}, "bad_tensor"),
        # Refused while reading the tensors, before the reply topic that follows them.
        ({"inputs": [_tensor(f"t{i}", "INT8", [], b"\x00") for i in range(65)]}, "undecodable"),
    ],
)
@pytest.mark.parametrize("compiled", [True, False])
def test_a_refused_request_whose_fields_decoded_says_whose_it_is(
    over: dict[str, Any], reason: str, compiled: bool
) -> None:
    rec = _record(**{"id": "req-7", "model": "tiny", "model_version": "3"} | {
        "reply_topic": "svc.replies", **over
    })  # fmt: skip
    [error] = AvroCodec(compiled=compiled).decode_requests([_avro(rec)])
    assert isinstance(error, RequestError)
    assert error.reason == reason
    read = None if len(rec["inputs"]) > MAX_TENSORS else rec["reply_topic"]
    assert error.whose == RequestIdentity("req-7", "tiny", "3", read)


def test_bytes_that_are_not_a_request_name_no_one() -> None:
    [error] = CODEC.decode_requests([b"\xff" * 11])
    assert isinstance(error, DecodeError)
    assert error.whose is None


def test_an_id_that_is_not_utf8_is_a_decode_error() -> None:
    data = _avro(_record(id="é")).replace("é".encode(), b"\xff\xfe", 1)
    with pytest.raises(DecodeError, match="not an InferenceRequest"):
        CODEC.decode_request(data)


@given(st.binary(max_size=300))
@settings(max_examples=500)
def test_random_bytes_never_raise_anything_but_request_errors(data: bytes) -> None:
    with contextlib.suppress(RequestError):
        CODEC.decode_request(data)


@given(st.binary(min_size=1, max_size=60), st.integers(0, 200))
@settings(max_examples=300)
def test_mutated_requests_never_raise_anything_but_request_errors(noise: bytes, at: int) -> None:
    good = _avro(_record())
    pos = at % len(good)
    with contextlib.suppress(RequestError):
        CODEC.decode_request(good[:pos] + noise + good[pos + len(noise) :])


well_formed_tensors = st.builds(
    _tensor,
    st.sampled_from(["x", "y", "image"]),
    st.sampled_from(["FP32", "INT64", "UINT8", "BOOL", "FP16", "BYTES", "fp32", "STRING"]),
    st.lists(st.integers(-1, 4), max_size=3),
    st.binary(max_size=40),
)


@given(st.lists(well_formed_tensors, max_size=4))
@settings(max_examples=300)
def test_valid_avro_with_any_tensor_decodes_or_is_a_request_error(
    tensors: list[dict[str, Any]],
) -> None:
    try:
        request = CODEC.decode_request(_avro(_record(inputs=tensors)))
    except RequestError:
        return
    assert len(request.inputs) == len(tensors)
    for t in tensors:
        assert request.inputs[t["name"]].shape == tuple(t["shape"])


# Each is valid Avro whose tensor header asks NumPy for something it cannot give.
HOSTILE_SHAPES = [
    pytest.param(_tensor("s", "BYTES", [2**50], b""), id="bytes-petabyte-count"),
    pytest.param(_tensor("x", "FP32", [1] * 70, b"\x00" * 4), id="70-dims"),
    pytest.param(_tensor("x", "FP32", [0, 2**62, 2**62], b""), id="empty-but-huge-dims"),
]


@pytest.mark.parametrize("tensor", HOSTILE_SHAPES)
def test_shapes_numpy_cannot_hold_are_tensor_errors(tensor: dict[str, Any]) -> None:
    with pytest.raises(TensorError):
        CODEC.decode_request(_avro(_record(inputs=[tensor])))
