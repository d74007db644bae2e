"""``ordering: key``: every key's results in offset order, though batches finish out of order.

Two instances of a model whose first instance is slow (`load.timed_backends`): batches that went
to the fast one finish before an earlier batch on the slow one. 400 requests over 4
partitions and 10 keys, batches of 8 that mix keys. With ``ordering: key`` each key's
results reach the output (keyed like their requests, so one key's results share an
output partition, whose order is their publishing order) in the offset order of their
requests; with ``ordering: none``, run alike as the control, some key's do not, which
shows the setup does reorder what the sequencer puts back.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from e2e.kit import Topics, read_all, start_background

from pipeline.config.topology import KafkaSettings
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.tools.traffic import produce_requests, tensor_request
from schemas.codec import AvroCodec
from schemas.messages import Request

N = 400
KEYS = 10

TOPOLOGY = """
kafka: {{bootstrap_servers: embedded, group_id: {group}}}
topics: {{input: [{input}], output: {output}, dead_letter: {dlq}, create: false}}
flow: {{max_in_flight: 4096, commit_interval_ms: 100}}
models:
  - name: pair
    backend: load.timed_backends:UnevenBackend
    artifact: {artifact}
    instances: 2
    ordering: {ordering}
    options: {{delay_ms: 40}}
    inputs: [{{name: x, datatype: FP32, shape: [4]}}]
    batching: {{max_batch_size: 8, max_delay_ms: 2}}
"""


def _serve(
    broker: EmbeddedBroker, topics: Topics, tmp_path: Path, ordering: str
) -> dict[tuple[int, bytes], list[int]]:
    """Source offsets of each (source partition, key), in the order their results came."""
    artifact = tmp_path / f"uneven-{ordering}.txt"
    artifact.write_text("echo\n")
    path = tmp_path / f"{ordering}.yaml"
    path.write_text(
        topics.fill(
            TOPOLOGY,
            artifact=artifact,
            ordering=ordering,
        )
    )
    codec = AvroCodec()
    x = np.ones(4, np.float32)

    def request(rid: str) -> Request:
        return tensor_request(rid, "pair", {"x": x})

    produce_requests(
        KafkaSettings(),
        broker.bootstrap_servers,
        topics.input,
        (
            (
                b"key-%d" % (i % KEYS),
                codec.encode_request(tensor_request(f"o{i}", "pair", {"x": x})),
            )
            for i in range(N)
        ),
    )
    served = start_background(path, broker)
    try:
        results = read_all(broker, topics.output, N)
    finally:
        served.stop()
    order: dict[tuple[int, bytes], list[int]] = defaultdict(list)
    for msg in results:
        result = codec.decode_result(msg.value())
        order[(result.partition, msg.key())].append(result.offset)
    assert sum(len(v) for v in order.values()) == N
    return order


def test_ordering_key_publishes_each_keys_results_in_offset_order(
    broker: EmbeddedBroker, topics: Topics, tmp_path: Path
) -> None:
    order = _serve(broker, topics, tmp_path, "key")
    assert all(offsets == sorted(offsets) for offsets in order.values()), order


def test_without_ordering_the_slow_instance_reorders_some_key(
    broker: EmbeddedBroker, topics: Topics, tmp_path: Path
) -> None:
    order = _serve(broker, topics, tmp_path, "none")
    assert any(offsets != sorted(offsets) for offsets in order.values())
