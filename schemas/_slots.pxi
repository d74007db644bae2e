# Included by the compiled codec (schemas/_codec_fast.pyx) and the compiled row passes
# (pipeline/engine/_rows_fast.pyx, pipeline/serving/_batch_rows_fast.pyx): filling a slots
# dataclass's instance from C.
#
# Calling a dataclass runs its generated __init__, Python bytecode that stores each field:
# ~140 ns for an `Envelope`, ~220 for a `Request`, ~260 for an `Outcome` with keywords, paid once per record on
# the hot path. `_Layout` instead allocates the instance with its type's tp_alloc and
# writes each field's reference straight into its slot, at the offset CPython's member
# descriptor for that slot holds (~45 ns, measured on the development machine): what
# the generated __init__ does, without the interpreter. Only for classes where that is
# all __init__ does: a slots dataclass whose fields are plain object slots, with no
# __post_init__, whose fields past the ones a pass gives have plain defaults (no
# default_factory). `_Layout` checks each of these and refuses the class otherwise;
# the property tests check that what it makes equals what the class makes.
#
# `_Layout.read` is the other way: a field of an instance of exactly that class read
# at its offset (~2 ns against ~25 for ``getattr``); anything else (another class, an
# unset slot) goes through ``getattr``, with its usual error.

import dataclasses

from cpython.object cimport PyObject

cdef extern from *:
    """
    #include <structmember.h>
    /* The offset of a __slots__ field in its instances; -1: not a plain object slot. */
    static Py_ssize_t kp_slot_offset(PyObject* d) {
        PyMemberDef* m;
        if (d == NULL || Py_TYPE(d) != &PyMemberDescr_Type) return -1;
        m = ((PyMemberDescrObject*)d)->d_member;
        if (m->type != T_OBJECT_EX || (m->flags & READONLY)) return -1;
        return m->offset;
    }
    /* A new instance of type t, every slot empty (NULL), or NULL with an exception. */
    static PyObject* kp_slot_new(PyObject* t) {
        return ((PyTypeObject*)t)->tp_alloc((PyTypeObject*)t, 0);
    }
    /* The object in the slot at off (a borrowed reference), or NULL when unset. */
    static PyObject* kp_slot_get(PyObject* o, Py_ssize_t off) {
        return *(PyObject**)((char*)o + off);
    }
    /* Store a new reference to v in the (empty) slot at off. */
    static void kp_slot_put(PyObject* o, Py_ssize_t off, PyObject* v) {
        Py_INCREF(v);
        *(PyObject**)((char*)o + off) = v;
    }
    """
    Py_ssize_t kp_slot_offset(PyObject* d)
    object kp_slot_new(object t)
    PyObject* kp_slot_get(object o, Py_ssize_t off)
    void kp_slot_put(object o, Py_ssize_t off, object v)

cdef enum:
    _MAX_SLOTS = 16


cdef class _Layout:
    """Where a slots dataclass keeps each field; makes instances from C.

    A pass gives the first ``given`` fields (in the dataclass's order) with `put`; `new`
    has already stored the others' defaults. `read` reads any field.
    """

    cdef object cls
    cdef Py_ssize_t given, n
    cdef Py_ssize_t offsets[_MAX_SLOTS]
    cdef tuple defaults, names

    def __init__(self, cls, Py_ssize_t given):
        fields = dataclasses.fields(cls)
        if not 0 < given <= len(fields) <= _MAX_SLOTS:
            raise TypeError(f"{cls.__name__}: {len(fields)} fields, {given} given")
        if hasattr(cls, "__post_init__"):
            raise TypeError(f"{cls.__name__} has a __post_init__")
        defaults = []
        cdef Py_ssize_t i, offset
        for i, f in enumerate(fields):
            descr = cls.__dict__.get(f.name)
            offset = kp_slot_offset(<PyObject*>descr)
            if offset < 0:
                raise TypeError(f"{cls.__name__}.{f.name} is not a plain slot")
            self.offsets[i] = offset
            if i >= given:
                if f.default is dataclasses.MISSING:
                    raise TypeError(f"{cls.__name__}.{f.name} has no plain default")
                defaults.append(f.default)
        self.cls, self.given, self.n, self.defaults = cls, given, len(fields), tuple(defaults)
        self.names = tuple(f.name for f in fields)

    cdef inline object new(self):
        """An instance with the defaults stored; the caller puts every given field."""
        o = kp_slot_new(self.cls)
        cdef Py_ssize_t i
        for i in range(self.given, self.n):
            kp_slot_put(o, self.offsets[i], self.defaults[i - self.given])
        return o

    cdef inline void put(self, object o, Py_ssize_t i, object v):
        kp_slot_put(o, self.offsets[i], v)

    def at(self, name):
        """The index of field ``name`` (for `read`)."""
        return self.names.index(name)

    cdef inline object read(self, object o, Py_ssize_t i):
        """Field ``i`` of ``o``: at its offset when ``o`` is exactly this class."""
        cdef PyObject* v
        if type(o) is self.cls:
            v = kp_slot_get(o, self.offsets[i])
            if v is not NULL:
                return <object>v
        return getattr(o, self.names[i])
