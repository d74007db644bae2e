"""Tensors in the Open Inference Protocol's model: datatype names, shapes, row-major bytes.

A request tensor describes ONE item: its shape has no batch dimension. The batcher stacks
items along a new leading dimension, so a model input declared ``FP32 [64]`` is fed as
``float32 [batch, 64]``. ``BYTES`` tensors hold variable-length elements (encoded images,
strings); on the wire each element is a 4-byte little-endian length followed by its bytes,
which is the Open Inference Protocol's binary layout for BYTES.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from pydantic import BaseModel, ConfigDict, field_validator

from schemas.errors import TensorError

__all__ = [
    "BYTES_RULE",
    "DATATYPES",
    "FRAMING",
    "DeclaredTensor",
    "TensorSpec",
    "array_to_bytes",
    "bytes_to_array",
    "numpy_dtype",
    "oip_datatype",
    "oip_datatype_named",
    "pack_bytes_elements",
    "unpack_bytes_elements",
]

_NUMPY_BY_OIP: Final[dict[str, np.dtype[Any]]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
_OIP_BY_NUMPY: Final[dict[np.dtype[Any], str]] = {v: k for k, v in _NUMPY_BY_OIP.items()}
_WIRE_DTYPE: Final[dict[str, np.dtype[Any]]] = {
    k: v.newbyteorder("<") for k, v in _NUMPY_BY_OIP.items()
}
DATATYPES: Final[frozenset[str]] = frozenset([*_NUMPY_BY_OIP, "BYTES"])
_LEN = struct.Struct("<I")
MAX_DIMS: Final = 32


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """NumPy dtype of an Open Inference Protocol datatype (``BYTES`` is ``object``)."""
    if datatype == "BYTES":
        return np.dtype(object)
    try:
        return _NUMPY_BY_OIP[datatype]
    except KeyError:
        raise TensorError(f"unsupported datatype {datatype!r}") from None


def oip_datatype(dtype: np.dtype[Any]) -> str:
    """Open Inference Protocol name of a NumPy dtype."""
    if dtype == np.dtype(object) or dtype.kind in "SU":
        return "BYTES"
    try:
        return _OIP_BY_NUMPY[np.dtype(dtype).newbyteorder("=")]
    except KeyError:
        raise TensorError(f"no Open Inference Protocol datatype for {dtype}") from None


def oip_datatype_named(name: str) -> str | None:
    """OIP datatype of a dtype by its name, as NumPy, PyTorch and TensorFlow spell it.

    ``'float32'`` → ``'FP32'``; TensorFlow's ``'string'`` → ``'BYTES'``; a name with no
    Open Inference Protocol datatype (``'bfloat16'``, ``'complex64'``) → ``None``.
    """
    if name == "string":
        return "BYTES"
    try:
        return _OIP_BY_NUMPY.get(np.dtype(name))
    except TypeError:
        return None


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """What a tensor is, without its data: datatype and shape; ``None`` dims are free."""

    datatype: str
    shape: tuple[int | None, ...]

    def accepts(self, datatype: str, shape: Sequence[int]) -> bool:
        """Whether a concrete tensor fits this spec."""
        return (
            datatype == self.datatype
            and len(shape) == len(self.shape)
            and all(
                want is None or want == got for want, got in zip(self.shape, shape, strict=True)
            )
        )

    def fits(self, other: TensorSpec) -> bool:
        """Whether every tensor of ``self`` is also accepted by ``other`` (static check)."""
        return (
            self.datatype == other.datatype
            and len(self.shape) == len(other.shape)
            and all(o is None or s == o for s, o in zip(self.shape, other.shape, strict=True))
        )

    def __str__(self) -> str:
        dims = ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.datatype}[{dims}]"


def pack_bytes_elements(elements: Sequence[bytes]) -> bytes:
    """Concatenate BYTES elements, each behind its 4-byte little-endian length."""
    return b"".join(_LEN.pack(len(e)) + bytes(e) for e in elements)


def unpack_bytes_elements(data: bytes, count: int) -> list[bytes]:
    """Split ``data`` into ``count`` length-prefixed elements; refuse anything left over."""
    out: list[bytes] = []
    view = memoryview(data)
    pos = 0
    for _ in range(count):
        if pos + 4 > len(view):
            raise TensorError(f"BYTES tensor ends inside element {len(out)}'s length prefix")
        (size,) = _LEN.unpack_from(view, pos)
        pos += 4
        if pos + size > len(view):
            raise TensorError(f"BYTES element {len(out)} claims {size} bytes past the data's end")
        out.append(bytes(view[pos : pos + size]))
        pos += size
    if pos != len(view):
        raise TensorError(f"BYTES tensor has {len(view) - pos} bytes after its {count} elements")
    return out


FRAMING = (
    "each BYTES element is its 4-byte little-endian length then its bytes, elements back "
    "to back (the Open Inference Protocol's binary form); only a tensor of one element may "
    "be sent without it"
)
"""The framing rule, as refusals state it."""

BYTES_RULE = """A BYTES tensor's data: each element is a 4-byte little-endian length followed by
that many bytes, the elements back to back, nothing after (the Open Inference Protocol's
binary tensor form). A tensor of exactly one element may also be sent bare: data that is
not exactly one framed element (its first 4 bytes, read as a little-endian length, do not
equal the rest's length) is that element as it is. So a JPEG file or a UTF-8 text put
as-is into a shape-[1] BYTES tensor is served; a bare element whose first 4 bytes happen to
state the length of the rest would be read as framed, so clients that can should frame
(`kp-pipeline produce` and `array_to_bytes` always do)."""


def _one_framed_element(data: bytes) -> bool:
    return len(data) >= 4 and _LEN.unpack_from(data)[0] == len(data) - 4


def bytes_to_array(datatype: str, shape: Sequence[int], data: bytes) -> np.ndarray[Any, Any]:
    """A read-only array over a tensor's row-major bytes (no copy for numeric types)."""
    if len(shape) > MAX_DIMS:
        raise TensorError(f"{len(shape)} dimensions; at most {MAX_DIMS}")
    if shape and min(shape) < 0:
        raise TensorError(f"negative dimension in shape {list(shape)}")
    count = math.prod(shape)
    if datatype == "BYTES":
        if count == 1 and not _one_framed_element(data):
            arr = np.empty(1, dtype=object)
            arr[0] = bytes(data)  # one element sent as it is (a JPEG, a text): see BYTES_RULE
            return _reshape(arr, shape)
        # Every element has a 4-byte length prefix: check before allocating for a hostile
        # shape such as [2**50].
        if 4 * count > len(data):
            raise TensorError(
                f"BYTES{list(shape)} needs at least {4 * count} bytes of length prefixes, "
                f"got {len(data)}; {FRAMING}"
            )
        arr = np.empty(count, dtype=object)
        try:
            arr[:] = unpack_bytes_elements(data, count)
        except TensorError as e:
            raise TensorError(f"{e}; {FRAMING}") from None
        return _reshape(arr, shape)
    dtype = _WIRE_DTYPE.get(datatype)
    if dtype is None:
        raise TensorError(f"unsupported datatype {datatype!r}")
    if len(data) != count * dtype.itemsize:
        raise TensorError(
            f"{datatype}{list(shape)} needs {count * dtype.itemsize} bytes, got {len(data)}"
        )
    return _reshape(np.frombuffer(data, dtype=dtype), shape)


def _reshape(arr: np.ndarray[Any, Any], shape: Sequence[int]) -> np.ndarray[Any, Any]:
    try:
        return arr.reshape(shape)
    except ValueError as e:  # e.g. [0, 2**62, 2**62]: no elements, yet too large for NumPy
        raise TensorError(f"shape {list(shape)}: {e}") from None


def array_to_bytes(array: np.ndarray[Any, Any]) -> tuple[str, list[int], bytes]:
    """Datatype, shape and row-major little-endian bytes of an array."""
    datatype = oip_datatype(array.dtype)
    shape = [int(d) for d in array.shape]
    if datatype == "BYTES":
        elements = [e if isinstance(e, bytes) else str(e).encode() for e in array.reshape(-1)]
        return datatype, shape, pack_bytes_elements(elements)
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return datatype, shape, np.ascontiguousarray(little).tobytes()


class DeclaredTensor(BaseModel):
    """A tensor as topology.yaml declares it (per row, no batch dimension; ``-1`` = any size).

    A model's ``inputs`` and a backend's ``options.inputs``/``outputs`` use this same form.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    name: str
    """The tensor's name, as requests and the model name it."""
    datatype: str
    """An Open Inference Protocol datatype: FP32, INT64, BYTES, ..."""
    shape: list[int]
    """Per row, without the batch dimension; -1 for a dimension of any size."""

    @field_validator("datatype")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in DATATYPES:
            raise ValueError(f"unknown datatype {v!r}; one of {', '.join(sorted(DATATYPES))}")
        return v

    @field_validator("shape")
    @classmethod
    def _dims(cls, v: list[int]) -> list[int]:
        if any(d < -1 or d == 0 for d in v):
            raise ValueError("dimensions are positive, or -1 for any size")
        return v

    def spec(self) -> TensorSpec:
        """The input as a `TensorSpec` (``-1`` becomes a free dimension)."""
        return TensorSpec(self.datatype, tuple(None if d == -1 else d for d in self.shape))
