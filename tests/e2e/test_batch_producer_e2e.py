"""The batch producer through the embedded broker: what a batch sends is what a reader
gets (values, keys, headers, order within each partition), and every batch resolves
with no failure. The pipeline's own e2e tests (crash, rebalance, ordering, dead letters)
run at-least-once on it too, since the replica builds one."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import pytest
from e2e.kit import Topics, read_all

from pipeline.config.topology import KafkaSettings
from pipeline.kafka import batch_producer
from pipeline.kafka.batch_producer import open_batch_producer
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.kafka.clients import producer_config
from pipeline.serving.outcomes import Outcome
from schemas.messages import Envelope

pytestmark = pytest.mark.skipif(not batch_producer.COMPILED, reason="batch producer not compiled")


def _outcome(i: int, topic: str) -> Outcome:
    env = Envelope("in", 0, i, f"key-{i % 7}".encode(), b"", 0, time.monotonic())
    headers: Any = [("n", str(i)), ("raw", b"\x00\x01"), ("none", None)] if i % 3 == 0 else None
    return Outcome(env, topic, f"value-{i}".encode(), headers)


def test_a_batch_arrives_as_sent(broker: EmbeddedBroker, topics: Topics) -> None:
    p = open_batch_producer(producer_config(KafkaSettings(), broker.bootstrap_servers))
    assert p is not None
    sent = [_outcome(i, topics.output) for i in range(1010)]
    batches = [p.send(sent[:400]), p.send(sent[400:1000]), p.send(sent[1000:])]
    assert [b for b, _ in batches] == [0, 1, 2]
    assert all(r == [] for _, r in batches)
    assert p.flush(30) == 0
    assert p.resolved() == (3, [])

    got = read_all(broker, topics.output, 1010)
    index = {o.value: i for i, o in enumerate(sent)}
    assert sorted(index[m.value()] for m in got) == list(range(1010))
    by_partition: defaultdict[int, list[Any]] = defaultdict(list)
    for m in got:
        by_partition[m.partition()].append(m)
    assert len(by_partition) > 1  # keyed records spread over the partitions
    for msgs in by_partition.values():  # each partition holds its records in send order
        in_order = [index[m.value()] for m in sorted(msgs, key=lambda m: m.offset())]
        assert in_order == sorted(in_order)
    for m in got:
        i = index[m.value()]
        assert m.key() == f"key-{i % 7}".encode()
        if i % 3 == 0:
            assert m.headers() == [("n", str(i).encode()), ("raw", b"\x00\x01"), ("none", None)]
        else:
            assert not m.headers()
