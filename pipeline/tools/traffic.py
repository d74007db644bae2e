"""Producing requests and reading results.

What the ``produce`` and ``results`` commands, the demo, the tests and the benchmarks use
to talk to a running pipeline. Both take the topology's `KafkaSettings` with the address,
and build their clients in `pipeline.kafka.clients` like the pipeline does, so a secured
cluster (SASL, TLS) is reached the same way; a plain ``KafkaSettings()`` suits a bare
local broker.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from pipeline.config.topology import KafkaSettings
from pipeline.kafka.clients import reader_config, sender_config
from schemas.errors import BrokerError
from schemas.messages import Request

__all__ = ["image_request", "produce_requests", "read_topic", "tensor_request", "text_request"]


def image_request(request_id: str, model: str, image: bytes, input_name: str = "image") -> Request:
    """A request carrying one encoded image as a BYTES[1] tensor."""
    arr = np.empty(1, dtype=object)
    arr[0] = image
    return Request(id=request_id, model=model, inputs={input_name: arr})


def text_request(request_id: str, model: str, text: str, input_name: str = "text") -> Request:
    """A request carrying one UTF-8 text as a BYTES[1] tensor."""
    return image_request(request_id, model, text.encode(), input_name)


def tensor_request(
    request_id: str, model: str, tensors: dict[str, np.ndarray[Any, Any]]
) -> Request:
    """A request carrying numeric tensors (one item each, no batch dimension)."""
    return Request(id=request_id, model=model, inputs=tensors)


def produce_requests(
    settings: KafkaSettings,
    bootstrap: str,
    topic: str,
    requests: Iterable[tuple[bytes | None, bytes]],
    timeout: float = 60.0,
) -> int:
    """Produce (key, value) pairs and wait until the broker has acknowledged all of them.

    The producer carries the topology's security and producer properties
    (`sender_config`).
    """
    producer = Producer(sender_config(settings, bootstrap))
    failures: list[str] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            failures.append(str(err))

    count = 0
    for key, value in requests:
        while True:
            try:
                producer.produce(topic, value, key, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
        count += 1
    left = producer.flush(timeout)
    if left or failures:
        raise BrokerError(f"{left} requests unacknowledged, {len(failures)} failed: {failures[:3]}")
    return count


def read_topic(
    settings: KafkaSettings,
    bootstrap: str,
    topic: str,
    count: int | None = None,
    timeout: float = 30.0,
    idle: float | None = None,
) -> Iterator[Any]:
    """Yield records of every partition of ``topic`` from the beginning, without a group.

    Stops after ``count`` records, after ``timeout`` seconds, or after ``idle`` seconds
    without a record. Reads through assign() (`reader_config`), so it commits nothing and
    joins no group; ``settings.consumer`` may set e.g. the isolation level.
    """
    consumer = Consumer(
        reader_config(settings, bootstrap, group_id="kp-reader", partition_eof=False)
    )
    try:
        meta = consumer.list_topics(topic, timeout=10)
        parts = meta.topics.get(topic)
        if parts is None or parts.error is not None:
            raise BrokerError(f"topic {topic!r} does not exist")
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts.partitions])
        seen = 0
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while time.monotonic() < deadline and (count is None or seen < count):
            if idle is not None and time.monotonic() - last > idle:
                break
            for msg in consumer.consume(500, 0.1):
                if msg.error() is not None:
                    continue
                last = time.monotonic()
                seen += 1
                yield msg
                if count is not None and seen >= count:
                    break
    finally:
        consumer.close()
