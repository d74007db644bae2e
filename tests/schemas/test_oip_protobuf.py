"""The v2 protobuf messages: what Triton's generated classes serialize decodes to the same
request as Avro; our responses parse in Triton's classes; defects name their field."""

from __future__ import annotations

import contextlib
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from triton_pb import service_pb2

from schemas import oip_protobuf
from schemas.codec import request_from_record
from schemas.errors import DecodeError, RequestError, TensorError
from schemas.messages import Request, Result, Status, Timings

pb = service_pb2()
triton = pytest.mark.skipif(pb is None, reason="tritonclient is a dev dependency")


def _decode(value: bytes, model: str | None = "tiny") -> Request:
    return request_from_record(oip_protobuf.decode_request(value, model))


def _triton_request(raw: bool) -> tuple[bytes, dict[str, np.ndarray]]:
    arrays = {
        "x": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3),
        "ids": np.array([1, -2, 3], np.int64),
        "small": np.array([-5, 7], np.int8),
        "flags": np.array([True, False]),
        "s": np.array([b"ab", "é".encode()], dtype=object),
    }
    request = pb.ModelInferRequest(model_name="tiny", model_version="2", id="p-1")
    request.parameters["reply_topic"].string_param = "svc.replies"
    request.parameters["deadline_ms"].int64_param = 1_900_000_000_000
    request.parameters["tenant"].string_param = "a"
    datatypes = {"x": "FP32", "ids": "INT64", "small": "INT8", "flags": "BOOL", "s": "BYTES"}
    fields = {"x": "fp32_contents", "ids": "int64_contents", "small": "int_contents",
              "flags": "bool_contents", "s": "bytes_contents"}  # fmt: skip
    for name, arr in arrays.items():
        t = request.inputs.add(name=name, datatype=datatypes[name])
        t.shape.extend(arr.shape)
        if raw:
            if name == "s":
                blob = b"".join(struct.pack("<I", len(e)) + e for e in arr.reshape(-1))
            else:
                blob = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
            request.raw_input_contents.append(blob)
        else:
            getattr(t.contents, fields[name]).extend(arr.reshape(-1).tolist())
    return request.SerializeToString(), arrays


@triton
@pytest.mark.parametrize("raw", [False, True])
def test_tritons_messages_decode_to_the_arrays_they_carry(raw: bool) -> None:
    value, arrays = _triton_request(raw)
    got = _decode(value, model=None)
    assert (got.id, got.model, got.model_version, got.reply_topic, got.deadline_ms) == (
        "p-1", "tiny", "2", "svc.replies", 1_900_000_000_000,
    )  # fmt: skip
    assert got.parameters == {"tenant": "a"}
    for name, arr in arrays.items():
        assert got.inputs[name].dtype == (object if arr.dtype == object else arr.dtype)
        assert got.inputs[name].tolist() == arr.tolist()


LABEL = np.array([b"cat"], dtype=object)


@triton
def test_responses_parse_in_tritons_classes() -> None:
    result = Result(
        id="p-1", model="tiny", model_version="1", status=Status.OK,
        outputs={"scores": np.array([0.5, 0.25], np.float32), "label": LABEL},
        timings=Timings(1, 2, 3, 4, 10), batch_size=8, topic="in", partition=2, offset=99,
    )  # fmt: skip
    response = pb.ModelInferResponse()
    response.ParseFromString(oip_protobuf.encode_result(result))
    assert (response.id, response.model_name, response.model_version) == ("p-1", "tiny", "1")
    assert response.parameters["status"].string_param == "OK"
    assert response.parameters["source_offset"].int64_param == 99
    assert response.parameters["compute_ms"].double_param == 3
    [scores, label] = response.outputs
    assert (scores.name, scores.datatype, list(scores.shape)) == ("scores", "FP32", [2])
    np.testing.assert_array_equal(
        np.frombuffer(response.raw_output_contents[0], "<f4"), [0.5, 0.25]
    )
    assert (label.datatype, response.raw_output_contents[1]) == ("BYTES", b"\x03\x00\x00\x00cat")
    expired = Result("r2", "tiny", "1", Status.EXPIRED, {}, Timings(), 0, "in", 0, 1, "late")
    response.ParseFromString(oip_protobuf.encode_result(expired))
    assert response.parameters["error"].string_param == "late"


def _request(**over: object) -> bytes:
    message = oip_protobuf.messages["ModelInferRequest"](
        id="q", model_name="tiny", model_version="3"
    )
    t = message.inputs.add(name="x", datatype=over.get("datatype", "FP32"))
    t.shape.extend(over.get("shape", [2]))
    if "raw" in over:
        message.raw_input_contents.extend(over["raw"])  # type: ignore[arg-type]
    else:
        t.contents.fp32_contents.extend([1.0, 2.0])
    if "reply" in over:
        message.parameters["reply_topic"].string_param = over["reply"]
    return message.SerializeToString()


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (b"\xff\xff\xff", DecodeError, "not a ModelInferRequest"),
        (_request(shape=[3]), TensorError, "input 'x': shape [3] holds 3 elements, contents has 2"),
        (_request(datatype="FP16"), TensorError, "FP16 travels only in raw_input_contents"),
        (_request(datatype="X"), TensorError, "unsupported datatype 'X'"),
        (_request(raw=[b"a", b"b"]), DecodeError, "raw_input_contents has 2 entries for 1 inputs"),
        (_request(raw=[b"\x00" * 7]), TensorError, "FP32[2] needs 8 bytes, got 7"),
        (_request(reply="no spaces"), RequestError, "reply_topic 'no spaces' is not a legal"),
    ],
)
def test_defects_name_their_field_and_whose_request(
    value: bytes, error: type[RequestError], message: str
) -> None:
    with pytest.raises(error) as e:
        _decode(value)
    assert type(e.value) is error
    assert message in str(e.value)
    if not message.startswith("not a"):
        assert e.value.whose is not None
        assert (e.value.whose.id, e.value.whose.model) == ("q", "tiny")


def test_the_same_request_as_fp16_raw_decodes() -> None:
    half = np.array([1.5, -2.0], np.float16)
    got = _decode(_request(datatype="FP16", raw=[half.tobytes()]))
    assert got.inputs["x"].tolist() == [1.5, -2.0]
    assert isinstance(_decode(_request()).inputs["x"], np.ndarray)


def test_a_model_is_required() -> None:
    bare = oip_protobuf.messages["ModelInferRequest"](id="q").SerializeToString()
    with pytest.raises(DecodeError, match="model_name: missing"):
        oip_protobuf.decode_request(bare, None)
    assert oip_protobuf.decode_request(bare, "only")["model"] == "only"


@given(st.binary(max_size=80))
@settings(max_examples=500, deadline=None)
def test_any_bytes_are_a_request_or_a_request_error(value: bytes) -> None:
    with contextlib.suppress(RequestError):
        _decode(value)


@given(st.lists(st.binary(max_size=12), max_size=3), st.lists(st.integers(-3, 4), max_size=3),
       st.sampled_from(["FP32", "BYTES", "INT64", "FP16", "BOOL", "?"]))  # fmt: skip
@settings(max_examples=300, deadline=None)
def test_any_raw_contents_are_a_request_or_a_request_error(
    raw: list[bytes], shape: list[int], datatype: str
) -> None:
    with contextlib.suppress(RequestError):
        _decode(_request(raw=raw, shape=shape, datatype=datatype))
