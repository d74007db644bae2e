# cython: language_level=3, boundscheck=False, wraparound=False
"""A producer whose delivery reports never enter Python: librdkafka driven from C.

Why it exists (pipeline/kafka/batch_producer.py has the whole story): confluent-kafka
takes the GIL back for every delivery report it serves, even with
``delivery.report.only.error`` and no callback to call, and gives it up again after.
With the model's threads wanting the GIL too, serving a report cost the Kafka loop
~1 µs, as much as everything else it does for a request. Here the reports go to a C
function that counts them against the batch their record came in, with the GIL
released, and records only the failures; a batch's records are handed to librdkafka
in one pass with the GIL released too, so the model's threads run meanwhile.

librdkafka is the library confluent-kafka already loaded: `BatchProducer` is given its
path and looks its functions up by name (``dlsym``), so nothing here needs librdkafka's
headers at build time. The few types it touches (`rd_kafka_message_t`, `rd_kafka_vu_t`)
are declared below with the layout librdkafka's ABI has kept since 1.0 and 1.6.

Runs on the CPU only; nothing here touches a GPU.
"""

include "../../schemas/_slots.pxi"
include "../engine/_outcome_fields.pxi"

cimport cython
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memset
from posix.dlfcn cimport RTLD_NOW, dlerror, dlopen, dlsym

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize

ctypedef int rd_err_t

cdef extern from *:
    """
    typedef struct kp_rd_kafka_message_s {
        int err;
        void *rkt;
        int32_t partition;
        void *payload;
        size_t len;
        void *key;
        size_t key_len;
        int64_t offset;
        void *_private;
    } kp_rd_kafka_message_t;

    typedef struct kp_rd_kafka_vu_s {
        int vtype;
        union {
            const char *cstr;
            void *rkt;
            int i;
            int32_t i32;
            int64_t i64;
            struct { void *ptr; size_t size; } mem;
            struct { const char *name; const void *val; ssize_t size; } header;
            void *ptr;
            char _pad[64];
        } u;
    } kp_rd_kafka_vu_t;
    """
    ctypedef struct kp_rd_kafka_message_t:
        int err
        void *rkt
        int32_t partition
        void *payload
        size_t len
        void *key
        size_t key_len
        int64_t offset
        void *_private

    ctypedef struct _vu_mem:
        void *ptr
        size_t size

    ctypedef struct _vu_header:
        const char *name
        const void *val
        Py_ssize_t size

    ctypedef union _vu_u:
        const char *cstr
        void *rkt
        int i
        _vu_mem mem
        _vu_header header
        void *ptr

    ctypedef struct kp_rd_kafka_vu_t:
        int vtype
        _vu_u u

# rd_kafka_vtype_t
cdef enum:
    VT_END = 0
    VT_RKT = 2
    VT_VALUE = 4
    VT_KEY = 5
    VT_OPAQUE = 6
    VT_MSGFLAGS = 7
    VT_HEADER = 9

cdef enum:
    MSG_F_COPY = 0x2
    ERR_QUEUE_FULL = -184
    ERR_INVALID_ARG = -186
    _CHUNK = 256
    ERR_INVALID_TOPIC = 17  # the protocol's: a name librdkafka cannot take
    CONF_OK = 0
    PRODUCER = 0
    ERRSTR = 512

