"""The v2 JSON body: requests built by Triton's own client decode to the Avro ones' requests;
defects name their field and whose request it was; results parse back in Triton's client."""

from __future__ import annotations

import contextlib
import json
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import oip_json
from schemas.codec import AvroCodec, request_from_record
from schemas.errors import DecodeError, RequestError, RequestIdentity, TensorError
from schemas.messages import Request, Result, Status, Timings

http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is a dev dependency")


def _decode(value: bytes, length: int | None = None, model: str | None = "tiny") -> Request:
    return request_from_record(oip_json.decode_request(value, length, model))


@pytest.mark.parametrize("binary", [False, True])
def test_tritons_client_requests_decode_to_the_same_request_as_avro(binary: bool) -> None:
    x = np.random.default_rng(3).standard_normal(64).astype(np.float32)
    ids = np.arange(6, dtype=np.int64).reshape(2, 3)
    texts = np.array([b"a", "héllo".encode(), b""], dtype=object)
    inputs = []
    for name, arr, datatype in (("x", x, "FP32"), ("ids", ids, "INT64"), ("s", texts, "BYTES")):
        t = http.InferInput(name, list(arr.shape), datatype)
        t.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(t)
    body, length = http.InferenceServerClient.generate_request_body(
        inputs, request_id="r-1", parameters={"reply_topic": "svc.replies", "tenant": "a"}
    )
    got = _decode(body, length)
    assert (got.id, got.model, got.reply_topic, got.parameters) == (
        "r-1", "tiny", "svc.replies", {"tenant": "a", "binary_data_output": "true"},
    )  # fmt: skip
    np.testing.assert_array_equal(got.inputs["x"], x)
    np.testing.assert_array_equal(got.inputs["ids"], ids)
    assert got.inputs["s"].tolist() == texts.tolist()
    avro = AvroCodec()
    same = avro.decode_request(avro.encode_request(got))
    for name in got.inputs:
        np.testing.assert_array_equal(same.inputs[name], got.inputs[name])


def test_the_body_names_the_model_and_version_over_the_header() -> None:
    body = {"model_name": "m2", "model_version": "4", "inputs": [_x()]}
    got = _decode(json.dumps(body).encode(), model="from-header")
    assert (got.model, got.model_version, got.id) == ("m2", "4", "")


def _x(**over: Any) -> dict[str, Any]:
    return {"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0]} | over


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        (b"{not json", DecodeError, "not a JSON inference request"),
        (b"[1, 2]", DecodeError, "a list, not an object"),
        (b"\xff\xfe", DecodeError, "not a JSON inference request"),
        ({"inputs": "x"}, DecodeError, "inputs: missing or not a list"),
        ({"inputs": [_x(datatype="FP8")]}, TensorError, "input 'x': unsupported datatype 'FP8'"),
        (
            {"inputs": [_x(shape=[3])]},
            TensorError,
            "input 'x': shape [3] holds 3 elements, data has 2",
        ),
        ({"inputs": [_x(shape="2")]}, TensorError, "input 'x': shape must be a list of integers"),
        ({"inputs": [_x(data=["a", "b"])]}, TensorError, "input 'x': data is not FP32"),
        (
            {"inputs": [_x(datatype="INT8", data=[1, 900])]},
            TensorError,
            "input 'x': data is not INT8",
        ),
        (
            {"inputs": [_x(datatype="BYTES", data=[1, 2])]},
            TensorError,
            "BYTES data must be strings",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2]}]},
            DecodeError,
            "input 'x': no data",
        ),
        ({"inputs": [_x(), _x()]}, DecodeError, "input 'x' appears twice"),
        ({"inputs": [{"datatype": "FP32"}]}, DecodeError, "inputs[0].name: missing"),
        (
            {"inputs": [_x()], "parameters": {"reply_topic": "a b"}},
            RequestError,
            "reply_topic 'a b' is not a legal",
        ),
        (
            {"inputs": [_x()], "parameters": {"deadline_ms": "soon"}},
            DecodeError,
            "parameters.deadline_ms: not an integer",
        ),
        ({"inputs": [_x()], "id": 7}, DecodeError, "id: not a string"),
        (
            {
                "inputs": [
                    {
                        "name": "x",
                        "datatype": "FP32",
                        "shape": [2],
                        "parameters": {"binary_data_size": 8},
                    }
                ]
            },
            DecodeError,
            "binary_data_size 8 runs past the 0 bytes left",
        ),
    ],
)
def test_defects_name_their_field(body: Any, error: type[RequestError], message: str) -> None:
    value = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(error) as e:
        _decode(value)
    assert type(e.value) is error
    assert message in str(e.value)


def test_a_refused_request_whose_fields_decoded_says_whose_it_is() -> None:
    body = {
        "id": "r9", "model_name": "tiny", "model_version": "2",
        "parameters": {"reply_topic": "svc.r"}, "inputs": [_x(shape=[5])],
    }  # fmt: skip
    with pytest.raises(TensorError) as e:
        _decode(json.dumps(body).encode())
    assert e.value.whose == RequestIdentity("r9", "tiny", "2", "svc.r")


