"""The Confluent Schema Registry wire format: magic byte 0, 4-byte big-endian id, payload."""

from __future__ import annotations

import struct
from collections.abc import Sequence

from schemas.errors import DecodeError

__all__ = ["MAGIC", "frame", "protobuf_header", "unframe", "unframe_protobuf"]

MAGIC = 0
_HEADER = struct.Struct(">bI")


def frame(schema_id: int, payload: bytes) -> bytes:
    """Prefix ``payload`` with the wire-format header for ``schema_id``."""
    return _HEADER.pack(MAGIC, schema_id) + payload


def protobuf_header(schema_id: int, indexes: Sequence[int]) -> bytes:
    """The bytes Confluent's Protobuf serializer writes before a message of the schema.

    The wire-format header, then which message of the registered file this is: the first
    message as a single 0 byte, any other as a zig-zag varint count and its indexes
    (`unframe_protobuf` reads both).
    """
    if list(indexes) == [0]:
        return frame(schema_id, b"\x00")
    return frame(schema_id, b"".join(_zigzag_bytes(n) for n in (len(indexes), *indexes)))


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


def _zigzag_bytes(value: int) -> bytes:
    n = (value << 1) ^ (value >> 63)
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
