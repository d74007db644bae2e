"""Avro binary encoding, specialised for our two hot messages: requests in, results out.

fastavro costs 8-13 µs a call on records this small, mostly per-call overhead, which is
most of a small model's per-request budget. Our schemas are fixed, so these functions
write and read their exact binary layout directly (Avro spec: zig-zag varints, length-
prefixed bytes and strings, little-endian doubles, unions as a branch index, arrays in
blocks). Results are encoded a whole batch at a time: everything shared by the batch
(model, version, output names, datatypes and shapes) is encoded once.

Equivalence with fastavro (the reference) is property-tested in
tests/schemas/test_binary.py; anything these do not handle falls back to fastavro.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from schemas.errors import DecodeError, RequestError, RequestIdentity, TensorError
from schemas.tensors import MAX_DIMS, oip_datatype, pack_bytes_elements

__all__ = [
    "MAX_PARAMETERS",
    "MAX_TENSORS",
    "ResultBatchEncoder",
    "decode_long",
    "encode_long",
    "read_request",
]

MAX_TENSORS = 64
"""Input tensors one request may carry."""
MAX_PARAMETERS = 256
"""Entries of a request's parameters map."""

T = TypeVar("T")
_DOUBLES5 = struct.Struct("<5d")
_SMALL = [bytes((((n << 1) ^ (n >> 63)) & 0xFF,)) for n in range(64)]


def encode_long(n: int) -> bytes:
    """Zig-zag varint of a 64-bit signed integer."""
    if 0 <= n < 64:
        return _SMALL[n]
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def _str(s: str) -> bytes:
    b = s.encode()
    return encode_long(len(b)) + b


def _bytes(b: bytes) -> bytes:
    return encode_long(len(b)) + b


def decode_long(buf: bytes, pos: int) -> tuple[int, int]:
    """(value, next position) of the zig-zag varint at ``pos``."""
    b = buf[pos]
    pos += 1
    if b < 0x80:
        return (b >> 1) ^ -(b & 1), pos
    z = b & 0x7F
    shift = 7
    while True:
        b = buf[pos]
        pos += 1
        z |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
        if shift > 63 or (shift == 63 and buf[pos] > 1):  # bits past 64 cannot be a long
            raise ValueError("varint longer than 64 bits")
    return (z >> 1) ^ -(z & 1), pos


def _read_block_count(buf: bytes, pos: int) -> tuple[int, int]:
    """Item count of the next array/map block; a negative count is followed by a byte size."""
    count, pos = decode_long(buf, pos)
    if count < 0:
        count = -count
        _, pos = decode_long(buf, pos)
    return count, pos


def _read_bytes(buf: bytes, pos: int) -> tuple[bytes, int]:
    n, pos = decode_long(buf, pos)
    end = pos + n
    if n < 0 or end > len(buf):
        raise ValueError(f"length {n} runs past the end of the record")
    return buf[pos:end], end


def _read_str(buf: bytes, pos: int) -> tuple[str, int]:
    raw, pos = _read_bytes(buf, pos)
    return raw.decode(), pos


def _read_optional_str(buf: bytes, pos: int) -> tuple[str | None, int]:
    branch, pos = decode_long(buf, pos)
    if branch == 0:
        return None, pos
    if branch != 1:
        raise ValueError(f"union branch {branch} out of range")
    return _read_str(buf, pos)


def _read_array(
    buf: bytes,
    pos: int,
    read_item: Callable[[bytes, int], tuple[T, int]],
    limit: int,
    refusal: Callable[[], Exception],
) -> tuple[list[T], int]:
    """An Avro array (or map, with a pair reader): blocks of items until a zero count.

    Refused as soon as a block's count passes ``limit``, before any item is built: a
    record of a million 4-byte empty tensors would otherwise cost ~60x its size in
    Python objects before anyone could count them.
    """
    items: list[T] = []
    while True:
        count, pos = _read_block_count(buf, pos)
        if count == 0:
            return items, pos
        if len(items) + count > limit:
            raise refusal()
        for _ in range(count):
            item, pos = read_item(buf, pos)
            items.append(item)


def _read_tensor(buf: bytes, pos: int) -> tuple[dict[str, Any], int]:
    name, pos = _read_str(buf, pos)
    datatype, pos = _read_str(buf, pos)
    shape, pos = _read_array(
        buf,
        pos,
        decode_long,
        MAX_DIMS,
        lambda: TensorError(f"input {name!r}: more than {MAX_DIMS} dimensions"),
    )
    data, pos = _read_bytes(buf, pos)
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}, pos


def _read_pair(buf: bytes, pos: int) -> tuple[tuple[str, str], int]:
    key, pos = _read_str(buf, pos)
    value, pos = _read_str(buf, pos)
    return (key, value), pos


def _too_many_tensors() -> DecodeError:
    return DecodeError(f"request has more than {MAX_TENSORS} tensors")


