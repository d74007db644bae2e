"""Poison requests in a real model, served by `kp-pipeline run` on a real broker.

The model is an embedding lookup built here with onnx.helper: ``Gather(table[100, 16],
ids INT64[N, 8])`` then ``ReduceMean`` over the 8 ids. onnxruntime refuses an id of 100
or more for the whole batch (INVALID_ARGUMENT, naming the id; it does not clamp), which
is what a poison request does to a real model. 1% of the requests carry such an id, mixed
in at random: each must come back as an ``inference_failed`` dead letter with the ORT
error, every other request as exactly one correct result, found by halving the batches
its poison neighbours failed. Two requests whose deadline has passed get EXPIRED results.
"""

from __future__ import annotations

import random
import signal
import time
import urllib.error
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from e2e.kit import Topics, spawn_run, wait_for

from load.backlog import scrape
from pipeline.config.topology import KafkaSettings
from pipeline.kafka.broker import EmbeddedBroker, free_port
from pipeline.tools.traffic import produce_requests, read_topic, tensor_request
from schemas.codec import AvroCodec
from schemas.messages import DeadLetter, Result, Status

N = 3000
POISON = 30  # 1%
VOCAB, DIM, IDS = 100, 16, 8
TABLE = np.random.default_rng(11).standard_normal((VOCAB, DIM)).astype(np.float32)

TOPOLOGY = """
kafka: {{bootstrap_servers: embedded, group_id: {group}}}
topics: {{input: [{input}], output: {output}, dead_letter: {dead_letter}, create: false}}
models:
  - name: embed
    backend: onnxruntime
    artifact: {artifact}
    options: {{intra_op_threads: 1}}
    inputs: [{{name: ids, datatype: INT64, shape: [{ids}]}}]
    batching: {{max_batch_size: 32, max_delay_ms: 5, lag_control: {{enabled: false}}}}
    retry: {{backoff_ms: 1, max_backoff_ms: 10}}
"""


def export_embedding_onnx(path: Path) -> Path:
    """``ids`` INT64[N, 8] → ``pooled`` FP32[N, 16]: the mean of the ids' rows of TABLE."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["rows"], name="lookup", axis=0),
        helper.make_node("ReduceMean", ["rows"], ["pooled"], name="pool", axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "embedding_bag",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", IDS])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", DIM])],
        [numpy_helper.from_array(TABLE, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _requests(rng: random.Random, now_ms: int) -> tuple[list[tuple[bytes, bytes]], dict[str, Any]]:
    """The encoded requests, and what each should come back as."""
    codec = AvroCodec()
    poison = set(rng.sample(range(N), POISON))
    expired = set(rng.sample(sorted(set(range(N)) - poison), 2))
    ids_of: dict[str, np.ndarray[Any, Any]] = {}
    bad_id: dict[str, int] = {}
    out = []
    for i in range(N):
        rid = f"e-{i}"
        ids = np.array([rng.randrange(VOCAB) for _ in range(IDS)], np.int64)
        if i in poison:
            bad_id[rid] = VOCAB + rng.randrange(10_000)
            ids[rng.randrange(IDS)] = bad_id[rid]
        request = tensor_request(rid, "embed", {"ids": ids})
        if i in expired:
            request.deadline_ms = now_ms - 60_000  # a minute ago
        elif i % 100 == 7:
            request.deadline_ms = now_ms + 600_000  # in ten minutes: runs
        ids_of[rid] = ids
        out.append((rid.encode(), codec.encode_request(request)))
    expect = {"ids": ids_of, "bad": bad_id, "expired": {f"e-{i}" for i in expired}}
    return out, expect


def _metrics(url: str) -> dict[str, float]:
    try:
        return scrape(url)
    except (OSError, urllib.error.URLError):
        return {}


def _serve(topology: Path, broker: EmbeddedBroker, log: Path) -> dict[str, float]:
    """Run `kp-pipeline run` until every request is answered; its final /metrics."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    run = spawn_run(topology, broker, log, metrics_port=port)
    try:

        def answered() -> bool:
            assert run.poll() is None, log.read_text()[-3000:]
            m = _metrics(url)
            done = sum(v for k, v in m.items() if k.startswith(("kp_results_total{", "kp_dead_")))
            return done >= N

        wait_for(answered, 120, f"an outcome for each of {N} requests")
        samples = scrape(url)
    finally:
        run.send_signal(signal.SIGTERM)
        code = run.wait(60)
    assert code == 0, log.read_text()[-3000:]
    return samples


