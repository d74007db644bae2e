"""The serving producer for at-least-once: delivery reports counted in C, per batch.

confluent-kafka serves every delivery report through its C trampoline, which takes the
GIL back for each one (to look for a Python callback) even when the producer runs with
``delivery.report.only.error`` and no callback exists; when the model's threads want the
GIL too, that hand-over is what costs. Measured on the tiny model (2 cores, one run,
600,000 requests): the Kafka loop spent 10-20% of its time in ``poll(0)`` (~1 ms a call,
~1,500 reports each) and another 15-18% in the ``flush`` of each commit point, which
serves reports the same way, about 1 µs a report in all.

`BatchProducer` (pipeline/kafka/_batch_producer.pyx) opens the very librdkafka that
confluent-kafka loaded and drives a producer of its own: its report callback is C, runs
with the GIL released, and counts each report against the batch its record was sent
in; only failures are kept, with their batch and index. So at-least-once delivery
(`pipeline.engine.delivery.AtLeastOnce`) learns which batches are delivered from
`BatchProducer.resolved` after each ``poll``, without a Python call per record and
without waiting in ``flush`` for the whole queue to drain.

Where it cannot serve, or ``KP_BATCH_PRODUCER=0`` is set (to compare, or to rule it out
when chasing a delivery problem), `open_batch_producer` returns None and the caller uses
confluent-kafka's `Producer` as before: the compiled module is missing (no compiler at
install time), librdkafka is not found among the process's mapped libraries (not Linux),
or a setting is a Python object (a callback) that only confluent-kafka can take.
Exactly-once keeps confluent-kafka's transactional producer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import confluent_kafka
from confluent_kafka import KafkaError, Message, Producer

from pipeline.serving.outcomes import Outcome
from schemas.messages import Envelope

try:
    from pipeline.kafka._batch_producer import BatchProducer, bind_layouts
except ImportError:  # built without a compiler: confluent-kafka's producer serves
    BatchProducer = None  # type: ignore[assignment,misc]
    bind_layouts = None  # type: ignore[assignment]

__all__ = [
    "COMPILED",
    "BatchProducer",
    "librdkafka_path",
    "native_config",
    "open_batch_producer",
    "serving_producer",
]

log = logging.getLogger(__name__)

COMPILED = BatchProducer is not None
if bind_layouts is not None:
    bind_layouts(Outcome, Envelope)

# Settings confluent-kafka takes itself rather than passing to librdkafka.
_PYTHON_ONLY = frozenset({"on_delivery", "delivery.report.only.error"})


def librdkafka_path() -> str | None:
    """The librdkafka file confluent-kafka loaded into this process (Linux), if found."""
    assert confluent_kafka.libversion()  # cimpl, and librdkafka with it, are loaded
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.rsplit(" ", 1)[-1]
        if "/" in path and Path(path).name.startswith("librdkafka"):
            return path
    return None


def native_config(conf: dict[str, Any]) -> dict[str, str] | None:
    """``conf`` as librdkafka strings; None if a setting is an object only Python can use."""
    out: dict[str, str] = {}
    for name, value in conf.items():
        if name in _PYTHON_ONLY:
            continue
        if isinstance(value, bool):
            out[name] = "true" if value else "false"
        elif isinstance(value, (str, int, float)):
            out[name] = str(value)
        else:
            return None
    return out


def open_batch_producer(conf: dict[str, Any]) -> BatchProducer | None:
    """A `BatchProducer` with these confluent-kafka-style settings, or None (see above)."""
    if BatchProducer is None or os.environ.get("KP_BATCH_PRODUCER") == "0":
        return None
    settings = native_config(conf)
    path = librdkafka_path()
    if settings is None or path is None:
        log.info("batch producer unavailable (%s); using confluent-kafka's", path or "settings")
        return None
    return BatchProducer(path, settings)


def serving_producer(
    conf: dict[str, Any],
    exactly_once: bool,
    on_report: Callable[[KafkaError | None, Message], None],
) -> Producer:
    """A replica's producer: a `BatchProducer` for at-least-once where one can serve.

    Otherwise confluent-kafka's, reporting failures only (what is delivered is known at
    commit points, `pipeline.engine.delivery`), and those to ``on_report`` as its one
    default callback rather than one handed over with every record. Exactly-once's is
    transactional, and reports nothing until asked to after an abort.
    """
    conf = {**conf, "delivery.report.only.error": True}
    if exactly_once:
        return Producer(conf)
    batches = open_batch_producer(conf)
    if batches is not None:
        return cast(Producer, batches)
    return Producer({**conf, "on_delivery": on_report})
