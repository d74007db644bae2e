"""The specialised Avro reader/writer agree with fastavro byte for byte."""

from __future__ import annotations

import io
from typing import Any

import fastavro
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.binary import ResultBatchEncoder, decode_long, encode_long, read_request
from schemas.codec import load_schema

REQUEST = fastavro.parse_schema(load_schema("request"))
RESULT = fastavro.parse_schema(load_schema("result"))

text = st.text(max_size=20)
longs = st.integers(min_value=-(2**63), max_value=2**63 - 1)
tensors = st.fixed_dictionaries(
    {
        "name": text,
        "datatype": st.sampled_from(["FP32", "INT64", "BYTES", "UINT8"]),
        "shape": st.lists(st.integers(0, 2**40), max_size=4),
        "data": st.binary(max_size=64),
    }
)
requests = st.fixed_dictionaries(
    {
        "id": text,
        "model": text,
        "model_version": st.none() | text,
        "inputs": st.lists(tensors, max_size=4),
        "parameters": st.dictionaries(text, text, max_size=3),
        "deadline_ms": st.none() | longs,
        "reply_topic": st.none() | text,
    }
)


def _fastavro_bytes(schema: Any, record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, record)
    return buf.getvalue()


@given(longs)
def test_long_round_trip_matches_avro(n: int) -> None:
    assert decode_long(encode_long(n), 0) == (n, len(encode_long(n)))
    assert encode_long(n) == _fastavro_bytes("long", n)


@given(requests)
@settings(max_examples=300)
def test_read_request_equals_fastavro(record: dict[str, Any]) -> None:
    data = _fastavro_bytes(REQUEST, record)
    assert read_request(data) == fastavro.schemaless_reader(io.BytesIO(data), REQUEST)


@given(requests, st.integers(1, 10))
def test_read_request_refuses_truncation_and_trailing_bytes(
    record: dict[str, Any], cut: int
) -> None:
    data = _fastavro_bytes(REQUEST, record)
    with pytest.raises((ValueError, IndexError, UnicodeDecodeError)):
        read_request(data[: max(0, len(data) - cut)])
    with pytest.raises(ValueError, match="after the record"):
        read_request(data + b"\x00")


def test_blocks_with_byte_sizes_are_read() -> None:
    # Avro writers may emit negative block counts followed by the block's byte size.
    tensor = (
        encode_long(1)
        + b"x"
        + encode_long(4)
        + b"FP32"
        + b"\x00"  # name, datatype, shape=[]
        + encode_long(4)
        + b"\x00" * 4  # data
    )
    body = (
        encode_long(1)
        + b"a"
        + encode_long(1)
        + b"m"
        + b"\x00"  # id, model, version=null
        + encode_long(-1)
        + encode_long(len(tensor))
        + tensor
        + b"\x00"  # inputs
        + b"\x00"
        + b"\x00"
        + b"\x00"  # parameters, deadline, reply_topic
    )
    assert read_request(body)["inputs"][0]["name"] == "x"


@given(
    rows=st.integers(1, 5),
    k=st.integers(0, 4),
    ids=st.lists(text, min_size=5, max_size=5),
    offsets=st.lists(st.integers(0, 2**62), min_size=5, max_size=5),
    batch_size=st.integers(1, 2**31 - 1),
    timing=st.floats(allow_nan=False, allow_infinity=False),
)
@settings(max_examples=200)
def test_result_batch_equals_fastavro(
    rows: int, k: int, ids: list[str], offsets: list[int], batch_size: int, timing: float
) -> None:
    rng = np.random.default_rng(k)
    labels = np.array(
        [[f"label-{r}-{j}".encode() for j in range(k)] for r in range(rows)], dtype=object
    ).reshape(rows, k)
    columns = {
        "classes": rng.integers(0, 1000, (rows, k)).astype(np.int64),
        "scores": rng.random((rows, k)).astype(np.float32),
        "labels": labels,
        "scalar": rng.random(rows).astype(np.float64),
    }
    enc = ResultBatchEncoder("model-x", "3", columns)
    timings = (timing, 1.0, 2.0, 3.0, -timing)
    for i in range(rows):
        ours = enc.encode(i, ids[i], timings, batch_size, "topic-a", i, offsets[i])
        record = {
            "id": ids[i],
            "model": "model-x",
            "model_version": "3",
            "status": "OK",
            "outputs": [
                {
                    "name": "classes",
                    "datatype": "INT64",
                    "shape": [k],
                    "data": columns["classes"][i].tobytes(),
                },
                {
                    "name": "scores",
                    "datatype": "FP32",
                    "shape": [k],
                    "data": columns["scores"][i].tobytes(),
                },
                {
                    "name": "labels",
                    "datatype": "BYTES",
                    "shape": [k],
                    "data": b"".join(len(e).to_bytes(4, "little") + e for e in labels[i]),
                },
                {
                    "name": "scalar",
                    "datatype": "FP64",
                    "shape": [],
                    "data": columns["scalar"][i].tobytes(),
                },
            ],
            "error": None,
            "timings": dict(
                zip(
                    ["queue_ms", "preprocess_ms", "compute_ms", "postprocess_ms", "end_to_end_ms"],
                    timings,
                    strict=True,
                )
            ),
            "batch_size": batch_size,
            "source": {"topic": "topic-a", "partition": i, "offset": offsets[i]},
        }
        assert ours == _fastavro_bytes(RESULT, record)
