# Where an `Outcome`'s and its `Envelope`'s fields are read from C: one `_Layout` each
# (schemas/_slots.pxi), bound once at import by the module's Python side
# (`bind_layouts(Outcome, Envelope)`), so no pass looks a class or a field index up per
# batch. `_Layout.read` takes any other object's field by name, so stand-ins read alike.
# Included by pipeline/engine/_rows_fast.pyx and pipeline/kafka/_batch_producer.pyx.

cdef _Layout _OUT = None
cdef _Layout _ENV = None
cdef Py_ssize_t O_ENV, O_TOPIC, O_VALUE, O_HEADERS, O_MODEL, O_REASON, O_STATUS
cdef Py_ssize_t E_TOPIC, E_PARTITION, E_OFFSET, E_KEY, E_GENERATION


def bind_layouts(outcome_cls, envelope_cls):
    """Read outcomes and envelopes of these classes at their slots (any other: getattr)."""
    global _OUT, _ENV, O_ENV, O_TOPIC, O_VALUE, O_HEADERS, O_MODEL, O_REASON, O_STATUS
    global E_TOPIC, E_PARTITION, E_OFFSET, E_KEY, E_GENERATION
    out = _Layout(outcome_cls, len(dataclasses.fields(outcome_cls)))
    env = _Layout(envelope_cls, len(dataclasses.fields(envelope_cls)))
    O_ENV, O_TOPIC, O_VALUE = out.at("envelope"), out.at("topic"), out.at("value")
    O_HEADERS, O_MODEL = out.at("headers"), out.at("model")
    O_REASON, O_STATUS = out.at("reason"), out.at("status")
    E_TOPIC, E_PARTITION, E_OFFSET = env.at("topic"), env.at("partition"), env.at("offset")
    E_KEY, E_GENERATION = env.at("key"), env.at("generation")
    _OUT, _ENV = out, env
