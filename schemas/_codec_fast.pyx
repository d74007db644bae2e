# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The compiled hot path of schemas.codec: a consumed batch of requests decoded, and a
finished batch of results encoded, each in one call; and a decoded batch checked against
its models' exact signatures (`match_signatures`, whose reference is schemas/signatures.py).

Long because it is one C-level reader and one writer for the two fixed layouts that
schemas/binary.py reads and writes in Python; splitting it would only add imports.

schemas/binary.py and AvroCodec.decode_request stay the reference. This module must give
exactly what they give, so it works in two tiers:

- It parses the Avro binary layout itself (zig-zag varints of at most 64 bits, length-
  prefixed strings and bytes, unions, blocked arrays and maps, MAX_TENSORS,
  MAX_PARAMETERS and MAX_DIMS refused per block as the reference does, no trailing bytes)
  and runs every check of `decode_request` (duplicate input names, reply_topic legality,
  datatype, negative dims, byte length) before it builds a `Request` itself.
- Whenever it finds a defect, or meets something it does not build itself (a value that
  is not exactly ``bytes``, a zero-size tensor whose other dims NumPy might refuse), it
  hands that one value to the reference, which produces the
  `RequestError` (class, reason, message) or the `Request`. Error messages are therefore
  the reference's by construction; what this module must get right is never to accept a
  request the reference refuses, and to build exactly the reference's `Request` when it
  accepts. tests/schemas/test_codec_compiled.py checks both with hypothesis (`classify`
  exposes which tier answered).

Numeric tensors are read-only NumPy arrays like the reference's `np.frombuffer` over a
copy of the data: a view straight into the record when the data lies aligned for its
dtype there (the record is immutable ``bytes``), else over a fresh copy, so that arrays
are aligned exactly when the reference's are (always).

Results: `encode_results` writes every row of a `ResultBatchEncoder` into one ``bytes``
each. A row whose arguments are not the plain types it expects (a non-``str`` id, a
timings tuple that is not five floats, an int past 64 bits, an index past the encoder's
rows) is encoded by the reference row encoder, which also raises what it raises.

Runs on the CPU only; nothing here touches a GPU.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_Contains, PyDict_SetItem
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_CheckExact
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.long cimport PyLong_CheckExact, PyLong_FromLongLong
from cpython.object cimport PyObject, PyTypeObject
from cpython.ref cimport Py_DECREF, Py_INCREF
from cpython.unicode cimport PyUnicode_CheckExact
from cpython.tuple cimport PyTuple_CheckExact, PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.stdint cimport int64_t, uint32_t, uint64_t, uint8_t, uintptr_t
from libc.string cimport memcmp, memcpy

cimport numpy as cnp

import sys

import numpy as np

from schemas.binary import MAX_PARAMETERS, MAX_TENSORS
from schemas.messages import Request

include "_slots.pxi"

cdef _Layout _REQUEST = _Layout(Request, 7)  # every field given: filled from C
from schemas.tensors import MAX_DIMS, numpy_dtype

cnp.import_array()

cdef extern from "numpy/arrayobject.h":
    # Not in numpy's .pxd; steals a reference to ``descr``.
    object PyArray_NewFromDescr(
        PyTypeObject* subtype, void* descr, int nd, cnp.npy_intp* dims,
        cnp.npy_intp* strides, void* data, int flags, PyObject* obj,
    )

cdef extern from "Python.h":
    PyObject* PyUnicode_DecodeUTF8(const char* s, Py_ssize_t size, const char* errors)
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size)
    void PyErr_Clear()
    long long PyLong_AsLongLongAndOverflow(object o, int* overflow) except? -1

cdef enum:
    MAXDIMS = 32

__all__ = ["bytes_cells", "classify", "decode_requests", "encode_results"]

if MAX_DIMS != MAXDIMS:
    raise ImportError(f"schemas.tensors.MAX_DIMS is {MAX_DIMS}; this build assumes {MAXDIMS}")
if sys.byteorder != "little":  # results are written with memcpy of native doubles
    raise ImportError("the compiled codec assumes a little-endian machine")

_empty = np.empty
_OBJECT = np.dtype(object)
cdef Py_ssize_t _MAX_TENSORS = MAX_TENSORS
cdef Py_ssize_t _MAX_PARAMETERS = MAX_PARAMETERS