def _too_many_parameters() -> DecodeError:
    return DecodeError(f"request has more than {MAX_PARAMETERS} parameters")


def read_request(buf: bytes) -> dict[str, Any]:
    """Decode an InferenceRequest record (plain Avro, our schema) into fastavro's shape.

    Raises ValueError or IndexError on malformed input, like any truncated read, and
    `DecodeError` or `TensorError` (what the checks after decoding raise) as soon as an
    array is longer than a request may have.
    """
    rid, pos = _read_str(buf, 0)
    model, pos = _read_str(buf, pos)
    version, pos = _read_optional_str(buf, pos)
    try:
        inputs, pos = _read_array(buf, pos, _read_tensor, MAX_TENSORS, _too_many_tensors)
        pairs, pos = _read_array(buf, pos, _read_pair, MAX_PARAMETERS, _too_many_parameters)
    except RequestError as e:  # refused part way: what came before says whose it is
        e.whose = RequestIdentity(rid, model, version or None)
        raise
    branch, pos = decode_long(buf, pos)
    deadline: int | None = None
    if branch == 1:
        deadline, pos = decode_long(buf, pos)
    elif branch != 0:
        raise ValueError(f"union branch {branch} out of range")
    reply, pos = _read_optional_str(buf, pos)
    if pos != len(buf):
        raise ValueError(f"{len(buf) - pos} bytes after the record")
    return {
        "id": rid,
        "model": model,
        "model_version": version,
        "inputs": inputs,
        "parameters": dict(pairs),
        "deadline_ms": deadline,
        "reply_topic": reply,
    }


class ResultBatchEncoder:
    """Encodes OK results for the rows of one batch; shared parts are encoded once.

    ``columns`` are the postprocessed outputs, each with the batch as first dimension.
    ``bytes_cells``, when given, builds a BYTES column's per-row cells (the compiled
    codec's; it returns None for a column it leaves to this module).
    """

    def __init__(
        self,
        model: str,
        version: str,
        columns: dict[str, Any],
        bytes_cells: Callable[[Any], list[bytes] | None] | None = None,
    ) -> None:
        # id | model version status=OK(0) | outputs block | error=null | timings | size | source
        self._head = _str(model) + _str(version) + b"\x00"
        self._tensors: list[tuple[bytes, int, bytes | None, list[bytes] | None]] = []
        for name, col in columns.items():
            arr = np.asarray(col)
            datatype = oip_datatype(arr.dtype)
            shape = arr.shape[1:]
            prefix = _str(name) + _str(datatype)
            prefix += (
                encode_long(len(shape)) + b"".join(encode_long(d) for d in shape) + b"\x00"
                if shape
                else b"\x00"
            )
            if datatype == "BYTES":
                cells = None if bytes_cells is None else bytes_cells(arr)
                per_row = (
                    cells
                    if cells is not None
                    else [_bytes(_pack_bytes_row(arr[i])) for i in range(arr.shape[0])]
                )
                self._tensors.append((prefix, 0, None, per_row))
            else:
                little = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False))
                row_len = little[0].nbytes if little.shape[0] else 0
                self._tensors.append(
                    (prefix + encode_long(row_len), row_len, little.tobytes(), None)
                )
        self._outputs_head = encode_long(len(self._tensors)) if self._tensors else b""

    @property
    def parts(self) -> tuple[bytes, list[tuple[bytes, int, bytes | None, list[bytes] | None]]]:
        """What every row shares, for the compiled batch encoder (schemas._codec_fast).

        The bytes between a row's id and its first output's data (model, version, status,
        the outputs count), and per output its (prefix, row length, all rows' data,
        per-row BYTES cells).
        """
        return self._head + self._outputs_head, self._tensors

    def encode(
        self,
        index: int,
        rid: str,
        timings: Sequence[float],
        batch_size: int,
        topic: str,
        partition: int,
        offset: int,
    ) -> bytes:
        """Bytes of the result for row ``index``."""
        parts = [_str(rid), self._head, self._outputs_head]
        for prefix, row_len, data, per_row in self._tensors:
            parts.append(prefix)
            if per_row is not None:
                parts.append(per_row[index])
            else:
                assert data is not None
                parts.append(data[index * row_len : (index + 1) * row_len])
        parts.append(b"\x00\x00")  # end of outputs array; error = null
        parts.append(_DOUBLES5.pack(*timings))
        parts.append(encode_long(batch_size))
        parts.append(_str(topic))
        parts.append(encode_long(partition))
        parts.append(encode_long(offset))
        return b"".join(parts)


def _pack_bytes_row(row: Any) -> bytes:
    flat = np.asarray(row, dtype=object).reshape(-1)
    return pack_bytes_elements([e if isinstance(e, bytes) else str(e).encode() for e in flat])
