"""The Faust adapter end to end: a real Faust worker on the session's Tansu broker."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from e2e.kit import (
    Topics,
    committed_offsets,
    end_offsets,
    produce_tiny,
    read_all,
    tiny_vectors,
    wait_for,
)

from load.faust_app import FaustWorkerThread, make_app
from pipeline.config.topology import KafkaSettings
from pipeline.integrations.faust import DeliveryError, KpFaustModel, attach
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.serving.outcomes import Outcome
from pipeline.tools.traffic import produce_requests, tensor_request
from pipeline.tools.zoo import tiny_mlp_reference
from schemas.codec import AvroCodec

N = 1000


def start(
    model: KpFaustModel, broker: EmbeddedBroker, topics: Topics, tmp: Path
) -> FaustWorkerThread:
    # A short commit interval, so the test sees commits without waiting for Faust's 2.8 s.
    app = make_app(topics.group, broker.bootstrap_servers, tmp, commit_interval_s=0.2)
    attach(app, model)
    return FaustWorkerThread(app).start()


def test_every_request_gets_one_correct_result_and_poison_a_dead_letter(
    broker: EmbeddedBroker, topics: Topics, tiny_topology: Path, tmp_path: Path
) -> None:
    codec = AvroCodec()
    vectors = tiny_vectors(N)
    ids = produce_tiny(broker, topics.input, vectors)
    poison = {
        b"garbage": b"\x00\xff not avro at all",
        b"wrong-shape": codec.encode_request(
            tensor_request("wrong-shape", "tiny-mlp", {"x": vectors[0][:63]})
        ),
    }
    produce_requests(KafkaSettings(), broker.bootstrap_servers, topics.input, list(poison.items()))

    with KpFaustModel.from_topology(tiny_topology) as model:
        worker = start(model, broker, topics, tmp_path)
        try:
            msgs = read_all(broker, topics.output, count=N)
            letters = read_all(broker, topics.dead_letter, count=2)
        finally:
            worker.stop()
        assert worker.error is None
        assert (model.stats.results, model.stats.dead_letters) == (N, 2)

    results = {m.key(): codec.decode_result(m.value()) for m in msgs}
    assert len(msgs) == N
    assert sorted(r.id for r in results.values()) == sorted(ids)
    assert all(key == r.id.encode() for key, r in results.items())  # the request's key kept
    expected = np.argsort(-tiny_mlp_reference(vectors), axis=1)[:, :3]
    for r in results.values():
        assert r.status.value == "OK"
        assert r.outputs["classes"].tolist() == expected[int(r.id.split("-")[1])].tolist()
        assert 1 <= r.batch_size <= 64
    assert {r.partition for r in results.values()} == {0, 1, 2, 3}

    by_key = {m.key(): codec.decode_dead_letter(m.value()) for m in letters}
    assert {k: d.reason for k, d in by_key.items()} == {
        b"garbage": "undecodable",
        b"wrong-shape": "bad_tensor",
    }
    assert {k: bytes(d.payload) for k, d in by_key.items()} == poison
    assert dict(letters[0].headers() or [])["kp.reason"] == by_key[letters[0].key()].reason.encode()
    # Everything was acked after its outcome was delivered, and Faust committed it all.
    assert committed_offsets(broker, topics.group, topics.input) == end_offsets(
        broker, topics.input
    )


def test_a_failed_delivery_stops_the_worker_and_a_restart_serves_the_batch(
    broker: EmbeddedBroker, topics: Topics, tiny_topology: Path, tmp_path: Path
) -> None:
    ids = produce_tiny(broker, topics.input, tiny_vectors(300))
    failed: list[tuple[int, int]] = []

    with KpFaustModel.from_topology(tiny_topology) as model:
        real = model.publish

        async def fail_once(app: object, outcomes: Sequence[Outcome]) -> None:
            if not failed:
                failed.extend((o.envelope.partition, o.envelope.offset) for o in outcomes)
                raise DeliveryError("broker refused (pretend)")
            await real(app, outcomes)  # type: ignore[arg-type]

        model.publish = fail_once  # type: ignore[method-assign]
        worker = start(model, broker, topics, tmp_path / "first")
        try:
            wait_for(lambda: worker.crashed, 30, "the app to crash")
        finally:
            worker.stop()
        assert isinstance(worker.error, DeliveryError)
        # Nothing of the failed batch was committed: Faust never saw it acked.
        committed = committed_offsets(broker, topics.group, topics.input)
        for partition, offset in failed:
            assert committed[partition] <= offset

        model.publish = real  # type: ignore[method-assign]
        worker = start(model, broker, topics, tmp_path / "second")
        try:
            msgs = read_all(broker, topics.output, count=300)
            wait_for(
                lambda: (
                    committed_offsets(broker, topics.group, topics.input)
                    == end_offsets(broker, topics.input)
                ),
                30,
                "every offset committed",
            )
        finally:
            worker.stop()

    served = Counter(AvroCodec().decode_result(m.value()).id for m in msgs)
    assert set(served) == set(ids)  # at least once: the failed batch was served again