# Datatype names in the order of _DTYPES; BYTES is the last one.
cdef const char* _NAMES[13]
_NAMES[0] = "FP32"
_NAMES[1] = "FP64"
_NAMES[2] = "FP16"
_NAMES[3] = "INT64"
_NAMES[4] = "INT32"
_NAMES[5] = "INT16"
_NAMES[6] = "INT8"
_NAMES[7] = "UINT8"
_NAMES[8] = "UINT16"
_NAMES[9] = "UINT32"
_NAMES[10] = "UINT64"
_NAMES[11] = "BOOL"
_NAMES[12] = "BYTES"
cdef Py_ssize_t _NAME_LENS[13]
_NAME_LENS[:] = [4, 4, 4, 5, 5, 5, 4, 5, 6, 6, 6, 4, 5]
cdef int _BYTES = 12
# The reference's wire dtypes (schemas.tensors: the OIP dtype, little-endian).
cdef list _DTYPES = [
    numpy_dtype(n.decode()).newbyteorder("<")
    for n in [b"FP32", b"FP64", b"FP16", b"INT64", b"INT32", b"INT16", b"INT8",
              b"UINT8", b"UINT16", b"UINT32", b"UINT64", b"BOOL"]
]
cdef Py_ssize_t _ITEMSIZE[12]
for _i in range(12):
    _ITEMSIZE[_i] = _DTYPES[_i].itemsize

# What `_parse` concluded, for `classify` (tests) and the batch loop.
cdef enum Verdict:
    BUILT = 0
    BAD = 1     # the reference refuses it (it will say why)
    UNSURE = 2  # valid or not, the reference builds or refuses it


cdef struct Cursor:
    const uint8_t* buf
    Py_ssize_t n
    Py_ssize_t pos


cdef inline bint read_long(Cursor* c, int64_t* out) noexcept nogil:
    """schemas.binary.decode_long: a zig-zag varint of at most 64 bits (ten bytes)."""
    cdef uint64_t b, z
    cdef int shift = 7
    if c.pos >= c.n:
        return False
    b = c.buf[c.pos]
    c.pos += 1
    z = b & 0x7F
    while b >= 0x80:
        if c.pos >= c.n:
            return False
        b = c.buf[c.pos]
        c.pos += 1
        z |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
        if shift > 63:
            return False
        if shift == 63 and (c.pos >= c.n or c.buf[c.pos] > 1):
            return False
    out[0] = <int64_t>((z >> 1) ^ (<uint64_t>0 - (z & 1)))
    return True


cdef inline bint read_count(Cursor* c, uint64_t* count) noexcept nogil:
    """An array or map block's item count; a negative one is followed by a byte size."""
    cdef int64_t v, size
    if not read_long(c, &v):
        return False
    if v < 0:
        count[0] = <uint64_t>(-(v + 1)) + 1
        return read_long(c, &size)
    count[0] = <uint64_t>v
    return True


cdef inline bint read_span(Cursor* c, Py_ssize_t* start, Py_ssize_t* size) noexcept nogil:
    """A length-prefixed bytes or string: where it starts and how long it is."""
    cdef int64_t n
    if not read_long(c, &n):
        return False
    if n < 0 or n > c.n - c.pos:
        return False
    start[0] = c.pos
    size[0] = <Py_ssize_t>n
    c.pos += <Py_ssize_t>n
    return True


cdef object utf8(const uint8_t* p, Py_ssize_t n):
    """Strict UTF-8 (as ``bytes.decode()``), or None."""
    cdef PyObject* s = PyUnicode_DecodeUTF8(<const char*>p, n, NULL)
    if s == NULL:
        PyErr_Clear()
        return None
    out = <object>s
    Py_DECREF(out)
    return out


cdef inline object read_str(Cursor* c):
    """A length-prefixed string, or None when it is not there or not UTF-8."""
    cdef Py_ssize_t start, size
    if not read_span(c, &start, &size):
        return None
    return utf8(c.buf + start, size)


cdef inline object read_repeated(Cursor* c, object last):
    """`read_str` for a string the record before most likely had too (a batch's requests
    name one model and its inputs): ``last`` itself when the bytes spell it."""
    cdef Py_ssize_t start, size, have
    cdef const char* text
    if not read_span(c, &start, &size):
        return None
    if last is not None:
        text = PyUnicode_AsUTF8AndSize(last, &have)
        if text == NULL:
            PyErr_Clear()
        elif have == size and memcmp(text, c.buf + start, size) == 0:
            return last
    return utf8(c.buf + start, size)


