"""Reading a result back in whichever encoding the pipeline wrote it.

A topic of results may hold Avro, v2 JSON and v2 protobuf records side by side (each
result goes out in its request's encoding unless the topology fixes one); each non-Avro
record says which by its ``content-type`` header, and a JSON one with binary outputs
gives its JSON's length in ``inference-header-content-length``. Under a Schema Registry
every value starts with the wire-format header, which is stripped here. The client,
``kp-pipeline results`` and the tests read results through `read_result`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from schemas import oip_json, oip_protobuf
from schemas.codec import AvroCodec
from schemas.errors import DecodeError
from schemas.messages import Result, Status, Timings
from schemas.tensors import bytes_to_array, numpy_dtype
from schemas.wire import unframe, unframe_protobuf

__all__ = ["read_result"]

Headers = Sequence[tuple[str, bytes | None]] | None

_TIMINGS = ("queue_ms", "preprocess_ms", "compute_ms", "postprocess_ms", "end_to_end_ms")


def read_result(codec: AvroCodec, value: bytes, headers: Headers = None) -> Result:
    """The `Result` in a result record, by its content-type (Avro when it names none)."""
    kind, length = b"", None
    for key, raw in headers or ():
        name = key.lower()
        if name == "content-type":
            kind = (raw or b"").split(b";")[0].strip().lower()
        elif name == oip_json.HEADER_LENGTH:
            length = int(raw or b"0")
    if kind == oip_json.CONTENT_TYPE.encode():
        return _from_json(unframe(value)[1] if value[:1] == b"\x00" else value, length)
    if kind in oip_protobuf.CONTENT_TYPES:
        return _from_protobuf(unframe_protobuf(value)[2] if value[:1] == b"\x00" else value)
    return codec.decode_result(value)


def _from_json(value: bytes, length: int | None) -> Result:
    try:
        body: dict[str, Any] = json.loads(value if length is None else value[:length])
    except (ValueError, RecursionError) as e:
        raise DecodeError(f"not a v2 JSON response: {e}") from None
    tail = b"" if length is None else value[length:]
    outputs = {}
    for out in body.get("outputs", []):
        datatype, shape = out["datatype"], out["shape"]
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            outputs[out["name"]], tail = bytes_to_array(datatype, shape, tail[:size]), tail[size:]
        elif datatype == "BYTES":
            arr = np.empty(len(out["data"]), dtype=object)
            arr[:] = [e.encode() for e in out["data"]]
            outputs[out["name"]] = arr.reshape(shape)
        else:
            outputs[out["name"]] = np.asarray(out["data"], numpy_dtype(datatype)).reshape(shape)
    return _result(body, body.get("parameters") or {}, outputs)


def _from_protobuf(value: bytes) -> Result:
    response = oip_protobuf.messages["ModelInferResponse"]()
    try:
        response.ParseFromString(value)
    except Exception as e:
        raise DecodeError(f"not a ModelInferResponse: {e}") from None
    params = {
        k: getattr(p, p.WhichOneof("parameter_choice")) for k, p in response.parameters.items()
    }
    raw = response.raw_output_contents
    outputs = {
        out.name: bytes_to_array(out.datatype, list(out.shape), raw[i])
        for i, out in enumerate(response.outputs)
    }
    head = {"id": response.id, "model_name": response.model_name}
    return _result({**head, "model_version": response.model_version}, params, outputs)


def _result(body: dict[str, Any], params: dict[str, Any], outputs: dict[str, Any]) -> Result:
    return Result(
        id=body.get("id") or "",
        model=body.get("model_name") or "",
        model_version=body.get("model_version") or "",
        status=Status(params.get("status", "OK")),
        outputs=outputs,
        timings=Timings(*(float(params.get(k, 0.0)) for k in _TIMINGS)),
        batch_size=int(params.get("batch_size", 0)),
        topic=str(params.get("source_topic", "")),
        partition=int(params.get("source_partition", -1)),
        offset=int(params.get("source_offset", -1)),
        error=params.get("error") or body.get("error"),
    )
