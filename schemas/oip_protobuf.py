"""The Open Inference Protocol's v2 protobuf messages on Kafka, both ways.

A record whose topic is declared ``protobuf`` in topology.yaml, or whose ``content-type``
header is ``application/x-protobuf`` (or ``application/protobuf``), carries a serialized
``inference.ModelInferRequest`` (schemas/oip_v2.proto: the messages and field numbers of
KServe's and Triton's gRPC protocol, as Seldon Core 2 writes them to Kafka). Tensors are
in ``contents`` (typed lists) or ``raw_input_contents`` (one entry per input, in order:
numbers little-endian, BYTES elements each behind a 4-byte length; FP16 only raw). The
model comes from ``model_name``, else the record's ``kp.model`` header, else the
topology's only model; ``parameters`` reply_topic and deadline_ms are the Avro fields.

The descriptors are built here from the .proto's content (no protoc, no generated code)
in a pool of their own, so they never collide with another library's ``inference``
package in the same process. Decoding yields the Avro request's record shape, checked by
`schemas.codec.request_from_record` like every encoding; results go back as
``ModelInferResponse`` with every output in ``raw_output_contents`` and kp-pipeline's
fields in ``parameters``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError as ProtobufDecodeError

from schemas.errors import DecodeError, RequestError, RequestIdentity, TensorError
from schemas.messages import Result
from schemas.tensors import _WIRE_DTYPE, DATATYPES, array_to_bytes, pack_bytes_elements

__all__ = [
    "CONTENT_TYPE",
    "CONTENT_TYPES",
    "PROTO",
    "RESPONSE_INDEXES",
    "RESPONSE_NAME",
    "decode_request",
    "encode_result",
    "messages",
]

CONTENT_TYPE = "application/x-protobuf"
CONTENT_TYPES = (b"application/x-protobuf", b"application/protobuf")

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "bool": _F.TYPE_BOOL,
    "int32": _F.TYPE_INT32,
    "int64": _F.TYPE_INT64,
    "uint32": _F.TYPE_UINT32,
    "uint64": _F.TYPE_UINT64,
    "float": _F.TYPE_FLOAT,
    "double": _F.TYPE_DOUBLE,
    "string": _F.TYPE_STRING,
    "bytes": _F.TYPE_BYTES,
}
# (name, number, type, repeated); a type starting with "." is a message.
_FIELDS: dict[str, list[tuple[str, int, str, bool]]] = {
    "InferParameter": [
        ("bool_param", 1, "bool", False),
        ("int64_param", 2, "int64", False),
        ("string_param", 3, "string", False),
        ("double_param", 4, "double", False),
        ("uint64_param", 5, "uint64", False),
    ],
    "InferTensorContents": [
        ("bool_contents", 1, "bool", True),
        ("int_contents", 2, "int32", True),
        ("int64_contents", 3, "int64", True),
        ("uint_contents", 4, "uint32", True),
        ("uint64_contents", 5, "uint64", True),
        ("fp32_contents", 6, "float", True),
        ("fp64_contents", 7, "double", True),
        ("bytes_contents", 8, "bytes", True),
    ],
}
_TENSOR = [
    ("name", 1, "string", False),
    ("datatype", 2, "string", False),
    ("shape", 3, "int64", True),
    ("parameters", 4, "map", True),
    ("contents", 5, ".inference.InferTensorContents", False),
]
_HEAD = [
    ("model_name", 1, "string", False),
    ("model_version", 2, "string", False),
    ("id", 3, "string", False),
    ("parameters", 4, "map", True),
]


def _message(
    name: str, fields: list[tuple[str, int, str, bool]], scope: str
) -> descriptor_pb2.DescriptorProto:
    msg = descriptor_pb2.DescriptorProto(name=name)
    for fname, number, ftype, repeated in fields:
        field = msg.field.add(name=fname, number=number)
        field.label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
        if ftype == "map":  # map<string, InferParameter>: a nested entry message
            entry = msg.nested_type.add(name="ParametersEntry")
            entry.options.map_entry = True
            entry.field.add(name="key", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
            entry.field.add(
                name="value",
                number=2,
                type=_F.TYPE_MESSAGE,
                label=_F.LABEL_OPTIONAL,
                type_name=".inference.InferParameter",
            )
            field.type = _F.TYPE_MESSAGE
            field.type_name = f"{scope}.{name}.ParametersEntry"
        elif ftype.startswith("."):
            field.type, field.type_name = _F.TYPE_MESSAGE, ftype
        else:
            field.type = _SCALARS[ftype]
    return msg


def _build() -> dict[str, Any]:
    proto = descriptor_pb2.FileDescriptorProto(
        name="kp_pipeline/oip_v2.proto", package="inference", syntax="proto3"
    )
    param = _message("InferParameter", _FIELDS["InferParameter"], ".inference")
    param.oneof_decl.add(name="parameter_choice")
    for field in param.field:
        field.oneof_index = 0
    proto.message_type.append(param)
    proto.message_type.append(
        _message("InferTensorContents", _FIELDS["InferTensorContents"], ".inference")
    )
    request = _message(
        "ModelInferRequest",
        [
            *_HEAD,
            ("inputs", 5, ".inference.ModelInferRequest.InferInputTensor", True),
            ("outputs", 6, ".inference.ModelInferRequest.InferRequestedOutputTensor", True),
            ("raw_input_contents", 7, "bytes", True),
        ],
        ".inference",
    )
    request.nested_type.append(
        _message("InferInputTensor", _TENSOR, ".inference.ModelInferRequest")
    )
    request.nested_type.append(
        _message(
            "InferRequestedOutputTensor",
            [("name", 1, "string", False), ("parameters", 2, "map", True)],
            ".inference.ModelInferRequest",
        )
    )
    response = _message(
        "ModelInferResponse",
        [
            *_HEAD,
            ("outputs", 5, ".inference.ModelInferResponse.InferOutputTensor", True),
            ("raw_output_contents", 6, "bytes", True),
        ],
        ".inference",
    )
    response.nested_type.append(
        _message("InferOutputTensor", _TENSOR, ".inference.ModelInferResponse")
    )
    proto.message_type.extend([request, response])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"inference.{name}"))
        for name in ("InferParameter", "ModelInferRequest", "ModelInferResponse")
    }


messages = _build()
"""The message classes by name: InferParameter, ModelInferRequest, ModelInferResponse."""

PROTO = Path(__file__).with_name("oip_v2.proto")
"""The .proto these descriptors follow; its text is what a Schema Registry is given."""
RESPONSE_NAME = "inference.ModelInferResponse"
RESPONSE_INDEXES = [
    [
        m.name
        for m in messages["ModelInferResponse"].DESCRIPTOR.file.message_types_by_name.values()
    ].index("ModelInferResponse")
]
"""Where ModelInferResponse is among the file's messages: the wire format's message index."""

_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def decode_request(value: bytes, model: str | None = None) -> dict[str, Any]:
    """A serialized ModelInferRequest as the Avro request's record; defects raise."""
    request = messages["ModelInferRequest"]()
    try:
        request.ParseFromString(value)
    except (ProtobufDecodeError, ValueError, RuntimeError) as e:
        raise DecodeError(f"not a ModelInferRequest: {e}") from None
    params = {k: _param(v) for k, v in request.parameters.items()}
    reply = params.pop("reply_topic", None)
    deadline_text = params.pop("deadline_ms", None)
    name = request.model_name or model
    if not name:
        raise DecodeError("model_name: missing (or a kp.model header, or a one-model topology)")
    try:
        deadline = None if deadline_text is None else int(deadline_text)
    except ValueError:
        raise DecodeError(f"parameters.deadline_ms {deadline_text!r}: not an integer") from None
    raw = list(request.raw_input_contents)
    try:
        if raw and len(raw) != len(request.inputs):
            raise DecodeError(
                f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs"
            )
        tensors = [_tensor(t, raw[i] if raw else None) for i, t in enumerate(request.inputs)]
    except RequestError as e:  # the request's own fields decoded: say whose it was
        e.whose = RequestIdentity(request.id, name, request.model_version or None, reply)
        raise
    return {
        "id": request.id,
        "model": name,
        "model_version": request.model_version or None,
        "inputs": tensors,
        "parameters": params,
        "deadline_ms": deadline,
        "reply_topic": reply,
    }