# The model and the input name the last request decoded here named (see read_repeated).
cdef object _last_model = None
cdef object _last_name = None


cdef object _MALFORMED = object()


cdef object read_optional_str(Cursor* c):
    """A ``["null", "string"]`` union: None, a string, or ``_MALFORMED``."""
    cdef int64_t branch
    if not read_long(c, &branch):
        return _MALFORMED
    if branch == 0:
        return None
    if branch != 1:
        return _MALFORMED
    s = read_str(c)
    return _MALFORMED if s is None else s


cdef inline bint legal_topic(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    """``re.match(r"^[A-Za-z0-9._-]{1,249}$", s)``; ``$`` also matches before a last "\\n"."""
    cdef Py_ssize_t i
    cdef uint8_t ch
    if n > 0 and p[n - 1] == 10:
        n -= 1
    if n < 1 or n > 249:
        return False
    for i in range(n):
        ch = p[i]
        if not (
            (ch >= 97 and ch <= 122) or (ch >= 65 and ch <= 90) or (ch >= 48 and ch <= 57)
            or ch == 46 or ch == 95 or ch == 45
        ):
            return False
    return True


cdef inline int datatype_index(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    cdef int i
    for i in range(13):
        if n == _NAME_LENS[i] and memcmp(p, _NAMES[i], n) == 0:
            return i
    return -1


cdef object tensor(
    bytes record, Cursor* c, int kind, cnp.npy_intp* dims, int ndims,
    Py_ssize_t start, Py_ssize_t size, Verdict* verdict,
):
    """The array of one tensor as `schemas.tensors.bytes_to_array` builds it, or None."""
    cdef int i
    cdef uint64_t count, nonzero = 1, itemsize
    cdef bint zero = False, overflow = False
    for i in range(ndims):
        if dims[i] < 0:
            verdict[0] = BAD
            return None
        if dims[i] == 0:
            zero = True
        elif nonzero > <uint64_t>0x7FFFFFFFFFFFFFFF // <uint64_t>dims[i]:
            overflow = True
        else:
            nonzero *= <uint64_t>dims[i]
    count = 0 if zero else nonzero  # meaningless when it overflowed: then refused below
    if kind == _BYTES:
        if not zero and not overflow and nonzero == 1 and not one_framed(c.buf + start, size):
            # One element sent bare (schemas.tensors.BYTES_RULE): the data is the element.
            arr = _empty(1, dtype=_OBJECT)
            arr[0] = PyBytes_FromStringAndSize(<const char*>c.buf + start, size)
            return arr.reshape(tuple([dims[i] for i in range(ndims)]))
        if not zero and (overflow or nonzero > <uint64_t>size // 4):
            verdict[0] = BAD  # 4 * count > len(data): not even the length prefixes fit
            return None
        if zero and (overflow or nonzero > <uint64_t>0x7FFFFFFFFFFFFFFF // 8):
            verdict[0] = UNSURE  # NumPy may refuse the shape though it holds nothing
            return None
        return bytes_tensor(c.buf + start, size, count, dims, ndims, verdict)
    itemsize = <uint64_t>_ITEMSIZE[kind]
    if zero:
        if size != 0:
            verdict[0] = BAD
            return None
        if overflow or nonzero > <uint64_t>0x7FFFFFFFFFFFFFFF // itemsize:
            verdict[0] = UNSURE  # NumPy may refuse the shape though it holds nothing
            return None
    elif overflow or nonzero > <uint64_t>0x7FFFFFFFFFFFFFFF // itemsize or \
            nonzero * itemsize != <uint64_t>size:
        verdict[0] = BAD  # len(data) != count * itemsize
        return None
    cdef const char* at = <const char*>c.buf + start
    cdef object base
    if <uintptr_t>at % itemsize == 0:
        base = record
    else:
        base = PyBytes_FromStringAndSize(at, size)
        at = PyBytes_AS_STRING(base)
    descr = _DTYPES[kind]
    Py_INCREF(descr)  # PyArray_NewFromDescr steals it
    arr = PyArray_NewFromDescr(
        <PyTypeObject*>cnp.ndarray, <void*>descr, ndims, dims, NULL, <void*>at, 0, NULL
    )  # flags 0: read-only, like np.frombuffer over bytes
    cnp.set_array_base(arr, base)
    return arr


cdef inline bint one_framed(const uint8_t* p, Py_ssize_t size):
    """Whether ``p`` is exactly one length-prefixed BYTES element."""
    if size < 4:
        return False
    cdef uint64_t n = p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (
        <uint32_t>p[3] << 24
    )
    return n == <uint64_t>(size - 4)


cdef object bytes_tensor(
    const uint8_t* p, Py_ssize_t size, uint64_t count, cnp.npy_intp* dims, int ndims,
    Verdict* verdict,
):
    """`bytes_to_array` for BYTES: 4-byte little-endian lengths, nothing left over.

    Each element is copied once, straight from the record; the array is built by the
    reference's own NumPy calls (``np.empty``, slice assignment, ``reshape``), so it has
    the same dtype, shape and (writable) flags.
    """
    cdef Py_ssize_t pos = 0
    cdef uint64_t k
    cdef uint32_t n
    cdef int d
    elements = []
    for k in range(count):
        if size - pos < 4:
            verdict[0] = BAD
            return None
        n = p[pos] | (<uint32_t>p[pos + 1] << 8) | (<uint32_t>p[pos + 2] << 16) | (
            <uint32_t>p[pos + 3] << 24
        )
        pos += 4
        if n > <uint64_t>(size - pos):
            verdict[0] = BAD
            return None
        elements.append(PyBytes_FromStringAndSize(<const char*>p + pos, n))
        pos += n
    if pos != size:
        verdict[0] = BAD
        return None
    arr = _empty(len(elements), dtype=_OBJECT)
    arr[:] = elements
    return arr.reshape(tuple([dims[d] for d in range(ndims)]))


cdef object _parse(bytes record, Verdict* verdict):
    """The `Request` for ``record``, or None with ``verdict`` saying why not."""
    global _last_model, _last_name
    cdef Cursor c
    cdef uint64_t count
    cdef Py_ssize_t ntensors = 0, npairs = 0, start, size, dstart, dsize
    cdef int64_t branch, deadline_value, dim
    cdef cnp.npy_intp dims[MAXDIMS]
    cdef int ndims, kind
    cdef uint64_t k
    c.buf = <const uint8_t*>PyBytes_AS_STRING(record)
    c.n = PyBytes_GET_SIZE(record)
    c.pos = 0
    verdict[0] = BAD

    rid = read_str(&c)
    if rid is None:
        return None
    model = read_repeated(&c, _last_model)
    if model is None:
        return None
    _last_model = model
    version = read_optional_str(&c)
    if version is _MALFORMED:
        return None

    arrays = {}
    while True:
        if not read_count(&c, &count):
            return None
        if count == 0:
            break
        if count > <uint64_t>(_MAX_TENSORS - ntensors):
            return None
        for k in range(count):
            name = read_repeated(&c, _last_name)
            if name is None:
                return None
            _last_name = name
            if not read_span(&c, &start, &size):
                return None
            kind = datatype_index(c.buf + start, size)
            if kind < 0:
                return None  # not UTF-8, or not a datatype: refused either way
            ndims = 0
            while True:
                if not read_count(&c, &count):
                    return None
                if count == 0:
                    break
                if count > <uint64_t>(MAXDIMS - ndims):
                    return None
                while count > 0:
                    if not read_long(&c, &dim):
                        return None
                    dims[ndims] = <cnp.npy_intp>dim
                    ndims += 1
                    count -= 1
            if not read_span(&c, &dstart, &dsize):
                return None
            if PyDict_Contains(arrays, name):
                return None
            arr = tensor(record, &c, kind, dims, ndims, dstart, dsize, verdict)
            if arr is None:
                return None
            PyDict_SetItem(arrays, name, arr)
            ntensors += 1

    parameters = {}
    while True:
        if not read_count(&c, &count):
            return None
        if count == 0:
            break
        if count > <uint64_t>(_MAX_PARAMETERS - npairs):
            return None
        for k in range(count):
            key = read_str(&c)
            if key is None:
                return None
            value = read_str(&c)
            if value is None:
                return None
            PyDict_SetItem(parameters, key, value)
            npairs += 1

    if not read_long(&c, &branch):
        return None
    deadline = None
    if branch == 1:
        if not read_long(&c, &deadline_value):
            return None
        deadline = PyLong_FromLongLong(deadline_value)
    elif branch != 0:
        return None

    if not read_long(&c, &branch):
        return None
    reply = None
    if branch == 1:
        if not read_span(&c, &start, &size):
            return None
        if size and not legal_topic(c.buf + start, size):
            return None  # not a Kafka topic name (or not UTF-8): refused either way
        reply = utf8(c.buf + start, size)  # legal, so ASCII (or empty)
        if reply is None:
            return None
    elif branch != 0:
        return None
    if c.pos != c.n:
        return None
    verdict[0] = BUILT
    request = _REQUEST.new()
    _REQUEST.put(request, 0, rid)
    _REQUEST.put(request, 1, model)
    _REQUEST.put(request, 2, arrays)
    _REQUEST.put(request, 3, version)
    _REQUEST.put(request, 4, parameters)
    _REQUEST.put(request, 5, deadline)
    _REQUEST.put(request, 6, reply)
    return request


def decode_requests(values, slow):
    """`AvroCodec.decode_requests` for plain Avro: entry i for ``values[i]``.

    ``slow(value)`` is the reference for one value (a `Request` or the `RequestError`).
    """
    cdef Verdict verdict
    out = []
    for v in values:
        if PyBytes_CheckExact(v):
            r = _parse(<bytes>v, &verdict)
            if r is not None:
                out.append(r)
                continue
        out.append(slow(v))
    return out


def classify(bytes record not None):
    """What the compiled reader alone makes of ``record`` (for the property tests).

    A `Request`, ``"bad"`` (the reference must refuse it) or ``"unsure"`` (handed over).
    """
    cdef Verdict verdict
    r = _parse(record, &verdict)
    if r is not None:
        return r
    return "bad" if verdict == BAD else "unsure"


# -- results ---------------------------------------------------------------------------


cdef inline Py_ssize_t long_size(int64_t n) noexcept nogil:
    cdef uint64_t z = (<uint64_t>n << 1) ^ <uint64_t>(n >> 63)
    cdef Py_ssize_t size = 1
    while z > 0x7F:
        z >>= 7
        size += 1
    return size


cdef inline char* put_long(char* p, int64_t n) noexcept nogil:
    cdef uint64_t z = (<uint64_t>n << 1) ^ <uint64_t>(n >> 63)
    while z > 0x7F:
        p[0] = <char>((z & 0x7F) | 0x80)
        p += 1
        z >>= 7
    p[0] = <char>z
    return p + 1


cdef inline char* put(char* p, const char* src, Py_ssize_t n) noexcept nogil:
    memcpy(p, src, n)
    return p + n


cdef inline bint as_int64(object o, int64_t* out):
    """An exact ``int`` within 64 bits; anything else is left to the reference."""
    cdef int overflow = 0
    if not PyLong_CheckExact(o):
        return False
    out[0] = PyLong_AsLongLongAndOverflow(o, &overflow)
    return overflow == 0


cdef object encode_row(
    Py_ssize_t i, object rid, object timing, bytes size_varint, object topic,
    object partition, object offset, bytes header, bytes head, list tensors,
):
    """Row ``i`` of the batch, or None to let the reference encode it (or raise)."""
    cdef Py_ssize_t rid_n, topic_n, total, j, n_t, row_len_c
    cdef const char* rid_p
    cdef const char* topic_p
    cdef int64_t part_v = 0, off_v = 0
    cdef double t[5]
    cdef char* p
    if not PyUnicode_CheckExact(rid) or not PyUnicode_CheckExact(topic):
        return None
    if not PyTuple_CheckExact(timing) or PyTuple_GET_SIZE(timing) != 5:
        return None
    for j in range(5):
        item = <object>PyTuple_GET_ITEM(timing, j)
        if not PyFloat_CheckExact(item):
            return None
        t[j] = PyFloat_AS_DOUBLE(item)
    if not as_int64(partition, &part_v) or not as_int64(offset, &off_v):
        return None
    rid_p = PyUnicode_AsUTF8AndSize(rid, &rid_n)
    if rid_p == NULL:
        PyErr_Clear()  # lone surrogates: the reference raises its own UnicodeEncodeError
        return None
    topic_p = PyUnicode_AsUTF8AndSize(topic, &topic_n)
    if topic_p == NULL:
        PyErr_Clear()
        return None
    total = (
        len(header) + long_size(rid_n) + rid_n + len(head) + 2 + 40 + len(size_varint)
        + long_size(topic_n) + topic_n + long_size(part_v) + long_size(off_v)
    )
    n_t = len(tensors)
    for j in range(n_t):
        prefix, row_len, data, per_row = <tuple>tensors[j]
        total += len(<bytes>prefix)
        if per_row is not None:
            if i >= len(<list>per_row):
                return None
            total += len(<bytes>(<list>per_row)[i])
        else:
            if (i + 1) * <Py_ssize_t>row_len > len(<bytes>data):
                return None  # the reference slices past the end: let it
            total += <Py_ssize_t>row_len
    out = PyBytes_FromStringAndSize(NULL, total)
    p = PyBytes_AS_STRING(out)
    p = put(p, PyBytes_AS_STRING(header), len(header))
    p = put_long(p, rid_n)
    p = put(p, rid_p, rid_n)
    p = put(p, PyBytes_AS_STRING(head), len(head))
    for j in range(n_t):
        prefix, row_len, data, per_row = <tuple>tensors[j]
        p = put(p, PyBytes_AS_STRING(prefix), len(<bytes>prefix))
        if per_row is not None:
            cell = <bytes>(<list>per_row)[i]
            p = put(p, PyBytes_AS_STRING(cell), len(cell))
        else:
            row_len_c = <Py_ssize_t>row_len
            p = put(p, PyBytes_AS_STRING(data) + i * row_len_c, row_len_c)
    p[0] = 0  # end of the outputs array
    p[1] = 0  # error: null
    p += 2
    p = put(p, <const char*>t, 40)  # five little-endian doubles (x86-64, aarch64)
    p = put(p, PyBytes_AS_STRING(size_varint), len(size_varint))
    p = put_long(p, topic_n)
    p = put(p, topic_p, topic_n)
    p = put_long(p, part_v)
    p = put_long(p, off_v)
    return out


cdef bint plain_tensors(list tensors):
    """Whether every output is (bytes, int, bytes, None) or (bytes, int, None, list of bytes).

    `encode_row` reads these buffers without further checks; `ResultBatchEncoder` always
    builds them so, and anything else is left to the reference row encoder.
    """
    for t in tensors:
        if not PyTuple_CheckExact(t) or PyTuple_GET_SIZE(t) != 4:
            return False
        prefix, row_len, data, per_row = <tuple>t
        if not PyBytes_CheckExact(prefix) or not PyLong_CheckExact(row_len) or row_len < 0:
            return False
        if per_row is None:
            if not PyBytes_CheckExact(data):
                return False
        elif type(per_row) is not list or not all(PyBytes_CheckExact(c) for c in per_row):
            return False
    return True


def encode_results(
    bytes header not None, bytes head not None, list tensors not None, rids, timings,
    batch_size, topics, partitions, offsets, row,
):
    """Every row's result bytes; ``row(i)`` is the reference for one row.

    ``head`` is everything between the id and the first output (model, version, status,
    the outputs array's count), ``tensors`` the encoder's (prefix, row_len, data, per_row)
    and ``header`` the Schema Registry frame (empty without one). The caller has checked
    that the sequences have one length.
    """
    cdef int64_t size_v = 0
    cdef Py_ssize_t i, n = len(rids)
    cdef char buf[10]
    if not as_int64(batch_size, &size_v) or not plain_tensors(tensors):
        return [row(i) for i in range(n)]
    size_varint = PyBytes_FromStringAndSize(buf, put_long(buf, size_v) - buf)
    out = PyList_New(n)
    for i in range(n):
        r = encode_row(
            i, rids[i], timings[i], size_varint, topics[i], partitions[i], offsets[i],
            header, head, tensors,
        )
        if r is None:
            r = row(i)
        Py_INCREF(r)
        PyList_SET_ITEM(out, i, r)
    return out


def bytes_cells(arr):
    """The encoder's per-row cells of a BYTES output column, or None for the reference.

    Row i's cell is what `schemas.binary.ResultBatchEncoder` builds with
    ``_bytes(_pack_bytes_row(arr[i]))``: an Avro length, then each element of the row
    (flattened) behind its 4-byte little-endian length. Only object arrays whose elements
    are exact ``bytes`` or ``str`` are taken; anything else (NumPy ``S``/``U`` arrays, other
    element types, empty columns, a str that is not UTF-8) is left to the reference.
    """
    cdef Py_ssize_t rows, i, j, count, total, sz
    cdef const char* data
    cdef char* p
    cdef char buf[10]
    if type(arr) is not cnp.ndarray or arr.dtype != _OBJECT or arr.ndim < 1 or arr.size == 0:
        return None
    rows = arr.shape[0]
    flat = arr.reshape(rows, 1) if arr.ndim == 1 else arr.reshape(rows, -1)
    count = flat.shape[1]
    out = []
    for i in range(rows):
        row = flat[i].tolist()
        total = 4 * count
        for j in range(count):
            e = row[j]
            if PyBytes_CheckExact(e):
                sz = PyBytes_GET_SIZE(e)
            elif PyUnicode_CheckExact(e):
                if PyUnicode_AsUTF8AndSize(e, &sz) == NULL:
                    PyErr_Clear()
                    return None
            else:
                return None
            if sz > 0xFFFFFFFF:
                return None
            total += sz
        head = put_long(buf, total) - buf
        cell = PyBytes_FromStringAndSize(NULL, head + total)
        p = put(PyBytes_AS_STRING(cell), buf, head)
        for j in range(count):
            e = row[j]
            if PyBytes_CheckExact(e):
                data = PyBytes_AS_STRING(e)
                sz = PyBytes_GET_SIZE(e)
            else:
                data = PyUnicode_AsUTF8AndSize(e, &sz)
            p[0] = <char>(sz & 0xFF)
            p[1] = <char>((sz >> 8) & 0xFF)
            p[2] = <char>((sz >> 16) & 0xFF)
            p[3] = <char>((sz >> 24) & 0xFF)
            p = put(p + 4, data, sz)
        out.append(cell)
    return out


# -- exact signatures -------------------------------------------------------------------


cdef Py_ssize_t R_MODEL = _REQUEST.at("model"), R_VERSION = _REQUEST.at("model_version")
cdef Py_ssize_t R_INPUTS = _REQUEST.at("inputs")


def match_signatures(items, dict table):
    """`schemas.signatures.match_signatures`, compiled: one entry per item.

    A request's fields are read at their slots' offsets; a row naming the very model
    object of the row before (decoded rows share it) reuses its table entry.
    """
    cdef list out = []
    cdef object model, last = None, entry = None
    for r in items:
        if type(r) is not Request:
            out.append(-1)
            continue
        model = _REQUEST.read(r, R_MODEL)
        if last is None or model is not last:
            entry, last = table.get(model), model
        out.append(_signature(r, entry))
    return out


cdef long _signature(object r, object entry) except? -2:
    """Request ``r``'s model index when it fits ``entry`` (its model's row of the table)."""
    cdef Py_ssize_t j, n, d, ndim
    cdef cnp.npy_intp* dims
    if entry is None:
        return -1
    index, version, names, dtypes, shapes = entry
    v = _REQUEST.read(r, R_VERSION)
    if v is not None and v != "" and v != version:
        return -1
    inputs = _REQUEST.read(r, R_INPUTS)
    if type(inputs) is not dict:
        return -1
    n = len(<tuple>names)
    if len(<dict>inputs) != n:
        return -1
    for j in range(n):
        arr = (<dict>inputs).get((<tuple>names)[j])
        if arr is None or not cnp.PyArray_Check(arr):
            return -1
        descr = <object><PyObject*>cnp.PyArray_DESCR(<cnp.ndarray>arr)
        if not cnp.PyArray_EquivTypes(<cnp.dtype>descr, <cnp.dtype>(<tuple>dtypes)[j]):
            return -1
        shape = (<tuple>shapes)[j]
        ndim = cnp.PyArray_NDIM(<cnp.ndarray>arr)
        if ndim != len(<tuple>shape):
            return -1
        dims = cnp.PyArray_DIMS(<cnp.ndarray>arr)
        for d in range(ndim):
            if dims[d] != <cnp.npy_intp>(<tuple>shape)[d]:
                return -1
    return index
