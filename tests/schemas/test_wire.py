"""The Confluent wire format, and the codec reading and writing it through a registry."""

from __future__ import annotations

import copy
import io
from typing import Any

import fastavro
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.codec import AvroCodec, load_schema
from schemas.errors import DecodeError
from schemas.messages import DeadLetter, Request, Timings
from schemas.wire import MAGIC, frame, protobuf_header, unframe, unframe_protobuf


class FakeRegistry:
    """In-memory Schema Registry: id → writer schema; counts lookups."""

    def __init__(self, schemas: dict[int, dict[str, Any]]) -> None:
        self.schemas = schemas
        self.lookups: list[int] = []

    def schema_by_id(self, schema_id: int) -> dict[str, Any]:
        self.lookups.append(schema_id)
        return self.schemas[schema_id]


def _write(schema: dict[str, Any], record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), record)
    return buf.getvalue()


def _request_record(**extra: Any) -> dict[str, Any]:
    return {
        "id": "r",
        "model": "m",
        "model_version": "3",
        "parameters": {"k": "v"},
        "deadline_ms": 99,
        "reply_topic": None,
        "inputs": [{"name": "x", "datatype": "INT8", "shape": [2], "data": b"\x01\xfe"}],
        **extra,
    }


def test_frame_is_magic_zero_then_big_endian_id() -> None:
    assert MAGIC == 0
    assert frame(258, b"payload") == b"\x00\x00\x00\x01\x02payload"
    assert frame(0, b"") == b"\x00" * 5
    assert frame(2**32 - 1, b"x") == b"\x00\xff\xff\xff\xffx"


@given(st.integers(0, 2**32 - 1), st.binary(max_size=50))
def test_unframe_inverts_frame(schema_id: int, payload: bytes) -> None:
    assert unframe(frame(schema_id, payload)) == (schema_id, payload)


def test_the_first_protobuf_message_is_one_zero_byte_as_confluent_writes_it() -> None:
    assert protobuf_header(5, [0]) == frame(5, b"\x00")
    assert protobuf_header(5, [3]) == frame(5, b"\x02\x06")  # count 1, index 3, zig-zag


@given(
    st.integers(0, 2**31 - 1),
    st.lists(st.integers(0, 2**20), min_size=1, max_size=5),
    st.binary(max_size=32),
)
def test_unframe_protobuf_inverts_protobuf_header(
    schema_id: int, indexes: list[int], payload: bytes
) -> None:
    value = protobuf_header(schema_id, indexes) + payload
    assert unframe_protobuf(value) == (schema_id, indexes, payload)


@pytest.mark.parametrize("magic", [1, 0x7F, 0x80, 0xFF])
def test_bad_magic_byte_is_a_decode_error(magic: int) -> None:
    with pytest.raises(DecodeError, match="wire-format magic byte is") as e:
        unframe(bytes([magic]) + b"\x00\x00\x00\x01payload")
    assert e.value.reason == "undecodable"


@pytest.mark.parametrize("size", range(5))
def test_input_shorter_than_the_header_is_a_decode_error(size: int) -> None:
    with pytest.raises(DecodeError, match=f"value of {size} bytes is shorter"):
        unframe(b"\x00" * size)


def test_writer_schema_with_an_extra_field_resolves_to_ours() -> None:
    writer = load_schema("request")
    writer["fields"].append({"name": "tenant", "type": "string", "default": ""})
    registry = FakeRegistry({7: writer})
    codec = AvroCodec(registry=registry)
    data = frame(7, _write(writer, _request_record(tenant="acme")))
    for _ in range(3):
        req = codec.decode_request(data)
        assert (req.id, req.model, req.model_version) == ("r", "m", "3")
        assert (req.parameters, req.deadline_ms, req.reply_topic) == ({"k": "v"}, 99, None)
        assert req.inputs["x"].tolist() == [1, -2]
    assert registry.lookups == [7]  # ids are immutable: one lookup, then the cache


