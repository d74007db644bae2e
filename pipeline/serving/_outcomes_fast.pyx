# cython: language_level=3, boundscheck=False, wraparound=False
"""The compiled twin of pipeline/serving/result_rows.py: its per-row passes, each one C loop.

result_rows.py is the reference; every function here returns exactly what its
``_``-named Python twin there returns (tests/pipeline/serving/test_result_rows.py,
hypothesis). What is saved is the interpreter's work per row: the loops, the attribute
lookups, and an `Outcome`'s __init__ (filled from C, schemas/_slots.pxi).

Runs on the CPU only; nothing here touches a GPU.
"""

from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE, PyList_New, PyList_SET_ITEM
from cpython.ref cimport Py_INCREF

include "../../schemas/_slots.pxi"


cdef inline void _set(list out, Py_ssize_t i, object v):
    Py_INCREF(v)
    PyList_SET_ITEM(out, i, v)


def result_fields(list rows, double started, double now_ms, pre_ms, compute_ms, post_ms):
    """`result_rows._result_fields`: (ids, timings, topics, partitions, offsets, other_encoding)."""
    cdef Py_ssize_t i, n = PyList_GET_SIZE(rows)
    cdef list ids = PyList_New(n), timings = PyList_New(n)
    cdef list topics = PyList_New(n), partitions = PyList_New(n), offsets = PyList_New(n)
    cdef bint other = False
    cdef object env, stamp
    for i in range(n):
        env = <object>PyList_GET_ITEM(rows, i)
        _set(ids, i, env.request.id)
        stamp = env.timestamp_ms
        _set(
            timings,
            i,
            ((started - <double>env.consumed_at) * 1000.0, pre_ms, compute_ms, post_ms, now_ms - stamp),
        )
        _set(topics, i, env.topic)
        _set(partitions, i, env.partition)
        _set(offsets, i, env.offset)
        if not other and env.encoding:
            other = True
    return ids, timings, topics, partitions, offsets, other


cdef dict _layouts = {}  # per class: its _Layout, the six fields outcomes() gives


def outcomes(cls, list rows, list values, output, bint replies, model):
    """`result_rows._outcomes`: an outcome per row, and the rows with headers."""
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
            topic = env.request.reply_topic or output
        made = layout.new()
        layout.put(made, 0, env)
        layout.put(made, 1, topic)
        layout.put(made, 2, <object>PyList_GET_ITEM(values, i))
        layout.put(made, 3, None)
        layout.put(made, 4, None)
        layout.put(made, 5, model)
        _set(out, i, made)
        if env.headers:
            headed.append(i)
    return out, headed