def _param(p: Any) -> str:
    which = p.WhichOneof("parameter_choice")
    if which is None:
        return ""
    value = getattr(p, which)
    if which == "bool_param":
        return "true" if value else "false"
    return str(value)


def _tensor(t: Any, raw: bytes | None) -> dict[str, Any]:
    where = f"input {t.name!r}"
    if t.datatype not in DATATYPES:
        raise TensorError(f"{where}: unsupported datatype {t.datatype!r}")
    shape = list(t.shape)
    record = {"name": t.name, "datatype": t.datatype, "shape": shape}
    if raw is not None:
        return record | {"data": raw}
    field = _CONTENTS.get(t.datatype)
    if field is None:  # FP16 has no typed list
        raise TensorError(f"{where}: {t.datatype} travels only in raw_input_contents")
    values = getattr(t.contents, field)
    count = int(np.prod(shape)) if shape and min(shape) >= 0 else None
    if count is not None and len(values) != count:
        raise TensorError(
            f"{where}: shape {shape} holds {count} elements, contents has {len(values)}"
        )
    if t.datatype == "BYTES":
        return record | {"data": pack_bytes_elements(list(values))}
    try:
        data = np.array(values, dtype=_WIRE_DTYPE[t.datatype]).tobytes()
    except OverflowError as e:
        raise TensorError(f"{where}: contents do not fit {t.datatype}: {e}") from None
    return record | {"data": data}


def encode_result(result: Result) -> bytes:
    """A result as a serialized ModelInferResponse: outputs raw, kp's fields as parameters."""
    response = messages["ModelInferResponse"](
        model_name=result.model, model_version=result.model_version, id=result.id
    )
    t = result.timings
    fields: dict[str, Any] = {
        "status": result.status.value,
        "batch_size": result.batch_size,
        "source_topic": result.topic,
        "source_partition": result.partition,
        "source_offset": result.offset,
        "queue_ms": float(t.queue_ms),
        "preprocess_ms": float(t.preprocess_ms),
        "compute_ms": float(t.compute_ms),
        "postprocess_ms": float(t.postprocess_ms),
        "end_to_end_ms": float(t.end_to_end_ms),
    }
    if result.error is not None:
        fields["error"] = result.error
    for key, value in fields.items():
        param = response.parameters[key]
        if isinstance(value, str):
            param.string_param = value
        elif isinstance(value, float):
            param.double_param = value
        else:
            param.int64_param = value
    for name, arr in result.outputs.items():
        datatype, shape, raw = array_to_bytes(np.asarray(arr))
        out = response.outputs.add(name=name, datatype=datatype)
        out.shape.extend(shape)
        response.raw_output_contents.append(raw)
    serialized: bytes = response.SerializeToString()
    return serialized