def test_older_writer_without_a_field_gets_our_default() -> None:
    writer = copy.deepcopy(load_schema("request"))
    writer["fields"] = [f for f in writer["fields"] if f["name"] != "reply_topic"]
    record = _request_record()
    del record["reply_topic"]
    codec = AvroCodec(registry=FakeRegistry({3: writer}))
    req = codec.decode_request(frame(3, _write(writer, record)))
    assert req.reply_topic is None
    assert req.deadline_ms == 99


def test_framed_request_defects_are_decode_errors() -> None:
    codec = AvroCodec(registry=FakeRegistry({7: load_schema("request")}))
    good = _write(load_schema("request"), _request_record())
    with pytest.raises(DecodeError, match="schema id 99 not resolvable"):
        codec.decode_request(frame(99, good))
    with pytest.raises(DecodeError, match="magic byte"):
        codec.decode_request(b"\x02" + frame(7, good)[1:])
    with pytest.raises(DecodeError, match="shorter than the wire-format header"):
        codec.decode_request(b"\x00\x00")
    with pytest.raises(DecodeError, match="3 bytes after the record"):
        codec.decode_request(frame(7, good) + b"abc")
    with pytest.raises(DecodeError, match="not an InferenceRequest"):
        codec.decode_request(frame(7, good[:-4]))


def test_codec_with_ids_frames_everything_it_writes() -> None:
    registry = FakeRegistry({})
    codec = AvroCodec(registry, result_schema_id=8, dead_letter_schema_id=9, request_schema_id=7)
    plain = AvroCodec()

    request = Request("r", "m", {"x": np.arange(3, dtype=np.float32)})
    assert codec.encode_request(request) == frame(7, plain.encode_request(request))

    row = (0, "r", (0.0,) * 5, 1, "t", 0, 5)
    columns = {"y": np.zeros((1, 2), np.float32)}
    ours = codec.result_batch("m", "1", columns).encode(*row)  # type: ignore[arg-type]
    assert ours == frame(8, plain.result_batch("m", "1", columns).encode(*row))  # type: ignore[arg-type]

    letter = DeadLetter("bad_image", "e", "t", 0, 1, b"raw", 0)
    assert codec.encode_dead_letter(letter) == frame(9, plain.encode_dead_letter(letter))

    columns = {"y": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)}
    framed = codec.result_batch("m", "1", columns).encode(1, "r", (0.0,) * 5, 2, "t", 0, 0)
    assert framed == frame(
        8, plain.result_batch("m", "1", columns).encode(1, "r", (0.0,) * 5, 2, "t", 0, 0)
    )
    assert registry.lookups == []  # writing never needs the registry


def test_framed_results_and_dead_letters_decode_through_the_registry() -> None:
    registry = FakeRegistry({8: load_schema("result"), 9: load_schema("dead_letter")})
    codec = AvroCodec(registry, result_schema_id=8, dead_letter_schema_id=9)
    columns = {"y": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)}
    data = codec.result_batch("m", "1", columns).encode(1, "r", (1, 2, 3, 4, 5), 2, "t", 4, 42)
    assert unframe(data)[0] == 8
    result = codec.decode_result(data)
    assert result.outputs["y"].tolist() == [3.0, 4.0]
    assert (result.batch_size, result.partition, result.offset) == (2, 4, 42)
    assert result.timings == Timings(1, 2, 3, 4, 5)
    letter = DeadLetter("bad_image", "e", "t", 0, 1, b"raw", 0, "r", "m")
    assert codec.decode_dead_letter(codec.encode_dead_letter(letter)) == letter
    assert sorted(set(registry.lookups)) == [8, 9]


def test_a_framed_protobuf_value_gives_its_message_indexes_and_message() -> None:
    from schemas.wire import unframe_protobuf

    assert unframe_protobuf(frame(9, b"\x00" + b"msg")) == (9, [0], b"msg")  # the first: [0]
    # count 1 (zig-zag 2), index 2 (zig-zag 4): the third message of the file
    assert unframe_protobuf(frame(9, b"\x02\x04" + b"msg")) == (9, [2], b"msg")
    assert unframe_protobuf(frame(7, b"\x04\x02\x06")) == (7, [1, 3], b"")
    for bad in (b"\x02", b"\x02\x84", b"\xfe\x01"):
        with pytest.raises(DecodeError, match="message index"):
            unframe_protobuf(frame(1, bad))
