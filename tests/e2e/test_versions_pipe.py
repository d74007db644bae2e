"""Two versions of one model side by side on the real broker: asked, default and canary.

``tiny-mlp`` in versions 1 and 2 (both the tiny ONNX model, each its own instances),
version 1 the default and version 2 a canary for 30% of keys. 300 keys send two requests
each naming no version, 40 requests name version 2 and 10 name a version not served.
Every result must come from the version its key's hash picks (the split is fixed, so the
expected version of each key is computed here), both requests of a key meet the same
version, the named ones meet what they named, the unknown version is a dead letter
naming what is served, and the version traffic gauge says what the topology says.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from e2e.kit import Topics, read_all, start_background, tiny_vectors, tiny_version

from pipeline.config.topology import KafkaSettings
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.serving.versions import split_point
from pipeline.tools.traffic import produce_requests, tensor_request
from schemas.codec import AvroCodec

KEYS = 300
SHARE = 0.3

TOPOLOGY = """
kafka: {{bootstrap_servers: embedded, group_id: {group}}}
topics: {{input: [{input}], output: {output}, dead_letter: {dlq}, create: false}}
versions:
  tiny-mlp: {{default: "1", canary: {{"2": {share}}}}}
models:{one}{two}
"""


def test_requests_meet_the_version_they_name_or_their_keys_split_picks(
    broker: EmbeddedBroker, topics: Topics, tmp_path: Path
) -> None:
    path = tmp_path / "versions.yaml"
    path.write_text(
        topics.fill(
            TOPOLOGY,
            share=SHARE,
            one=tiny_version("1"),
            two=tiny_version("2"),
        )
    )
    codec = AvroCodec()
    x = tiny_vectors(1)[0]
    records = []
    for i in range(2 * KEYS):
        key = b"user-%d" % (i % KEYS)
        records.append((key, tensor_request(f"k{i}", "tiny-mlp", {"x": x})))
    for i in range(40):
        asked = tensor_request(f"asked{i}", "tiny-mlp", {"x": x})
        asked.model_version = "2"
        records.append((b"user-%d" % i, asked))
    for i in range(10):
        unknown = tensor_request(f"unknown{i}", "tiny-mlp", {"x": x})
        unknown.model_version = "7"
        records.append((b"user-%d" % i, unknown))
    produce_requests(
        KafkaSettings(),
        broker.bootstrap_servers,
        topics.input,
        ((key, codec.encode_request(r)) for key, r in records),
    )
    served = start_background(path, broker)
    try:
        results = [codec.decode_result(m.value()) for m in read_all(broker, topics.output, 640)]
        letters = [
            codec.decode_dead_letter(m.value()) for m in read_all(broker, topics.dead_letter, 10)
        ]
        registry = served.pipeline.metrics.registry  # type: ignore[union-attr]
        shares = {
            v: registry.get_sample_value(
                "kp_model_version_traffic_ratio", {"model": "tiny-mlp", "version": v}
            )
            for v in ("1", "2")
        }
    finally:
        served.stop()

    assert shares == {"1": 1 - SHARE, "2": SHARE}
    by_key: dict[bytes, set[str]] = defaultdict(set)
    for r in results:
        assert r.status.value == "OK"
        if r.id.startswith("asked"):
            assert r.model_version == "2"
            continue
        key = b"user-%d" % (int(r.id[1:]) % KEYS)
        expected = "2" if split_point("tiny-mlp", key) < SHARE else "1"
        assert r.model_version == expected, (r.id, key)
        by_key[key].add(r.model_version)
    assert len(by_key) == KEYS
    assert all(len(v) == 1 for v in by_key.values())
    on_canary = sum(v == {"2"} for v in by_key.values()) / KEYS
    assert abs(on_canary - SHARE) < 0.08, on_canary
    assert sorted(d.reason for d in letters) == ["unknown_model"] * 10
    assert "version '7' is not served (serving '1', '2')" in letters[0].error
