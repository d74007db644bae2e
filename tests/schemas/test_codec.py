from __future__ import annotations

import contextlib
import io
from typing import Any

import fastavro
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import DecodeError, RequestError, TensorError
from pipeline.messages import DeadLetter, Request, Result, Status, Timings
from schemas.codec import AvroCodec, load_schema
from schemas.wire import frame, unframe

CODEC = AvroCodec()


def _bytes_tensor(*items: bytes) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = list(items)
    return arr


def test_request_round_trip() -> None:
    inputs = {
        "x": np.arange(12, dtype=np.float32).reshape(3, 4),
        "ids": np.array([1, -2, 3], np.int64),
        "flags": np.array([True, False]),
        "half": np.array([0.5], np.float16),
        "image": _bytes_tensor(b"\xff\xd8jpeg", b""),
    }
    req = Request("id-1", "m", inputs, "7", {"a": "b"}, 1_900_000_000_000, "replies")
    back = CODEC.decode_request(CODEC.encode_request(req))
    assert (back.id, back.model, back.model_version) == ("id-1", "m", "7")
    assert (back.parameters, back.deadline_ms, back.reply_topic) == (
        {"a": "b"},
        1_900_000_000_000,
        "replies",
    )
    for name, arr in inputs.items():
        assert back.inputs[name].dtype == arr.dtype
        np.testing.assert_array_equal(back.inputs[name], arr)


def test_result_and_dead_letter_round_trip() -> None:
    outputs = {"scores": np.array([0.9, 0.1], np.float32), "labels": _bytes_tensor(b"cat", b"dog")}
    result = Result("r", "m", "1", Status.OK, outputs, Timings(1, 2, 3, 4, 5), 8, "t", 3, 42)
    back = CODEC.decode_result(CODEC.encode_result(result))
    assert (back.id, back.status, back.batch_size, back.partition, back.offset) == (
        "r",
        Status.OK,
        8,
        3,
        42,
    )
    assert back.timings == Timings(1, 2, 3, 4, 5)
    assert back.outputs["labels"].tolist() == [b"cat", b"dog"]
    letter = DeadLetter("bad_tensor", "why", "t", 1, 9, b"\x00raw", 123, "r", "m")
    assert CODEC.decode_dead_letter(CODEC.encode_dead_letter(letter)) == letter


def _record(**over: Any) -> bytes:
    rec = {
        "id": "r",
        "model": "m",
        "model_version": None,
        "parameters": {},
        "deadline_ms": None,
        "reply_topic": None,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": b"\x00" * 8}],
    }
    rec.update(over)
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(load_schema("request")), rec)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (b"", DecodeError, "not an InferenceRequest"),
        (b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", DecodeError, "not an InferenceRequest"),
        (_record() + b"!", DecodeError, "1 bytes after the record"),
        (_record()[:-3], DecodeError, "not an InferenceRequest"),
        (
            _record(inputs=[{"name": "x", "datatype": "FP32", "shape": [3], "data": b"\x00" * 8}]),
            TensorError,
            "input 'x': FP32[3] needs 12 bytes, got 8",
        ),
        (
            _record(inputs=[{"name": "x", "datatype": "COMPLEX", "shape": [1], "data": b""}]),
            TensorError,
            "unsupported datatype 'COMPLEX'",
        ),
        (
            _record(inputs=[{"name": "x", "datatype": "INT8", "shape": [-1], "data": b""}]),
            TensorError,
            "negative dimension",
        ),
        (
            _record(inputs=[{"name": "x", "datatype": "INT8", "shape": [1], "data": b"\x01"}] * 2),
            DecodeError,
            "input 'x' appears twice",
        ),
        (
            _record(
                inputs=[
                    {"name": "s", "datatype": "BYTES", "shape": [2], "data": b"\x01\x00\x00\x00a"}
                ]
            ),
            TensorError,
            "BYTES tensor ends inside element 1",
        ),
    ],
)
def test_defects_become_request_errors_with_a_reason(
    data: bytes, error: type, message: str
) -> None:
    with pytest.raises(error) as e:
        CODEC.decode_request(data)
    assert message in str(e.value)


@given(st.binary(max_size=300))
@settings(max_examples=500)
def test_random_bytes_never_raise_anything_but_request_errors(data: bytes) -> None:
    with contextlib.suppress(RequestError):
        CODEC.decode_request(data)


@given(st.binary(min_size=1, max_size=60), st.integers(0, 200))
@settings(max_examples=300)
def test_mutated_requests_never_raise_anything_but_request_errors(noise: bytes, at: int) -> None:
    good = _record()
    pos = at % len(good)
    with contextlib.suppress(RequestError):
        CODEC.decode_request(good[:pos] + noise + good[pos + len(noise) :])


class FakeRegistry:
    """In-memory Schema Registry: id → schema."""

    def __init__(self, schemas: dict[int, dict[str, Any]]) -> None:
        self.schemas = schemas
        self.lookups = 0

    def schema_by_id(self, schema_id: int) -> dict[str, Any]:
        self.lookups += 1
        return self.schemas[schema_id]


def test_wire_format_frames_and_unframes() -> None:
    framed = frame(258, b"payload")
    assert framed == b"\x00\x00\x00\x01\x02payload"
    assert unframe(framed) == (258, b"payload")
    with pytest.raises(DecodeError, match="magic byte is 1"):
        unframe(b"\x01\x00\x00\x00\x01x")
    with pytest.raises(DecodeError, match="shorter than the wire-format header"):
        unframe(b"\x00\x00")


def test_registry_codec_resolves_a_newer_writer_schema() -> None:
    writer = load_schema("request")
    writer["fields"].append({"name": "tenant", "type": "string", "default": ""})
    registry = FakeRegistry({7: writer})
    codec = AvroCodec(registry=registry, result_schema_id=8, dead_letter_schema_id=9)
    rec = {
        "id": "r",
        "model": "m",
        "model_version": None,
        "parameters": {},
        "deadline_ms": None,
        "reply_topic": None,
        "tenant": "acme",
        "inputs": [{"name": "x", "datatype": "INT8", "shape": [2], "data": b"\x01\x02"}],
    }
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(writer), rec)
    for _ in range(2):
        req = codec.decode_request(frame(7, buf.getvalue()))
        assert req.inputs["x"].tolist() == [1, 2]
    assert registry.lookups == 1  # ids are immutable: looked up once
    with pytest.raises(DecodeError, match="schema id 99 not resolvable"):
        codec.decode_request(frame(99, buf.getvalue()))

    letter = DeadLetter("r", "e", "t", 0, 1, b"", 0)
    assert unframe(codec.encode_dead_letter(letter))[0] == 9
    batch = codec.result_batch("m", "1", {"y": np.zeros((1, 2), np.float32)})
    assert unframe(batch.encode(0, "r", (0.0,) * 5, 1, "t", 0, 0))[0] == 8
