"""The pipeline end to end on a real broker: counts, values, keys, offsets, dead letters."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
from e2e.kit import (
    Topics,
    committed_offsets,
    end_offsets,
    produce_tiny,
    read_all,
    start_background,
    tiny_vectors,
    write_tiny_topology,
)

from pipeline.config.topology import KafkaSettings
from pipeline.engine.collector import YOUNG_THRESHOLD
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.tools.traffic import produce_requests, tensor_request
from pipeline.tools.zoo import tiny_mlp_reference
from schemas.codec import AvroCodec

N = 1000


def test_every_request_gets_one_correct_result(
    broker: EmbeddedBroker, topics: Topics, tiny_topology: Path
) -> None:
    vectors = tiny_vectors(N)
    ids = produce_tiny(broker, topics.input, vectors)
    before = gc.get_threshold()
    served = start_background(tiny_topology, broker)
    serving = (gc.get_threshold()[0], gc.get_freeze_count() > 0)
    msgs = read_all(broker, topics.output, count=N)
    stats = served.stop()
    # Served under the collector's serving policy (pipeline.engine.collector), and the
    # process's own settings back after.
    assert serving == (YOUNG_THRESHOLD, True)
    assert gc.get_threshold() == before

    codec = AvroCodec()
    results = {m.key(): codec.decode_result(m.value()) for m in msgs}
    assert len(msgs) == N
    assert sorted(r.id for r in results.values()) == sorted(ids)
    assert all(key == r.id.encode() for key, r in results.items())  # the request's key kept

    expected = np.argsort(-tiny_mlp_reference(vectors), axis=1)[:, :3]
    for r in results.values():
        i = int(r.id.split("-")[1])
        assert r.status.value == "OK"
        assert r.outputs["classes"].tolist() == expected[i].tolist()
        assert 1 <= r.batch_size <= 64
    assert {r.partition for r in results.values()} == {0, 1, 2, 3}

    assert stats.consumed == N
    assert stats.results == N
    assert stats.dead_letters == 0
    assert committed_offsets(broker, topics.group, topics.input) == end_offsets(
        broker, topics.input
    )


def test_poison_goes_to_dead_letters_and_the_rest_flows(
    broker: EmbeddedBroker, topics: Topics, tiny_topology: Path
) -> None:
    codec = AvroCodec()
    good = tiny_vectors(200, seed=3)
    records: list[tuple[bytes | None, bytes]] = []
    poison = {
        "garbage": b"\x00\xff not avro at all",
        "unknown-model": codec.encode_request(
            tensor_request("unknown-model", "no-such-model", {"x": good[0]})
        ),
        "wrong-shape": codec.encode_request(
            tensor_request("wrong-shape", "tiny-mlp", {"x": good[0][:63]})
        ),
        "wrong-dtype": codec.encode_request(
            tensor_request("wrong-dtype", "tiny-mlp", {"x": good[0].astype(np.float64)})
        ),
    }
    for i, v in enumerate(good):
        records.append(
            (
                f"g-{i}".encode(),
                codec.encode_request(tensor_request(f"g-{i}", "tiny-mlp", {"x": v})),
            )
        )
        if i % 50 == 25:  # poison in the middle of batches, every partition keeps flowing
            name = list(poison)[i // 50]
            records.append((name.encode(), poison[name]))
    produce_requests(KafkaSettings(), broker.bootstrap_servers, topics.input, records)

    served = start_background(tiny_topology, broker)
    results = [codec.decode_result(m.value()) for m in read_all(broker, topics.output, 200)]
    letters = [codec.decode_dead_letter(m.value()) for m in read_all(broker, topics.dead_letter, 4)]
    served.stop()

    assert sorted(r.id for r in results) == sorted(f"g-{i}" for i in range(200))
    by_payload = {bytes(d.payload): d for d in letters}
    assert set(by_payload) == set(poison.values())  # the original bytes, byte for byte
    reasons = {name: by_payload[raw].reason for name, raw in poison.items()}
    assert reasons == {
        "garbage": "undecodable",
        "unknown-model": "unknown_model",
        "wrong-shape": "bad_tensor",
        "wrong-dtype": "bad_tensor",
    }
    assert "no-such-model" in by_payload[poison["unknown-model"]].error
    assert committed_offsets(broker, topics.group, topics.input) == end_offsets(
        broker, topics.input
    )


def test_stopping_commits_what_was_delivered(
    broker: EmbeddedBroker, topics: Topics, tmp_path: Path
) -> None:
    # With periodic commits an hour apart, only the drain on stop can commit.
    topology = write_tiny_topology(tmp_path / "t.yaml", topics, commit_interval_ms=3_600_000)
    produce_tiny(broker, topics.input, tiny_vectors(300))
    served = start_background(topology, broker)
    read_all(broker, topics.output, count=300)
    assert committed_offsets(broker, topics.group, topics.input) == {p: -1001 for p in range(4)}
    served.stop()
    assert committed_offsets(broker, topics.group, topics.input) == end_offsets(
        broker, topics.input
    )
