# cython: language_level=3, boundscheck=False, wraparound=False
"""The compiled twin of pipeline/serving/batch_rows.py: its per-row passes, each one C loop.

batch_rows.py is the reference; every function here returns exactly what its
``_``-named Python twin there returns (tests/pipeline/serving/test_batch_rows.py,
hypothesis). What is saved is the interpreter's work per row: the loops, the attribute
lookups (an `Envelope`'s and a `Request`'s fields are read at their slots' offsets,
schemas/_slots.pxi), an `Outcome`'s __init__ (filled from C), and NumPy's per-array
overhead when a batch's tensors are joined (`gather`: one memcpy per row).

Runs on the CPU only; nothing here touches a GPU.
"""

cimport numpy as cnp
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE, PyList_New, PyList_SET_ITEM
from cpython.ref cimport Py_INCREF
from libc.string cimport memcpy

import numpy as np

from schemas.messages import Envelope, Request

include "../../schemas/_slots.pxi"

cnp.import_array()

cdef _Layout _ENV = _Layout(Envelope, 8)
cdef _Layout _REQ = _Layout(Request, 7)
cdef Py_ssize_t E_TOPIC = _ENV.at("topic"), E_PARTITION = _ENV.at("partition")
cdef Py_ssize_t E_OFFSET = _ENV.at("offset"), E_STAMP = _ENV.at("timestamp_ms")
cdef Py_ssize_t E_CONSUMED = _ENV.at("consumed_at"), E_REQUEST = _ENV.at("request")
cdef Py_ssize_t E_HEADERS = _ENV.at("headers"), E_ENCODING = _ENV.at("encoding")
cdef Py_ssize_t R_ID = _REQ.at("id"), R_INPUTS = _REQ.at("inputs")
cdef Py_ssize_t R_DEADLINE = _REQ.at("deadline_ms"), R_REPLY = _REQ.at("reply_topic")


cdef inline void _set(list out, Py_ssize_t i, object v):
    Py_INCREF(v)
    PyList_SET_ITEM(out, i, v)


def result_fields(list rows, double started, double now_ms, pre_ms, compute_ms, post_ms):
    """`batch_rows._result_fields`: (ids, timings, topics, partitions, offsets, other_encoding)."""
    cdef Py_ssize_t i, n = PyList_GET_SIZE(rows)
    cdef list ids = PyList_New(n), timings = PyList_New(n)
    cdef list topics = PyList_New(n), partitions = PyList_New(n), offsets = PyList_New(n)
    cdef bint other = False
    cdef object env, stamp
    for i in range(n):
        env = <object>PyList_GET_ITEM(rows, i)
        _set(ids, i, _REQ.read(_ENV.read(env, E_REQUEST), R_ID))
        stamp = _ENV.read(env, E_STAMP)
        _set(
            timings,
            i,
            (
                (started - <double>_ENV.read(env, E_CONSUMED)) * 1000.0,
                pre_ms,
                compute_ms,
                post_ms,
                now_ms - stamp,
            ),
        )
        _set(topics, i, _ENV.read(env, E_TOPIC))
        _set(partitions, i, _ENV.read(env, E_PARTITION))
        _set(offsets, i, _ENV.read(env, E_OFFSET))
        if not other and _ENV.read(env, E_ENCODING):
            other = True
    return ids, timings, topics, partitions, offsets, other


cdef dict _layouts = {}  # per class: its _Layout, the six fields outcomes() gives


def outcomes(cls, list rows, list values, output, bint replies, model):
    """`batch_rows._outcomes`: an outcome per row, and the rows with headers."""
    cdef Py_ssize_t i, n = PyList_GET_SIZE(rows)
    if PyList_GET_SIZE(values) != n:
        raise ValueError("outcomes: rows and values of different lengths")
    cdef _Layout layout = _layouts.get(cls)
    if layout is None:
        layout = _layouts[cls] = _Layout(cls, 6)
    cdef list out = PyList_New(n), headed = []
    cdef object env, topic, made
    for i in range(n):
        env = <object>PyList_GET_ITEM(rows, i)
        topic = output
        if replies:
            topic = _REQ.read(_ENV.read(env, E_REQUEST), R_REPLY) or output
        made = layout.new()
        layout.put(made, 0, env)
        layout.put(made, 1, topic)
        layout.put(made, 2, <object>PyList_GET_ITEM(values, i))
        layout.put(made, 3, None)
        layout.put(made, 4, None)
        layout.put(made, 5, model)
        _set(out, i, made)
        if _ENV.read(env, E_HEADERS):
            headed.append(i)
    return out, headed


def no_deadlines(list rows):
    """`batch_rows._no_deadlines`: no row's request has a deadline."""
    cdef object env, request
    for env in rows:
        request = _ENV.read(env, E_REQUEST)
        if request is not None and _REQ.read(request, R_DEADLINE) is not None:
            return False
    return True


def ages(list rows, double now_ms):
    """`batch_rows._ages`: each row's age in seconds at ``now_ms``, from its timestamp."""
    cdef Py_ssize_t i, n = PyList_GET_SIZE(rows)
    cdef list out = PyList_New(n)
    for i in range(n):
        _set(out, i, (now_ms - _ENV.read(<object>PyList_GET_ITEM(rows, i), E_STAMP)) / 1000.0)
    return out


def inputs(list rows, name):
    """`batch_rows._inputs`: every row's tensor ``name``."""
    cdef Py_ssize_t i, n = PyList_GET_SIZE(rows)
    cdef list out = PyList_New(n)
    for i in range(n):
        env = <object>PyList_GET_ITEM(rows, i)
        _set(out, i, _REQ.read(_ENV.read(env, E_REQUEST), R_INPUTS)[name])
    return out


def gather(list arrays):
    """The arrays end to end under a batch dimension (`steps.stack_rows`), or None.

    Only where that is one memcpy per row: every array an ndarray of the first one's
    very dtype (native byte order, holding no objects) and shape, C-contiguous, and not
    a scalar. None
    otherwise: the caller's NumPy path joins them, or names what does not fit.
    """
    cdef Py_ssize_t i, n = PyList_GET_SIZE(arrays), k, ndim, size
    if n == 0:
        return None
    cdef object item = <object>PyList_GET_ITEM(arrays, 0)
    if type(item) is not np.ndarray:
        return None
    cdef cnp.ndarray first = item, a
    ndim = cnp.PyArray_NDIM(first)
    if ndim == 0 or not cnp.PyArray_IS_C_CONTIGUOUS(first):
        return None
    if first.dtype.hasobject or not first.dtype.isnative:  # NumPy would convert these
        return None
    cdef cnp.PyArray_Descr* dtype = cnp.PyArray_DESCR(first)
    cdef cnp.npy_intp* dims = cnp.PyArray_DIMS(first)
    size = cnp.PyArray_NBYTES(first)
    for i in range(1, n):
        item = <object>PyList_GET_ITEM(arrays, i)
        if type(item) is not np.ndarray:
            return None
        a = item
        if cnp.PyArray_DESCR(a) != dtype or cnp.PyArray_NDIM(a) != ndim:
            return None
        if not cnp.PyArray_IS_C_CONTIGUOUS(a):
            return None
        for k in range(ndim):
            if cnp.PyArray_DIMS(a)[k] != dims[k]:
                return None
    whole = <object>first
    out = np.empty((n, *whole.shape), whole.dtype)
    cdef char* dst = <char*>cnp.PyArray_DATA(out)
    for i in range(n):
        a = <object>PyList_GET_ITEM(arrays, i)
        memcpy(dst + i * size, cnp.PyArray_DATA(a), size)
    return out