ctypedef void (*dr_cb_t)(void *rk, const kp_rd_kafka_message_t *m, void *opaque) noexcept nogil
ctypedef void *(*conf_new_t)() noexcept nogil
ctypedef int (*conf_set_t)(void *conf, const char *name, const char *value, char *errstr, size_t n) noexcept nogil
ctypedef void (*conf_set_dr_t)(void *conf, dr_cb_t cb) noexcept nogil
ctypedef void (*conf_set_opaque_t)(void *conf, void *opaque) noexcept nogil
ctypedef void (*conf_destroy_t)(void *conf) noexcept nogil
ctypedef void *(*new_t)(int kind, void *conf, char *errstr, size_t n) noexcept nogil
ctypedef void *(*topic_new_t)(void *rk, const char *name, void *conf) noexcept nogil
ctypedef void (*topic_destroy_t)(void *rkt) noexcept nogil
ctypedef void *(*produceva_t)(void *rk, const kp_rd_kafka_vu_t *vus, size_t n) noexcept nogil
ctypedef rd_err_t (*error_code_t)(const void *error) noexcept nogil
ctypedef void (*error_destroy_t)(void *error) noexcept nogil
ctypedef int (*poll_t)(void *rk, int timeout_ms) noexcept nogil
ctypedef rd_err_t (*flush_t)(void *rk, int timeout_ms) noexcept nogil
ctypedef int (*outq_len_t)(void *rk) noexcept nogil
ctypedef void (*destroy_t)(void *rk) noexcept nogil
ctypedef const char *(*err2str_t)(rd_err_t err) noexcept nogil
ctypedef rd_err_t (*fatal_error_t)(void *rk, char *errstr, size_t n) noexcept nogil
ctypedef rd_err_t (*test_fatal_t)(void *rk, rd_err_t err, const char *reason) noexcept nogil


cdef struct _Lib:
    conf_new_t conf_new
    conf_set_t conf_set
    conf_set_dr_t conf_set_dr_msg_cb
    conf_set_opaque_t conf_set_opaque
    conf_destroy_t conf_destroy
    new_t new
    topic_new_t topic_new
    topic_destroy_t topic_destroy
    produceva_t produceva
    error_code_t error_code
    error_destroy_t error_destroy
    poll_t poll
    flush_t flush
    outq_len_t outq_len
    destroy_t destroy
    err2str_t err2str
    fatal_error_t fatal_error
    test_fatal_t test_fatal_error  # librdkafka's test hook; NULL where it is not exported


cdef struct _Batch:
    uint64_t first  # sequence number of its first record
    uint64_t id
    uint32_t n
    uint32_t pending  # records without a delivery report yet


cdef struct _Failure:
    uint64_t batch
    uint32_t index
    rd_err_t err


cdef struct _State:
    # Batches whose records are not all reported, oldest first: [head, count) of `batches`.
    _Batch *batches
    size_t head
    size_t count
    size_t cap
    _Failure *failures
    size_t nfailures
    size_t fcap
    int oom  # a report could not be recorded: the producer must stop (never seen)


cdef void _on_report(void *rk, const kp_rd_kafka_message_t *m, void *opaque) noexcept nogil:
    """librdkafka's delivery report, on the thread that polls, GIL released."""
    cdef _State *s = <_State *>opaque
    cdef uint64_t seq = <uint64_t><uintptr_t>m._private
    cdef size_t lo = s.head, hi = s.count, mid
    cdef _Batch *b
    cdef _Failure *grown
    # The batch whose range holds seq: batches are in increasing order of `first`.
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if s.batches[mid].first <= seq:
            lo = mid
        else:
            hi = mid
    if lo >= s.count or seq < s.batches[lo].first or seq >= s.batches[lo].first + s.batches[lo].n:
        s.oom = 1  # a report for no batch this producer knows: cannot happen
        return
    b = &s.batches[lo]
    b.pending -= 1
    if m.err == 0:
        return
    if s.nfailures == s.fcap:
        grown = <_Failure *>realloc(s.failures, (s.fcap * 2 + 16) * sizeof(_Failure))
        if grown == NULL:
            s.oom = 1
            return
        s.failures = grown
        s.fcap = s.fcap * 2 + 16
    s.failures[s.nfailures].batch = b.id
    s.failures[s.nfailures].index = <uint32_t>(seq - b.first)
    s.failures[s.nfailures].err = m.err
    s.nfailures += 1


cdef void *_sym(void *handle, const char *name) except NULL:
    cdef void *f = dlsym(handle, name)
    if f == NULL:
        raise OSError(f"librdkafka has no {name.decode()}")
    return f


