"""The Confluent Schema Registry wire format: magic byte 0, 4-byte big-endian id, payload."""

from __future__ import annotations

import struct

from schemas.errors import DecodeError

__all__ = ["MAGIC", "frame", "unframe", "unframe_protobuf"]

MAGIC = 0
_HEADER = struct.Struct(">bI")


def frame(schema_id: int, payload: bytes) -> bytes:
    """Prefix ``payload`` with the wire-format header for ``schema_id``."""
    return _HEADER.pack(MAGIC, schema_id) + payload


def unframe(data: bytes) -> tuple[int, bytes]:
    """Split a framed value into its schema id and Avro payload."""
    if len(data) < _HEADER.size:
        raise DecodeError(f"value of {len(data)} bytes is shorter than the wire-format header")
    magic, schema_id = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise DecodeError(f"wire-format magic byte is {magic}, expected {MAGIC}")
    return schema_id, data[_HEADER.size :]


def unframe_protobuf(data: bytes) -> tuple[int, list[int], bytes]:
    """Split a framed Protobuf value: schema id, message indexes, message bytes.

    Confluent's Protobuf serializer writes, after the header, which message of the
    registered file this is: a zig-zag varint count, then that many zig-zag varint
    indexes (the first message, ``[0]``, as a single 0 byte).
    """
    schema_id, rest = unframe(data)
    count, pos = _zigzag(rest, 0)
    if count == 0:
        return schema_id, [0], rest[pos:]
    if not 0 < count <= 64:
        raise DecodeError(f"wire-format message index count {count} is not one a schema has")
    indexes = []
    for _ in range(count):
        index, pos = _zigzag(rest, pos)
        indexes.append(index)
    return schema_id, indexes, rest[pos:]


def _zigzag(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise DecodeError("wire-format message indexes run past the value")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return (value >> 1) ^ -(value & 1), pos