def _check_letters(letters: list[DeadLetter], bad: dict[str, int]) -> None:
    assert Counter(d.id for d in letters) == Counter(set(bad)), "each poison request, once"
    for d in letters:
        assert d.id is not None
        assert d.reason == "inference_failed"
        assert d.error.startswith("InvalidArgument: [ONNXRuntimeError] : 2 : INVALID_ARGUMENT")
        assert "Gather node" in d.error
        assert f"idx={bad[d.id]} must be within the inclusive range [-100,99]" in d.error
    print("the poison's error:", letters[0].error)


def _check_results(results: list[Result], expect: dict[str, Any]) -> Counter[int]:
    """Every other request once, with the right numbers; the batch sizes they ran in."""
    ids_of: dict[str, np.ndarray[Any, Any]] = expect["ids"]
    served = Counter(r.id for r in results)
    assert served == Counter(set(ids_of) - set(expect["bad"])), "every other request, once"
    sizes: Counter[int] = Counter()
    for r in results:
        if r.id in expect["expired"]:
            assert (r.status, r.outputs, r.batch_size) == (Status.EXPIRED, {}, 0)
            assert r.error is not None
            assert r.error.startswith("deadline passed ")
            continue
        assert r.status == Status.OK, r
        want = TABLE[ids_of[r.id]].mean(axis=0)
        np.testing.assert_allclose(r.outputs["pooled"], want, rtol=1e-5, atol=1e-6)
        assert 1 <= r.batch_size <= 32
        sizes[r.batch_size] += 1
    return sizes


def test_poison_requests_alone_become_dead_letters_and_the_rest_are_served(
    broker: EmbeddedBroker, topics: Topics, tmp_path: Path
) -> None:
    artifact = export_embedding_onnx(tmp_path / "embedding.onnx")
    topology = tmp_path / "embed.yaml"
    topology.write_text(
        TOPOLOGY.format(
            group=topics.group,
            input=topics.input,
            output=topics.output,
            dead_letter=topics.dead_letter,
            artifact=artifact,
            ids=IDS,
        )
    )
    records, expect = _requests(random.Random(2026), int(time.time() * 1000))
    produce_requests(KafkaSettings(), broker.bootstrap_servers, topics.input, records)
    samples = _serve(topology, broker, tmp_path / "run.log")

    # Read everything there is, duplicates included: each id must appear exactly once.
    codec, bootstrap = AvroCodec(), broker.bootstrap_servers
    out = read_topic(KafkaSettings(), bootstrap, topics.output, timeout=60, idle=2)
    dlq = read_topic(KafkaSettings(), bootstrap, topics.dead_letter, timeout=60, idle=2)
    _check_letters([codec.decode_dead_letter(m.value()) for m in dlq], expect["bad"])
    sizes = _check_results([codec.decode_result(m.value()) for m in out], expect)
    assert any(size < 16 for size in sizes)  # rows served from halves of poisoned batches

    def value(name: str, **labels: str) -> float:
        return samples[name + "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"]

    splits = value("kp_batch_splits_total", model="embed")
    assert splits > 0
    assert splits <= POISON * 5  # at most ⌈log2 32⌉ splits per poison request
    assert value("kp_inference_retries_total", model="embed") == 0  # not a transient error
    assert value("kp_dead_letters_total", model="embed", reason="inference_failed") == POISON
    assert value("kp_results_total", model="embed", status="EXPIRED") == 2
    assert value("kp_results_total", model="embed", status="OK") == N - POISON - 2
    print(f"{splits:g} splits for {POISON} poison requests; served batch sizes {sorted(sizes)}")
