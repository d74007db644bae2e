# cython: language_level=3, boundscheck=False, wraparound=False
"""The compiled twin of pipeline/engine/rows.py: its per-record passes, each one C loop.

rows.py is the reference; every function here returns exactly what its ``_``-named
Python twin there returns (tests/pipeline/engine/test_rows.py, hypothesis). What is
saved is the interpreter's work per record: the loop, the attribute lookups and the
bound-method objects. The `Message` getters are taken once from the class and called
with vectorcall; an `Envelope` is filled from C (schemas/_slots.pxi) rather than
through its __init__, and an outcome's fields and its envelope's are read at their
slots' offsets (any other object's with ``getattr``).

Runs on the CPU only; nothing here touches a GPU.
"""

include "../../schemas/_slots.pxi"
include "_outcome_fields.pxi"

from cpython.bytes cimport PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem, PyDict_SetItem
from cpython.list cimport PyList_Append, PyList_GET_ITEM, PyList_GET_SIZE, PyList_New, PyList_SET_ITEM
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_GET_ITEM

from confluent_kafka import KafkaException, Message

cdef object _OFFSET = Message.offset
cdef object _VALUE = Message.value
cdef object _KEY = Message.key
cdef object _TIMESTAMP = Message.timestamp
cdef object _HEADERS = Message.headers
cdef object _ERROR = Message.error
cdef object _TOPIC = Message.topic
cdef object _PARTITION = Message.partition


def partition_runs(list msgs):
    """`rows._partition_runs`: (failed, topic, partition, start, stop) per run, in order."""
    cdef Py_ssize_t i, start = 0, n = PyList_GET_SIZE(msgs)
    cdef list out = []
    cdef object m, topic, partition, topic0 = None, partition0 = None
    cdef bint failed, failed0 = False
    for i in range(n):
        m = <object>PyList_GET_ITEM(msgs, i)
        failed = _ERROR(m) is not None
        topic = _TOPIC(m)
        partition = _PARTITION(m)
        if i and (failed != failed0 or topic != topic0 or partition != partition0):
            out.append((failed0, topic0, partition0, start, i))
            start = i
        if i == start:
            failed0, topic0, partition0 = failed, topic, partition
    if n:
        out.append((failed0, topic0, partition0, start, n))
    return out


def read_run(list run):
    """`rows._read_run`: (offsets, values, keys, stamps, sizes, ordered, tombstones, headers)."""
    cdef Py_ssize_t i, n = PyList_GET_SIZE(run)
    cdef list offsets = PyList_New(n), values = PyList_New(n)
    cdef list keys = PyList_New(n), stamps = PyList_New(n), sizes = PyList_New(n)
    cdef long long offset, last = 0
    cdef Py_ssize_t size
    cdef bint ordered = True, tombstones = False, headers = False
    cdef object m, o, v, k, t, s, z
    for i in range(n):
        m = <object>PyList_GET_ITEM(run, i)
        o = _OFFSET(m)
        v = _VALUE(m)
        k = _KEY(m)
        t = _TIMESTAMP(m)
        s = <object>PyTuple_GET_ITEM(t, 1)
        offset = o
        if i and offset <= last:
            ordered = False
        last = offset
        if v is None:
            tombstones = True
            size = 0
        elif type(v) is bytes:
            size = PyBytes_GET_SIZE(v)
        else:
            size = len(v)
        if not headers and _HEADERS(m):
            headers = True
        Py_INCREF(o)
        PyList_SET_ITEM(offsets, i, o)
        Py_INCREF(v)
        PyList_SET_ITEM(values, i, v)
        Py_INCREF(k)
        PyList_SET_ITEM(keys, i, k)
        Py_INCREF(s)
        PyList_SET_ITEM(stamps, i, s)
        z = size
        Py_INCREF(z)
        PyList_SET_ITEM(sizes, i, z)
    return offsets, values, keys, stamps, sizes, ordered, tombstones, headers


cdef dict _layouts = {}  # per class: its _Layout, the eight fields envelopes() gives


