"""The contenders of the side-by-side benchmark, each a function returning (requests, seconds).

Every Kafka variant reads the same input topic with its own consumer group and writes its
own output topic, on the same broker, and is timed from its first consumed record to its
last acknowledged output: the group join (slow on Tansu) is not counted.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from confluent_kafka import Consumer, Producer

from pipeline.app import OpenTopology
from pipeline.config import Topology
from pipeline.demo import BackgroundPipeline
from pipeline.graph import ModelGraph, build_model
from pipeline.messages import Envelope
from pipeline.model_runtime import _run_stages
from pipeline.outcomes import OutcomeEncoder
from schemas.codec import AvroCodec
from stages.base import Batch

__all__ = ["kp_pipeline", "model_alone", "naive", "passthrough", "preprocess_and_model"]

Timing = tuple[int, float]
_CLIENT = {"session.timeout.ms": 6000}


def _consumer(bootstrap: str, group: str, topic: str) -> Consumer:
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            **_CLIENT,
        }
    )
    c.subscribe([topic])
    return c


def kp_pipeline(opened: OpenTopology, bootstrap: str, n: int) -> Timing:
    """The pipeline as users run it, on a thread of this process."""
    served = BackgroundPipeline(opened, bootstrap).start()
    assert served.pipeline is not None
    stats = served.pipeline.stats
    while stats.results + stats.dead_letters < n:
        time.sleep(0.01)
    served.stop()
    assert stats.first_consumed is not None
    assert stats.last_delivered is not None
    return n, stats.last_delivered - stats.first_consumed


def naive(
    topology: Topology, graph: ModelGraph, bootstrap: str, topic: str, out: str, group: str, n: int
) -> Timing:
    """One message, one inference, one produce (flushed), one synchronous commit."""
    codec = AvroCodec()
    encoder = OutcomeEncoder(codec, out, out + ".dlq")
    backend = graph.instances[0]
    consumer = _consumer(bootstrap, group, topic)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    done, start = 0, 0.0
    while done < n:
        msg = consumer.poll(0.5)
        if msg is None or msg.error() is not None:
            continue
        if done == 0:
            start = time.monotonic()
        request = codec.decode_request(msg.value())
        env = Envelope(
            msg.topic(),
            msg.partition(),
            msg.offset(),
            msg.key(),
            msg.value(),
            msg.timestamp()[1],
            time.monotonic(),
            0,
            request,
        )
        batch = Batch([env], {k: np.stack([request.inputs[k]]) for k in graph.inputs})
        batch = _run_stages(graph.preprocess, batch)
        outputs = backend.infer({k: np.asarray(batch.columns[k]) for k in graph.info.inputs})
        post = _run_stages(graph.postprocess, Batch(batch.rows, dict(outputs)))
        [outcome] = encoder.results(
            post.rows, graph.name, "1", post.columns, env.consumed_at, (0.0, 0.0, 0.0), 1
        )
        producer.produce(outcome.topic, outcome.value, msg.key())
        producer.flush()
        consumer.commit(message=msg, asynchronous=False)
        done += 1
    elapsed = time.monotonic() - start
    consumer.close()
    return done, elapsed


def passthrough(bootstrap: str, topic: str, out: str, group: str, n: int) -> Timing:
    """Kafka's ceiling here: consume batches, produce each value unchanged, commit async."""
    consumer = _consumer(bootstrap, group, topic)
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 5,
            "batch.num.messages": 10000,
            "queue.buffering.max.messages": 1_000_000,
        }
    )
    done, start = 0, 0.0
    while done < n:
        msgs = consumer.consume(500, 0.5)
        if not msgs:
            continue
        if done == 0:
            start = time.monotonic()
        for m in msgs:
            if m.error() is None:
                producer.produce(out, m.value(), m.key())
                done += 1
        producer.poll(0)
        consumer.commit(asynchronous=True)
    producer.flush()
    elapsed = time.monotonic() - start
    consumer.close()
    return done, elapsed


def model_alone(graph: ModelGraph, feeds: dict[str, Any], n: int) -> Timing:
    """backend.infer on preloaded, preprocessed tensors at the topology's batch size."""
    backend = graph.instances[0]
    size = next(iter(feeds.values())).shape[0]
    backend.infer(feeds)  # warm-up
    start = time.monotonic()
    done = 0
    while done < n:
        backend.infer(feeds)
        done += size
    return done, time.monotonic() - start


def preprocess_and_model(graph: ModelGraph, requests: list[Any], batch_size: int, n: int) -> Timing:
    """Decode, preprocess, infer and postprocess back to back in one thread, no Kafka."""
    backend = graph.instances[0]
    done, start = 0, time.monotonic()
    while done < n:
        chunk = requests[:batch_size]
        batch = Batch(
            list(range(len(chunk))),
            {k: np.stack([r.inputs[k] for r in chunk]) for k in graph.inputs},
        )
        batch = _run_stages(graph.preprocess, batch)
        outputs = backend.infer({k: np.asarray(batch.columns[k]) for k in graph.info.inputs})
        _run_stages(graph.postprocess, Batch(batch.rows, dict(outputs)))
        done += len(chunk)
    return done, time.monotonic() - start


def load_graph(opened: OpenTopology) -> ModelGraph:
    """The topology's first model as one instance with the runtime's default threading.

    The reference variants (naive, model alone, back to back) run one stream of work, for
    which ONNX Runtime's own default (all cores) is its best setting; the topology's
    instance and thread settings are tuned for the pipeline's overlap instead.
    """
    m = opened.topology.models[0]
    single = m.model_copy(update={"instances": 1, "options": {}})
    return build_model(single, opened.source, opened.base_dir)
