"""The Open Inference Protocol's JSON body on Kafka (KServe / Triton "v2"), both ways.

A record whose topic is declared ``json`` in topology.yaml, or whose ``content-type``
header says ``application/json``, carries a v2 inference request as its value::

    {"id": "r1", "model_name": "tiny-mlp",
     "parameters": {"reply_topic": "svc.replies", "deadline_ms": 1767225600000},
     "inputs": [{"name": "x", "datatype": "FP32", "shape": [64], "data": [0.1, ...]}]}

Tensors hold one item, without a batch dimension, as in Avro. ``data`` is a flat or
nested row-major list; BYTES elements are strings (UTF-8). The binary-data extension
works as over HTTP: an input with ``"parameters": {"binary_data_size": N}`` takes the
next N bytes after the JSON, whose length the record's
``Inference-Header-Content-Length`` header gives (numbers little-endian, BYTES elements
each behind a 4-byte length, as Triton's clients write them). The model comes from
``model_name`` (and ``model_version``), else the record's ``kp.model`` header, else the
topology's only model. ``parameters.reply_topic`` and ``parameters.deadline_ms`` are the
Avro request's fields of those names; other parameters travel as strings.

The decoded record goes through the same checks as an Avro request
(`schemas.codec.request_from_record`), so a defect gets the same dead letter, naming the
field, and whose request it was. Results go back as v2 response bodies (`encode_result`).
This path is plain Python (`json`), several times slower per request than the compiled
Avro codec; `python -m load.encodings` measures both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from schemas.errors import DecodeError, RequestError, RequestIdentity, TensorError
from schemas.messages import Result
from schemas.tensors import (
    _WIRE_DTYPE,
    DATATYPES,
    array_to_bytes,
    oip_datatype,
    pack_bytes_elements,
)

__all__ = [
    "CONTENT_TYPE",
    "HEADER_LENGTH",
    "RESPONSE_SCHEMA",
    "decode_request",
    "decode_result",
    "encode_result",
    "response_schema",
]

CONTENT_TYPE = "application/json"
HEADER_LENGTH = "inference-header-content-length"
"""The record header (any case) that splits a value into JSON and binary tensor data."""

RESPONSE_SCHEMA = Path(__file__).with_name("oip_v2_response.schema.json")
"""The JSON Schema of the results this module writes; registered where a registry is set."""


def response_schema() -> dict[str, Any]:
    """The results' JSON Schema (its ``title`` is the record name registries use)."""
    schema: dict[str, Any] = json.loads(RESPONSE_SCHEMA.read_text(encoding="utf-8"))
    return schema


def decode_request(
    value: bytes, header_length: int | None = None, model: str | None = None
) -> dict[str, Any]:
    """A v2 JSON request as the Avro request's record (the shape `fastavro` reads).

    ``header_length``: the JSON's length when binary data follows it; ``model``: the
    model when the body names none. Raises `DecodeError` or `TensorError` naming the field.
    """
    if header_length is None:
        head, blob = value, b""
    elif not 0 <= header_length <= len(value):
        raise DecodeError(
            f"{HEADER_LENGTH} {header_length} is outside the value's {len(value)} bytes"
        )
    else:
        head, blob = value[:header_length], value[header_length:]
    try:
        body = json.loads(head)
    except (ValueError, UnicodeDecodeError) as e:
        raise DecodeError(f"not a JSON inference request: {e}") from None
    except RecursionError:  # arrays or objects nested past Python's recursion limit
        raise DecodeError("not a JSON inference request: nested too deeply") from None
    if not isinstance(body, dict):
        raise DecodeError(f"not a JSON inference request: a {type(body).__name__}, not an object")
    rid = _optional_str(body, "id") or ""
    name = _optional_str(body, "model_name") or model
    if not name:
        raise DecodeError("model_name: missing (or a kp.model header, or a one-model topology)")
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise DecodeError("parameters: not an object")
    reply = params.pop("reply_topic", None)
    if reply is not None and not isinstance(reply, str):
        raise DecodeError("parameters.reply_topic: not a string")
    deadline = params.pop("deadline_ms", None)
    if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, int)):
        raise DecodeError("parameters.deadline_ms: not an integer")
    inputs = body.get("inputs")
    if not isinstance(inputs, list):
        raise DecodeError("inputs: missing or not a list")
    version = _optional_str(body, "model_version")
    tensors = []
    at = 0
    try:
        for i, t in enumerate(inputs):
            tensor, used = _tensor(t, i, blob, at)
            tensors.append(tensor)
            at += used
        if at != len(blob):
            raise DecodeError(f"{len(blob) - at} bytes of binary data that no input claims")
    except RequestError as e:  # the request's own fields decoded: say whose it was
        e.whose = RequestIdentity(rid, name, version or None, reply or None)
        raise
    return {
        "id": rid,
        "model": name,
        "model_version": version,
        "inputs": tensors,
        "parameters": {str(k): _param(v) for k, v in params.items()},
        "deadline_ms": deadline,
        "reply_topic": reply,
    }


