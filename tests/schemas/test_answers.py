"""Results read back in every encoding the pipeline writes them in, framed or not."""

from __future__ import annotations

import re
from typing import Any

import jsonschema
import numpy as np
import pytest

from schemas import oip_json, oip_protobuf
from schemas.answers import read_result
from schemas.codec import AvroCodec
from schemas.errors import DecodeError
from schemas.messages import Result, Status, Timings
from schemas.wire import frame, protobuf_header

CODEC = AvroCodec()
JSON = ("content-type", b"application/json")
PROTOBUF = ("content-type", b"application/x-protobuf")


def _result(status: Status = Status.OK, error: str | None = None) -> Result:
    outputs: dict[str, Any] = {
        "scores": np.array([[0.5, -1.25, 3.0]], np.float32),
        "classes": np.array([2], np.int64),
        "labels": np.array([b"cat", b"d\xc3\xb6g"], dtype=object),
    }
    if status is not Status.OK:
        outputs = {}
    return Result(
        "r1", "tiny", "2", status, outputs, Timings(1.5, 2, 3, 4, 10.5), 8, "in", 3, 41, error
    )


def _same(a: Result, b: Result) -> None:
    assert (a.id, a.model, a.model_version, a.status, a.error) == (
        b.id, b.model, b.model_version, b.status, b.error
    )  # fmt: skip
    assert (a.timings, a.batch_size, a.topic, a.partition, a.offset) == (
        b.timings, b.batch_size, b.topic, b.partition, b.offset
    )  # fmt: skip
    assert sorted(a.outputs) == sorted(b.outputs)
    for name, arr in a.outputs.items():
        assert b.outputs[name].shape == arr.shape
        np.testing.assert_array_equal(b.outputs[name], arr)


@pytest.mark.parametrize("framed", [False, True])
@pytest.mark.parametrize("binary", [False, True])
def test_json_results_read_back_plain_binary_and_framed(framed: bool, binary: bool) -> None:
    value, length = oip_json.encode_result(_result(), binary)
    headers = (
        [JSON] if length is None else [JSON, ("Inference-Header-Content-Length", b"%d" % length)]
    )
    if framed:
        value = frame(7, b"") + value
    _same(_result(), read_result(CODEC, value, headers))


@pytest.mark.parametrize("framed", [False, True])
def test_protobuf_results_read_back_plain_and_framed(framed: bool) -> None:
    value = oip_protobuf.encode_result(_result())
    if framed:
        value = protobuf_header(9, oip_protobuf.RESPONSE_INDEXES) + value
    _same(_result(), read_result(CODEC, value, [PROTOBUF]))


def test_avro_results_and_results_that_did_not_run_read_back() -> None:
    _same(_result(), read_result(CODEC, CODEC.encode_result(_result())))
    expired = _result(Status.EXPIRED, "deadline passed 3 ms before the batch")
    _same(expired, read_result(CODEC, oip_json.encode_result(expired)[0], [JSON]))
    _same(expired, read_result(CODEC, oip_protobuf.encode_result(expired), [PROTOBUF]))


def test_an_unreadable_answer_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="not a v2 JSON response"):
        read_result(CODEC, b"{nope", [JSON])
    with pytest.raises(DecodeError, match="not a ModelInferResponse"):
        read_result(CODEC, b"\xff\xff\xff", [PROTOBUF])


@pytest.mark.parametrize("status", list(Status))
def test_json_results_are_valid_by_the_registered_json_schema(status: Status) -> None:
    schema = oip_json.response_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    for binary in (False, True):
        value, length = oip_json.encode_result(
            _result(status, "x" if status != "OK" else None), binary
        )
        jsonschema.validate(oip_json.decode_result(value[:length]), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"id": "r", "model_name": "m", "outputs": []}, schema)


def test_the_registered_proto_declares_the_messages_in_the_order_the_descriptors_have() -> None:
    text = oip_protobuf.PROTO.read_text()
    declared = re.findall(r"^message (\w+)", text, re.MULTILINE)
    built = oip_protobuf.messages["ModelInferResponse"].DESCRIPTOR.file.message_types_by_name
    assert declared == list(built)
    assert [declared.index("ModelInferResponse")] == oip_protobuf.RESPONSE_INDEXES
    assert re.search(r"^package inference;", text, re.MULTILINE)
