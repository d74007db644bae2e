"""The Confluent Schema Registry wire format: magic byte 0, 4-byte big-endian id, payload."""

from __future__ import annotations

import struct

from schemas.errors import DecodeError

__all__ = ["MAGIC", "frame", "unframe"]

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