def test_binary_data_the_header_length_does_not_fit_is_refused() -> None:
    with pytest.raises(DecodeError, match="outside the value's 4 bytes"):
        oip_json.decode_request(b"{}{}", 9)
    head = json.dumps({"model_name": "m", "inputs": [_x()]}).encode()
    with pytest.raises(DecodeError, match="3 bytes of binary data that no input claims"):
        oip_json.decode_request(head + b"abc", len(head))


def test_a_model_is_required() -> None:
    with pytest.raises(DecodeError, match="model_name: missing"):
        oip_json.decode_request(json.dumps({"inputs": []}).encode(), None, None)


LABEL = np.array([b"cat"], dtype=object)


@pytest.mark.parametrize("binary", [False, True])
def test_results_parse_back_in_tritons_client(binary: bool) -> None:
    result = Result(
        id="r1", model="tiny", model_version="1", status=Status.OK,
        outputs={"probs": np.array([0.25, 0.75], np.float32), "label": LABEL},
        timings=Timings(1, 2, 3, 4, 10), batch_size=8, topic="in", partition=2, offset=99,
    )  # fmt: skip
    body, length = oip_json.encode_result(result, binary)
    assert (length is not None) == binary
    parsed = http.InferenceServerClient.parse_response_body(body, header_length=length)
    np.testing.assert_array_equal(parsed.as_numpy("probs"), [0.25, 0.75])
    assert parsed.as_numpy("label").tolist() == ([b"cat"] if binary else ["cat"])
    response = parsed.get_response()
    assert (response["id"], response["model_name"], response["parameters"]["status"]) == (
        "r1", "tiny", "OK",
    )  # fmt: skip
    assert response["parameters"]["source_offset"] == 99
    assert "error" not in response
    expired = Result("r2", "tiny", "1", Status.EXPIRED, {}, Timings(), 0, "in", 0, 1, "late")
    assert json.loads(oip_json.encode_result(expired)[0])["error"] == "late"


# -- fuzz: anything at all is a request or a RequestError, never another exception ---------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
tensors = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["x", "y"]) | st.integers(),
        "datatype": st.sampled_from(["FP32", "INT64", "BYTES", "BOOL", "FP16", "UINT8", "X"]),
        "shape": st.lists(st.integers(-2, 4), max_size=3) | json_values,
        "data": json_values,
    },
    optional={"parameters": st.fixed_dictionaries({"binary_data_size": st.integers(-1, 16)})},
)
bodies = st.fixed_dictionaries(
    {"inputs": st.lists(tensors, max_size=3) | json_values},
    optional={
        "id": st.text(max_size=4) | json_values,
        "model_name": st.text(max_size=4),
        "parameters": st.dictionaries(
            st.sampled_from(["reply_topic", "deadline_ms", "k"]), json_values
        ),
    },
)


@given(bodies, st.binary(max_size=24), st.booleans())
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_body_is_a_request_or_a_request_error(body: Any, blob: bytes, split: bool) -> None:
    head = json.dumps(body).encode()
    value, length = (head + blob, len(head)) if split else (head, None)
    with contextlib.suppress(RequestError):
        _decode(value, length, model="m")


@given(st.binary(max_size=64))
@settings(max_examples=300, deadline=None)
def test_any_bytes_are_a_request_or_a_request_error(value: bytes) -> None:
    with contextlib.suppress(RequestError):
        _decode(value, None, model="m")


@given(st.integers(1, 200_000), st.sampled_from([b"[", b'{"a":']))
@settings(max_examples=25, deadline=None)
def test_any_nesting_depth_is_a_request_or_a_request_error(depth: int, opener: bytes) -> None:
    """Deeply nested data (hostile or not) is a dead letter, never a RecursionError."""
    closer = b"]" if opener == b"[" else b"}"
    data = opener * depth + b"1" + closer * depth
    value = b'{"model_name": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], '
    with contextlib.suppress(RequestError):
        _decode(value + b'"data": ' + data + b"}]}", None, model="m")


def test_nesting_past_the_recursion_limit_is_named() -> None:
    deep = b'{"inputs": [{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]}"
    with pytest.raises(DecodeError, match="nested too deeply"):
        oip_json.decode_request(deep, None, "m")


def test_binary_bytes_elements_are_length_prefixed_as_tritons_client_writes_them() -> None:
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "s",
                    "datatype": "BYTES",
                    "shape": [2],
                    "parameters": {"binary_data_size": 11},
                }
            ]
        }
    ).encode()
    blob = struct.pack("<I", 2) + b"ab" + struct.pack("<I", 1) + b"c"
    got = _decode(head + blob, len(head))
    assert got.inputs["s"].tolist() == [b"ab", b"c"]