def envelopes(cls, topic, partition, generation, now, list keys, list values, list offsets, list stamps):
    """`rows._envelopes`: ``cls(topic, partition, offset, key, value, stamp, now, generation)``."""
    cdef Py_ssize_t i, n = PyList_GET_SIZE(keys)
    if PyList_GET_SIZE(values) != n or PyList_GET_SIZE(offsets) != n or PyList_GET_SIZE(stamps) != n:
        raise ValueError("envelopes: columns of different lengths")
    cdef _Layout layout = _layouts.get(cls)
    if layout is None:
        layout = _layouts[cls] = _Layout(cls, 8)
    cdef list out = PyList_New(n)
    cdef object env
    for i in range(n):
        env = layout.new()
        layout.put(env, 0, topic)
        layout.put(env, 1, partition)
        layout.put(env, 2, <object>PyList_GET_ITEM(offsets, i))
        layout.put(env, 3, <object>PyList_GET_ITEM(keys, i))
        layout.put(env, 4, <object>PyList_GET_ITEM(values, i))
        layout.put(env, 5, <object>PyList_GET_ITEM(stamps, i))
        layout.put(env, 6, now)
        layout.put(env, 7, generation)
        Py_INCREF(env)
        PyList_SET_ITEM(out, i, env)
    return out


def offset_runs(list outcomes):
    """`rows._offset_runs`: offsets by (topic, partition, generation), in order.

    A batch's outcomes share their source's topic, partition and generation (the same
    objects, mostly): a row whose three are the very objects of the row before joins
    its run with no key made.
    """
    cdef dict runs = {}
    cdef object out, env, key, topic, partition, generation
    cdef object t0 = None, p0 = None, g0 = None
    cdef list last = None
    cdef PyObject* found
    cdef Py_ssize_t i, n = PyList_GET_SIZE(outcomes)
    for i in range(n):
        out = <object>PyList_GET_ITEM(outcomes, i)
        env = _OUT.read(out, O_ENV)
        topic, partition = _ENV.read(env, E_TOPIC), _ENV.read(env, E_PARTITION)
        generation = _ENV.read(env, E_GENERATION)
        if last is None or not (topic is t0 and partition is p0 and generation is g0):
            key = (topic, partition, generation)
            found = PyDict_GetItem(runs, key)
            if found is NULL:
                last = []
                PyDict_SetItem(runs, key, last)
            else:
                last = <list>found
            t0, p0, g0 = topic, partition, generation
        PyList_Append(last, _ENV.read(env, E_OFFSET))
    return runs


def kinds(list outcomes):
    """`rows._kinds`: counts by (topic, model, reason, status), in first-seen order.

    A batch's outcomes share their four fields (the same objects, mostly): a row whose
    fields are the very objects of the row before counts with it, no key made.
    """
    cdef dict counts = {}
    cdef Py_ssize_t i, n = PyList_GET_SIZE(outcomes), run = 0
    cdef object out, topic, model, reason, status, key = None
    cdef object t0 = None, m0 = None, r0 = None, s0 = None
    for i in range(n):
        out = <object>PyList_GET_ITEM(outcomes, i)
        topic, model = _OUT.read(out, O_TOPIC), _OUT.read(out, O_MODEL)
        reason, status = _OUT.read(out, O_REASON), _OUT.read(out, O_STATUS)
        if run and topic is t0 and model is m0 and reason is r0 and status is s0:
            run += 1
            continue
        if run:
            counts[key] = counts.get(key, 0) + run
        key = (topic, model, reason, status)
        t0, m0, r0, s0, run = topic, model, reason, status, 1
    if run:
        counts[key] = counts.get(key, 0) + run
    return counts


def produce_plain(produce, list outcomes, Py_ssize_t start):
    """`rows._produce_plain`: produce while plain; the first index left to the caller."""
    cdef Py_ssize_t i, n = PyList_GET_SIZE(outcomes)
    cdef object out, env
    for i in range(start, n):
        out = <object>PyList_GET_ITEM(outcomes, i)
        if _OUT.read(out, O_HEADERS) is not None:
            return i
        topic, value, env = _OUT.read(out, O_TOPIC), _OUT.read(out, O_VALUE), _OUT.read(out, O_ENV)
        key = _ENV.read(env, E_KEY)
        try:
            produce(topic, value, key)
        except (BufferError, KafkaException, ValueError, TypeError):
            return i
    return n