def _optional_str(body: Mapping[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise DecodeError(f"{key}: not a string")
    return value


def _param(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else json.dumps(value)


def _tensor(t: Any, i: int, blob: bytes, at: int) -> tuple[dict[str, Any], int]:
    """One input as the Avro record's tensor, and the binary bytes it took."""
    where = f"inputs[{i}]"
    if not isinstance(t, dict):
        raise DecodeError(f"{where}: not an object")
    name, datatype, shape = t.get("name"), t.get("datatype"), t.get("shape")
    if not isinstance(name, str):
        raise DecodeError(f"{where}.name: missing or not a string")
    where = f"input {name!r}"
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise TensorError(f"{where}: unsupported datatype {datatype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in shape
    ):
        raise TensorError(f"{where}: shape must be a list of integers, got {shape!r}")
    params = t.get("parameters") or {}
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= len(blob) - at:
            raise DecodeError(
                f"{where}: binary_data_size {size!r} runs past the {len(blob) - at} bytes left"
            )
        if "data" in t:
            raise DecodeError(f"{where}: both data and binary_data_size")
        return {
            "name": name,
            "datatype": datatype,
            "shape": shape,
            "data": blob[at : at + size],
        }, size
    if "data" not in t:
        raise DecodeError(f"{where}: no data (nor parameters.binary_data_size)")
    data = _data_bytes(t["data"], datatype, shape, where)
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}, 0


def _data_bytes(data: Any, datatype: str, shape: list[int], where: str) -> bytes:
    """JSON tensor data as the wire's bytes; the element count checked against the shape."""
    if not isinstance(data, list):
        data = [data]
    count = math.prod(shape) if shape and min(shape) >= 0 else None
    if datatype == "BYTES":
        flat = _flatten(data)
        if not all(isinstance(e, str) for e in flat):
            raise TensorError(f"{where}: BYTES data must be strings")
        _check_count(len(flat), count, shape, where)
        return pack_bytes_elements([e.encode() for e in flat])
    dtype = _WIRE_DTYPE[datatype]
    try:
        arr = np.array(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as e:
        raise TensorError(f"{where}: data is not {datatype}: {e}") from None
    _check_count(arr.size, count, shape, where)
    return arr.tobytes()


def _check_count(n: int, count: int | None, shape: list[int], where: str) -> None:
    if count is not None and n != count:
        raise TensorError(f"{where}: shape {shape} holds {count} elements, data has {n}")


def _flatten(data: list[Any]) -> list[Any]:
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def encode_result(result: Result, binary: bool = False) -> tuple[bytes, int | None]:
    """A result as a v2 response body, and its JSON's length when binary data follows.

    kp-pipeline's own fields go under ``parameters``. Outputs are flat row-major lists
    (BYTES as UTF-8 strings, undecodable bytes replaced), or with ``binary`` (the request
    asked ``binary_data_output``) raw little-endian bytes after the JSON, BYTES elements
    length-prefixed, each output saying its ``binary_data_size``. A result that did not
    run (EXPIRED, ERROR) also has the v2 ``error`` field.
    """
    t = result.timings
    blobs: list[bytes] = []
    body: dict[str, Any] = {
        "id": result.id,
        "model_name": result.model,
        "model_version": result.model_version,
        "outputs": [
            _output(name, arr, blobs if binary else None) for name, arr in result.outputs.items()
        ],
        "parameters": {
            "status": result.status.value,
            "batch_size": result.batch_size,
            "source_topic": result.topic,
            "source_partition": result.partition,
            "source_offset": result.offset,
            "queue_ms": t.queue_ms,
            "preprocess_ms": t.preprocess_ms,
            "compute_ms": t.compute_ms,
            "postprocess_ms": t.postprocess_ms,
            "end_to_end_ms": t.end_to_end_ms,
        },
    }
    if result.error is not None:
        body["error"] = result.error
    head = json.dumps(body, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


def _output(name: str, arr: np.ndarray[Any, Any], blobs: list[bytes] | None) -> dict[str, Any]:
    arr = np.asarray(arr)
    text = arr.dtype == object or arr.dtype.kind in "SU"
    out: dict[str, Any] = {
        "name": name,
        "datatype": "BYTES" if text else oip_datatype(arr.dtype),
        "shape": list(arr.shape),
    }
    if blobs is not None:
        _, _, data = array_to_bytes(arr)
        blobs.append(data)
        out["parameters"] = {"binary_data_size": len(data)}
    elif text:
        out["data"] = [
            e.decode(errors="replace") if isinstance(e, bytes) else str(e) for e in arr.reshape(-1)
        ]
    else:
        out["data"] = arr.reshape(-1).tolist()
    return out


def decode_result(value: bytes) -> dict[str, Any]:
    """A v2 response body (tests, tools)."""
    body: dict[str, Any] = json.loads(value)
    return body