cdef object _Outcome = None


cdef inline bint _is_bytes(object o):
    return o is None or type(o) is bytes


@cython.no_gc_clear  # __dealloc__ needs `topics` to release librdkafka's topic handles
cdef class BatchProducer:
    """An idempotent producer that takes a batch of outcomes at a time (see the module doc).

    ``send`` hands a batch to librdkafka and returns the batch's id and the records it
    refused at once; ``poll`` and ``flush`` serve delivery reports in C; ``resolved``
    says which batches have every report (oldest first) and which records failed.
    Only the thread that sends also polls and flushes (the Kafka loop): the batch list
    is touched by that thread alone, reports included.
    """

    cdef _Lib lib
    cdef void *rk
    cdef _State state
    cdef uint64_t next_seq
    cdef uint64_t next_batch
    cdef dict topics  # name -> rd_kafka_topic_t*, as an int
    cdef object last_topic
    cdef void *last_rkt
    # One chunk's arguments: 5 per plain record in `plain`; a record with headers has
    # its own array. vptr/vcnt: each record's arguments (count 0: refused while read).
    cdef kp_rd_kafka_vu_t plain[_CHUNK * 5]
    cdef kp_rd_kafka_vu_t *vptr[_CHUNK]
    cdef size_t vcnt[_CHUNK]
    cdef rd_err_t errs[_CHUNK]
    cdef list reasons

    def __cinit__(self):
        self.rk = NULL
        memset(&self.state, 0, sizeof(_State))
        self.topics = {}
        self.last_topic = None
        self.last_rkt = NULL
        self.reasons = [None] * _CHUNK
        memset(self.vcnt, 0, sizeof(self.vcnt))

    def __init__(self, str library, dict config):
        """Open librdkafka at ``library`` and a producer with ``config`` (strings only)."""
        cdef bytes path = library.encode()
        cdef void *h = dlopen(path, RTLD_NOW)
        cdef char errstr[ERRSTR]
        cdef void *conf
        if h == NULL:
            raise OSError(f"cannot open {library}: {(<bytes>dlerror()).decode()}")
        self.lib.conf_new = <conf_new_t>_sym(h, b"rd_kafka_conf_new")
        self.lib.conf_set = <conf_set_t>_sym(h, b"rd_kafka_conf_set")
        self.lib.conf_set_dr_msg_cb = <conf_set_dr_t>_sym(h, b"rd_kafka_conf_set_dr_msg_cb")
        self.lib.conf_set_opaque = <conf_set_opaque_t>_sym(h, b"rd_kafka_conf_set_opaque")
        self.lib.conf_destroy = <conf_destroy_t>_sym(h, b"rd_kafka_conf_destroy")
        self.lib.new = <new_t>_sym(h, b"rd_kafka_new")
        self.lib.topic_new = <topic_new_t>_sym(h, b"rd_kafka_topic_new")
        self.lib.topic_destroy = <topic_destroy_t>_sym(h, b"rd_kafka_topic_destroy")
        self.lib.produceva = <produceva_t>_sym(h, b"rd_kafka_produceva")
        self.lib.error_code = <error_code_t>_sym(h, b"rd_kafka_error_code")
        self.lib.error_destroy = <error_destroy_t>_sym(h, b"rd_kafka_error_destroy")
        self.lib.poll = <poll_t>_sym(h, b"rd_kafka_poll")
        self.lib.flush = <flush_t>_sym(h, b"rd_kafka_flush")
        self.lib.outq_len = <outq_len_t>_sym(h, b"rd_kafka_outq_len")
        self.lib.destroy = <destroy_t>_sym(h, b"rd_kafka_destroy")
        self.lib.err2str = <err2str_t>_sym(h, b"rd_kafka_err2str")
        self.lib.fatal_error = <fatal_error_t>_sym(h, b"rd_kafka_fatal_error")
        self.lib.test_fatal_error = <test_fatal_t>dlsym(h, b"rd_kafka_test_fatal_error")
        conf = self.lib.conf_new()
        for name, value in config.items():
            if self.lib.conf_set(conf, name.encode(), str(value).encode(), errstr, ERRSTR) != CONF_OK:
                self.lib.conf_destroy(conf)
                raise ValueError(f"producer setting {name}: {errstr.decode(errors='replace')}")
        self.lib.conf_set_dr_msg_cb(conf, _on_report)
        self.lib.conf_set_opaque(conf, &self.state)
        self.rk = self.lib.new(PRODUCER, conf, errstr, ERRSTR)
        if self.rk == NULL:
            self.lib.conf_destroy(conf)  # rd_kafka_new owns conf only when it succeeds
            raise ValueError(f"producer: {errstr.decode(errors='replace')}")
        self.next_seq = 1
        self.next_batch = 0

    def __dealloc__(self):
        self._destroy()
        free(self.state.batches)
        free(self.state.failures)

    cdef int _open(self) except -1:
        if self.rk == NULL:
            raise RuntimeError("Producer has been closed")
        return 0

    cdef void _destroy(self):
        if self.rk != NULL:
            for rkt in self.topics.values():
                self.lib.topic_destroy(<void *><uintptr_t>rkt)
            self.topics.clear()
            self.last_topic, self.last_rkt = None, NULL
            with nogil:
                self.lib.destroy(self.rk)
            self.rk = NULL

    def close(self):
        """Destroy the librdkafka handle now: its threads and connections go at once.

        Records still unreported are given up (flush first to deliver them). Without
        this the handle lives until the object is collected, which for a replica held in
        reference cycles can be after its broker has gone (it then logs a failed connect
        every few ms). Every method but ``__len__`` and ``resolved`` raises after it.
        """
        self._destroy()

    cdef void *_topic(self, object name):
        cdef object found = self.topics.get(name)
        cdef void *rkt
        if found is not None:
            return <void *><uintptr_t>found
        rkt = self.lib.topic_new(self.rk, PyUnicode_AsUTF8AndSize(name, NULL), NULL)
        if rkt == NULL:
            return NULL  # a name librdkafka cannot take: the caller refuses the record
        self.topics[name] = <uintptr_t>rkt
        return rkt

    cdef int _track(self, uint64_t first, uint32_t n) except -1:
        cdef _State *s = &self.state
        cdef _Batch *grown
        if s.head > 0 and s.head == s.count:
            s.head = s.count = 0
        if s.count == s.cap:
            if s.head > s.cap // 2:  # move the live ones to the front instead of growing
                for i in range(s.count - s.head):
                    s.batches[i] = s.batches[s.head + i]
                s.count -= s.head
                s.head = 0
            else:
                grown = <_Batch *>realloc(s.batches, (s.cap * 2 + 16) * sizeof(_Batch))
                if grown == NULL:
                    raise MemoryError()
                s.batches = grown
                s.cap = s.cap * 2 + 16
        s.batches[s.count].first = first
        s.batches[s.count].id = self.next_batch
        s.batches[s.count].n = n
        s.batches[s.count].pending = n
        s.count += 1
        return 0

    def send(self, list outcomes):
        """Produce every outcome, in order; returns (batch id, [(index, code, reason)]).

        Records refused at once (too large for ``message.max.bytes``, a topic name
        librdkafka cannot take, a value that is not bytes) are listed with the protocol's
        or librdkafka's code and get no report; a full queue is waited out, serving
        reports meanwhile, as confluent-kafka's callers do with ``BufferError``. An
        outcome is an `Outcome` or any object with ``topic``, ``value``, ``headers`` and
        ``envelope.key``. Records are read with the GIL held, a chunk at a time, and
        handed to librdkafka with it released: releasing it per record would hand it to
        a waiting model thread each time, the very cost this class exists to avoid.
        """
        cdef Py_ssize_t i, j, k, n = PyList_GET_SIZE(outcomes)
        cdef uint64_t first = self.next_seq
        cdef list refused = []
        cdef list keep
        self._open()
        if n >= 0xFFFFFFFF:
            raise ValueError("batch too large")
        self._track(first, <uint32_t>n)
        self.next_seq = first + <uint64_t>n
        self.next_batch += 1
        i = 0
        while i < n:
            j = min(n, i + _CHUNK)
            keep = []  # header names and values encoded for this chunk, alive until sent
            try:
                self._fill(outcomes, i, j, first, keep)
            except BaseException:
                # Nothing from i on was sent: no report will come for it.
                self.state.batches[self.state.count - 1].pending -= <uint32_t>(n - i)
                raise
            try:
                self._send_chunk(j - i)
            finally:
                for k in range(j - i):
                    if self.vcnt[k] > 5:
                        free(self.vptr[k])
                    self.vcnt[k] = 0
            for k in range(j - i):
                if self.errs[k] != 0:
                    refused.append((i + k, self.errs[k], self.reasons[k]))
                    self.state.batches[self.state.count - 1].pending -= 1
            i = j
        return self.next_batch - 1, refused

    cdef int _fill(self, list outcomes, Py_ssize_t i0, Py_ssize_t i1, uint64_t first,
                   list keep) except -1:
        """Read records i0..i1 into the chunk's argument lists (GIL held)."""
        cdef Py_ssize_t i, k, h, nh
        cdef object out, env, topic, value, key, headers, bname, bval
        cdef object last_topic = self.last_topic
        cdef void *rkt = self.last_rkt
        cdef kp_rd_kafka_vu_t *vus
        for k in range(i1 - i0):
            self.errs[k] = 0
            self.reasons[k] = None
            self.vcnt[k] = 0
        for i in range(i0, i1):
            k = i - i0
            out = <object>PyList_GET_ITEM(outcomes, i)
            topic, value = _OUT.read(out, O_TOPIC), _OUT.read(out, O_VALUE)
            headers, env = _OUT.read(out, O_HEADERS), _OUT.read(out, O_ENV)
            key = _ENV.read(env, E_KEY)
            if topic is not last_topic:
                rkt = self._topic(topic) if type(topic) is str else NULL
                last_topic = topic
            if rkt == NULL or not _is_bytes(value) or not _is_bytes(key):
                self.errs[k] = ERR_INVALID_TOPIC if rkt == NULL else ERR_INVALID_ARG
                self.reasons[k] = (
                    f"invalid topic name {topic!r}" if rkt == NULL
                    else f"a record's value and key must be bytes, not {type(value).__name__}"
                    f" and {type(key).__name__}"
                )
                continue
            nh = 0 if headers is None else len(headers)
            if nh == 0:
                vus = &self.plain[k * 5]
            else:
                vus = <kp_rd_kafka_vu_t *>malloc((5 + nh) * sizeof(kp_rd_kafka_vu_t))
                if vus == NULL:
                    raise MemoryError()
            self.vptr[k] = vus
            self.vcnt[k] = 5 + nh
            vus[0].vtype = VT_RKT
            vus[0].u.rkt = rkt
            vus[1].vtype = VT_VALUE
            vus[1].u.mem.ptr = PyBytes_AS_STRING(value) if value is not None else NULL
            vus[1].u.mem.size = PyBytes_GET_SIZE(value) if value is not None else 0
            vus[2].vtype = VT_KEY
            vus[2].u.mem.ptr = PyBytes_AS_STRING(key) if key is not None else NULL
            vus[2].u.mem.size = PyBytes_GET_SIZE(key) if key is not None else 0
            vus[3].vtype = VT_OPAQUE
            vus[3].u.ptr = <void *><uintptr_t>(first + <uint64_t>i)
            vus[4].vtype = VT_MSGFLAGS
            vus[4].u.i = MSG_F_COPY
            for h in range(nh):
                hname, hval = headers[h]
                bname = hname.encode() if type(hname) is str else bytes(hname)
                bval = hval.encode() if type(hval) is str else hval
                if bval is not None and type(bval) is not bytes:
                    bval = bytes(bval)
                keep.append(bname)
                keep.append(bval)
                vus[5 + h].vtype = VT_HEADER
                vus[5 + h].u.header.name = PyBytes_AS_STRING(bname)
                vus[5 + h].u.header.val = PyBytes_AS_STRING(bval) if bval is not None else NULL
                vus[5 + h].u.header.size = PyBytes_GET_SIZE(bval) if bval is not None else -1
        self.last_topic = last_topic
        self.last_rkt = rkt
        return 0

    cdef void _send_chunk(self, Py_ssize_t m) noexcept:
        """Hand a filled chunk to librdkafka, GIL released; refusals land in errs."""
        cdef Py_ssize_t k
        cdef void *error
        cdef rd_err_t code
        with nogil:
            for k in range(m):
                if self.vcnt[k] == 0:
                    continue
                while True:
                    error = self.lib.produceva(self.rk, self.vptr[k], self.vcnt[k])
                    if error == NULL:
                        break
                    code = self.lib.error_code(error)
                    self.lib.error_destroy(error)
                    if code != ERR_QUEUE_FULL:
                        self.errs[k] = code
                        break
                    self.lib.poll(self.rk, 50)  # the queue is full: let it drain
        for k in range(m):
            if self.errs[k] != 0 and self.reasons[k] is None:
                self.reasons[k] = self.lib.err2str(self.errs[k]).decode(errors="replace")

    def poll(self, double timeout=0.0):
        """Serve delivery reports (in C), waiting up to ``timeout`` seconds for one."""
        cdef int ms = <int>(timeout * 1000) if timeout >= 0 else -1
        cdef int served
        self._open()
        with nogil:
            served = self.lib.poll(self.rk, ms)
        return served

    def flush(self, double timeout=-1.0):
        """Send everything now and wait for its reports; the records still unreported."""
        cdef int ms = <int>(timeout * 1000) if timeout >= 0 else -1
        self._open()
        with nogil:
            self.lib.flush(self.rk, ms)
        return self.lib.outq_len(self.rk)

    def __len__(self):
        return self.lib.outq_len(self.rk) if self.rk != NULL else 0

    def resolved(self):
        """(batches with every report, oldest first: their count; failures since last asked).

        A failure is (batch id, index in the batch, librdkafka's code, its reason). Batch
        ids count up from 0 in the order `send` returned them.
        """
        cdef _State *s = &self.state
        cdef size_t done = 0
        cdef list failures = []
        if s.oom:
            raise MemoryError("a delivery report could not be recorded")
        while s.head < s.count and s.batches[s.head].pending == 0:
            s.head += 1
            done += 1
        for j in range(s.nfailures):
            f = s.failures[j]
            failures.append((f.batch, f.index, f.err, self.lib.err2str(f.err).decode(errors="replace")))
        s.nfailures = 0
        return done, failures

    def fatal_error(self):
        """librdkafka's fatal error (the idempotent producer cannot go on), or None."""
        cdef char errstr[ERRSTR]
        cdef rd_err_t code
        self._open()
        code = self.lib.fatal_error(self.rk, errstr, ERRSTR)
        return None if code == 0 else (code, errstr.decode(errors="replace"))

    def raise_fatal_error(self, int code, str reason):
        """Make librdkafka fail this producer as for good (tests the stopping path)."""
        if self.lib.test_fatal_error == NULL:
            raise NotImplementedError("librdkafka does not export rd_kafka_test_fatal_error")
        self._open()
        if self.lib.test_fatal_error(self.rk, code, reason.encode()) != 0:
            raise ValueError("librdkafka refused to raise a fatal error")

