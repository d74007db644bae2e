"""consume_available against librdkafka and the embedded broker: a few records come back
without the call sitting out its timeout, which librdkafka's own batch consume does."""

from __future__ import annotations

import time

from confluent_kafka import Consumer, Producer, TopicPartition
from e2e.kit import Topics

from pipeline.kafka.broker import EmbeddedBroker
from pipeline.kafka.consume import consume_available

WAIT_S = 20.0  # far beyond any fetch: a call that waits it out is unmistakable


def test_a_few_records_come_back_before_the_timeout(broker: EmbeddedBroker, topics: Topics) -> None:
    producer = Producer({"bootstrap.servers": broker.bootstrap_servers})
    for i in range(5):
        producer.produce(topics.input, f"r{i}".encode(), partition=0)
    assert producer.flush(30) == 0
    consumer = Consumer(
        {"bootstrap.servers": broker.bootstrap_servers, "group.id": topics.group,
         "fetch.wait.max.ms": 10}
    )  # fmt: skip
    consumer.assign([TopicPartition(topics.input, 0, 0)])
    try:
        got: list[bytes] = []
        started = time.monotonic()
        while len(got) < 5 and time.monotonic() - started < WAIT_S:
            got += [m.value() for m in consume_available(consumer, 2000, WAIT_S) if not m.error()]
        took = time.monotonic() - started
        assert sorted(got) == [f"r{i}".encode() for i in range(5)]
        assert took < WAIT_S / 2, took  # consume(2000, WAIT_S) would take WAIT_S
        assert consume_available(consumer, 2000, 0.2) == []  # nothing more: the wait ends it
    finally:
        consumer.close()
