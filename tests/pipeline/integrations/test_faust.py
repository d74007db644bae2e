"""The Faust adapter without a broker: real Faust events in, one outcome per event out."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import faust
import numpy as np
import pytest
from aiokafka.errors import (  # type: ignore[import-untyped]
    KafkaConnectionError,
    MessageSizeTooLargeError,
)
from faust.exceptions import ProducerSendError
from faust.types import Message

from pipeline.integrations.faust import DeliveryError, KpFaustModel, attach
from pipeline.serving.outcomes import Outcome
from pipeline.tools.traffic import tensor_request
from pipeline.tools.zoo import tiny_mlp_reference
from schemas.codec import AvroCodec
from schemas.errors import KpError
from schemas.messages import Status

ROOT = Path(__file__).resolve().parents[3]
TINY_ONNX = ROOT / "models" / "tiny_mlp.onnx"
CODEC = AvroCodec()
TOPIC = "faust.in"

# Any length in, padded or cropped to 64: requests of different lengths have different
# batch keys, so the adapter must keep them in separate model batches.
TOPOLOGY = f"""
kafka: {{bootstrap_servers: "127.0.0.1:1", group_id: g}}
topics: {{input: [{TOPIC}], output: faust.out, dead_letter: faust.dlq}}
models:
  - name: tiny-mlp
    backend: onnxruntime
    artifact: {TINY_ONNX}
    instances: 2
    options: {{intra_op_threads: 1}}
    inputs: [{{name: x, datatype: FP32, shape: [-1]}}]
    batching: {{max_batch_size: 8, max_delay_ms: 7}}
    preprocess:
      - {{stage: scale, input: x}}            # NaN or infinity: a non_finite dead letter
      - {{stage: pad_crop, input: x, shape: [64]}}
    postprocess:
      - {{stage: softmax, input: logits, output: probs}}
      - {{stage: topk, input: probs, k: 3}}
"""

pytestmark = pytest.mark.skipif(
    not TINY_ONNX.exists(), reason="models/tiny_mlp.onnx missing: run `kp-pipeline models export`"
)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KpFaustModel]:
    path = tmp_path_factory.mktemp("faust") / "t.yaml"
    path.write_text(TOPOLOGY)
    with KpFaustModel.from_topology(path, env={}) as m:
        yield m


@pytest.fixture(scope="module")
def app() -> faust.App:
    return faust.App("unit", broker="kafka://127.0.0.1:1", web_enabled=False)


def vector(n: int, seed: int) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def request(rid: str, x: np.ndarray[Any, Any], model: str = "tiny-mlp") -> bytes:
    return CODEC.encode_request(tensor_request(rid, model, {"x": x}))


def events(
    app: faust.App, values: list[bytes | None], keys: list[bytes] | None = None
) -> list[Any]:
    """Events as a Faust stream hands them over: offsets per partition, two partitions."""
    out = []
    for i, value in enumerate(values):
        key = keys[i] if keys else f"k{i}".encode()
        msg = Message(TOPIC, i % 2, 100 + i // 2, 1_700_000_000.0 + i, 0, None, key, value, None)
        out.append(faust.Event(app, key, value, None, msg))
    return out


def serve(model: KpFaustModel, evs: list[Any]) -> list[Outcome]:
    return asyncio.run(model.handle(evs))


def expected_classes(x: np.ndarray[Any, Any]) -> list[int]:
    fixed = np.zeros(64, np.float32)
    fixed[: min(64, len(x))] = x[:64]
    return [int(c) for c in np.argsort(-tiny_mlp_reference(fixed[None])[0])[:3]]


def test_every_event_gets_one_result_in_event_order(model: KpFaustModel, app: faust.App) -> None:
    xs = [vector(64, i) for i in range(20)]
    evs = events(app, [request(f"r-{i}", x) for i, x in enumerate(xs)])
    outcomes = serve(model, evs)

    assert [o.envelope.offset for o in outcomes] == [e.message.offset for e in evs]
    assert [o.envelope.key for o in outcomes] == [e.message.key for e in evs]
    assert all(o.topic == "faust.out" and o.reason is None for o in outcomes)
    results = [CODEC.decode_result(o.value) for o in outcomes]
    assert [r.id for r in results] == [f"r-{i}" for i in range(20)]
    for r, x, e in zip(results, xs, evs, strict=True):
        assert r.outputs["classes"].tolist() == expected_classes(x)
        assert (r.topic, r.partition, r.offset) == (TOPIC, e.message.partition, e.message.offset)
    # 20 requests with one batch key, max_batch_size 8: model batches of 8, 8 and 4.
    assert sorted(Counter(r.batch_size for r in results).items()) == [(4, 4), (8, 16)]


def test_model_batches_never_mix_shapes(model: KpFaustModel, app: faust.App) -> None:
    lengths = [60, 64, 70, 60, 60, 64, 70, 60, 60]  # five of 60, two of 64, two of 70
    xs = [vector(n, 50 + i) for i, n in enumerate(lengths)]
    outcomes = serve(model, events(app, [request(f"s-{i}", x) for i, x in enumerate(xs)]))

    results = [CODEC.decode_result(o.value) for o in outcomes]
    assert [r.batch_size for r in results] == [{60: 5, 64: 2, 70: 2}[n] for n in lengths]
    for r, x in zip(results, xs, strict=True):
        assert r.outputs["classes"].tolist() == expected_classes(x)  # padded or cropped


def test_refused_requests_become_dead_letters_and_the_rest_is_served(
    model: KpFaustModel, app: faust.App
) -> None:
    good = vector(64, 1)
    nan = good.copy()
    nan[3] = np.nan
    values: dict[str, bytes | None] = {
        "ok-1": request("ok-1", good),
        "garbage": b"\x00\xff not avro at all",
        "unknown-model": request("unknown-model", good, model="no-such-model"),
        "wrong-dtype": request("wrong-dtype", good.astype(np.float64)),
        "tombstone": None,
        "nan": request("nan", nan),
        "ok-2": request("ok-2", good),
    }
    names = list(values)
    outcomes = serve(model, events(app, list(values.values()), [n.encode() for n in names]))

    assert [o.envelope.key for o in outcomes] == [n.encode() for n in names]
    reasons = {n: o.reason for n, o in zip(names, outcomes, strict=True)}
    assert reasons == {
        "ok-1": None,
        "garbage": "undecodable",
        "unknown-model": "unknown_model",
        "wrong-dtype": "bad_tensor",
        "tombstone": "bad_request",
        "nan": "non_finite",  # the scale stage's own reason
        "ok-2": None,
    }
    for name, o in zip(names, outcomes, strict=True):
        if o.reason is None:
            continue
        assert o.topic == "faust.dlq"
        letter = CODEC.decode_dead_letter(o.value)
        assert letter.reason == o.reason
        assert letter.payload == (values[name] or b"")  # the original bytes
        assert dict(o.headers or [])["kp.reason"] == o.reason.encode()
    assert "no-such-model" in CODEC.decode_dead_letter(outcomes[2].value).error
    # The nan row left its batch; the two good rows were served together.
    assert [CODEC.decode_result(outcomes[i].value).batch_size for i in (0, 6)] == [2, 2]


def test_batches_spread_over_instances_each_on_its_own_thread(
    model: KpFaustModel, app: faust.App, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[int, str]] = []
    graph = model.graph["tiny-mlp"]
    for i, backend in enumerate(graph.instances):
        real = backend.infer

        def infer(feeds: Mapping[str, Any], i: int = i, real: Any = real) -> Any:
            seen.append((i, threading.current_thread().name))
            return real(feeds)

        monkeypatch.setattr(backend, "infer", infer)
    evs = events(app, [request(f"t-{i}", vector(64, i)) for i in range(32)])
    assert len(serve(model, evs)) == 32

    assert len(seen) == 4  # 32 requests in model batches of 8
    assert {i for i, _ in seen} == {0, 1}
    assert all(name == f"infer-tiny-mlp-{i}" for i, name in seen)


def test_a_failing_batch_becomes_dead_letters_only_for_its_rows(
    model: KpFaustModel, app: faust.App, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(feeds: Mapping[str, Any]) -> Any:
        raise RuntimeError("out of memory (pretend)")

    monkeypatch.setattr(model.graph["tiny-mlp"].instances[1], "infer", broken)
    # Two chunks of one key: one per instance, whichever turn the rotation is at.
    outcomes = serve(model, events(app, [request(f"f-{i}", vector(64, i)) for i in range(16)]))

    assert len(outcomes) == 16
    assert Counter(o.reason for o in outcomes) == {None: 8, "inference_failed": 8}
    failed = [CODEC.decode_dead_letter(o.value) for o in outcomes if o.reason]
    assert all("out of memory (pretend)" in d.error for d in failed)


def _retries(model: KpFaustModel) -> float:
    return model.metrics.inference_retries.labels("tiny-mlp")._value.get()  # type: ignore[no-any-return]


def test_a_transient_failure_is_retried_like_the_main_path(
    model: KpFaustModel, app: faust.App, monkeypatch: pytest.MonkeyPatch
) -> None:
    failures = {"left": 1}
    for backend in model.graph["tiny-mlp"].instances:
        real = backend.infer

        def flaky(feeds: Mapping[str, Any], real: Any = real) -> Any:
            if failures["left"]:
                failures["left"] -= 1
                raise RuntimeError("CUDA out of memory (pretend)")
            return real(feeds)

        monkeypatch.setattr(backend, "infer", flaky)
    before = _retries(model)
    xs = [vector(64, i) for i in range(8)]
    outcomes = serve(model, events(app, [request(f"r-{i}", x) for i, x in enumerate(xs)]))

    assert [o.reason for o in outcomes] == [None] * 8  # the retry served the whole batch
    assert _retries(model) == before + 1
    for x, o in zip(xs, outcomes, strict=True):
        assert CODEC.decode_result(o.value).batch_size == 8
        assert CODEC.decode_result(o.value).outputs["classes"].tolist() == expected_classes(x)


def test_a_poison_request_is_isolated_by_halving_like_the_main_path(
    model: KpFaustModel, app: faust.App, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs: list[int] = []
    for backend in model.graph["tiny-mlp"].instances:
        real = backend.infer

        def picky(feeds: Mapping[str, Any], real: Any = real) -> Any:
            x = np.asarray(feeds["x"])
            runs.append(len(x))
            if (x[:, 0] == 42.0).any():
                raise ValueError("this model cannot take 42")
            return real(feeds)

        monkeypatch.setattr(backend, "infer", picky)
    xs = [vector(64, i) for i in range(8)]
    xs[5][0] = 42.0
    outcomes = serve(model, events(app, [request(f"p-{i}", x) for i, x in enumerate(xs)]))

    assert [o.reason for o in outcomes] == [None] * 5 + ["inference_failed"] + [None] * 2
    letter = CODEC.decode_dead_letter(outcomes[5].value)
    assert letter.id == "p-5"
    assert "ValueError: this model cannot take 42" in letter.error
    sizes = [CODEC.decode_result(o.value).batch_size for o in outcomes if o.reason is None]
    assert max(sizes) == 4  # the good rows ran in the halves, not in the poisoned 8
    assert runs == [8, 4, 4, 2, 1, 1, 2]  # depth first: the whole, halves, down to the poison


def test_a_request_past_its_deadline_expires_unrun_like_the_main_path(
    model: KpFaustModel, app: faust.App, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[int] = []
    for backend in model.graph["tiny-mlp"].instances:
        real = backend.infer

        def counted(feeds: Mapping[str, Any], real: Any = real) -> Any:
            ran.append(len(feeds["x"]))
            return real(feeds)

        monkeypatch.setattr(backend, "infer", counted)
    late = tensor_request("late", "tiny-mlp", {"x": vector(64, 1)})
    late.deadline_ms = int(time.time() * 1000) - 5_000
    values = [request("on-time", vector(64, 0)), CODEC.encode_request(late)]
    outcomes = serve(model, events(app, values))

    on_time, expired = (CODEC.decode_result(o.value) for o in outcomes)
    assert on_time.status == Status.OK
    assert expired.status == Status.EXPIRED
    assert expired.id == "late"
    assert "deadline passed" in (expired.error or "")
    assert ran == [1]  # only the on-time request reached the model


def test_a_runtime_that_stopped_for_good_fails_the_batch_instead_of_hanging(
    model: KpFaustModel, app: faust.App, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = model.runtimes["tiny-mlp"]
    monkeypatch.setattr(runtime, "submit", lambda *_: None)  # rows never answered
    monkeypatch.setattr(type(runtime), "fatal", property(lambda self: "model tiny-mlp: broken"))
    started = time.monotonic()
    with pytest.raises(KpError, match="model tiny-mlp: broken; the batch stays unacknowledged"):
        serve(model, events(app, [request("stuck", vector(64, 0))]))
    assert time.monotonic() - started < 5


def test_handle_leaves_the_event_loop_free(
    model: KpFaustModel, app: faust.App, monkeypatch: pytest.MonkeyPatch
) -> None:
    for backend in model.graph["tiny-mlp"].instances:
        real = backend.infer

        def slow(feeds: Mapping[str, Any], real: Any = real) -> Any:
            time.sleep(0.3)
            return real(feeds)

        monkeypatch.setattr(backend, "infer", slow)

    async def run() -> int:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        await model.handle(events(app, [request("slow", vector(64, 0))]))
        ticker.cancel()
        return ticks

    assert asyncio.run(run()) >= 10  # the loop ran on while the model took 0.3 s


def test_stats_count_what_was_consumed(model: KpFaustModel, app: faust.App) -> None:
    before = model.stats.consumed
    serve(model, events(app, [request("c-0", vector(64, 0)), b"junk"]))
    assert model.stats.consumed == before + 2
    assert model.stats.first_consumed is not None


# -- publishing ------------------------------------------------------------------------


class FakeTopic:
    """Records sends; a send of a value in ``refuse`` fails as the broker would."""

    def __init__(self, name: str, sent: list[tuple[str, Any, bytes, Any]], refuse: Any) -> None:
        self.name, self.sent, self.refuse = name, sent, refuse

    async def send(self, *, key: Any, value: bytes, headers: Any, force: bool) -> Any:
        error = self.refuse(self.name, value)
        if isinstance(error, ProducerSendError):  # refused before sending, as aiokafka does
            raise error
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if error is None:
            self.sent.append((self.name, key, value, headers))
            fut.set_result(None)
        else:
            fut.set_exception(error)
        return fut


class FakeApp:
    def __init__(self, refuse: Any = lambda topic, value: None) -> None:
        self.sent: list[tuple[str, Any, bytes, Any]] = []
        self.refuse = refuse

    def topic(self, name: str, **_: Any) -> FakeTopic:
        return FakeTopic(name, self.sent, self.refuse)


def outcomes_for(model: KpFaustModel, app: faust.App, n: int) -> list[Outcome]:
    values: list[bytes | None] = [request(f"p-{i}", vector(64, i)) for i in range(n)]
    return serve(model, events(app, [*values, b"junk"]))


def test_publish_sends_results_and_dead_letters_with_keys_and_headers(
    model: KpFaustModel, app: faust.App
) -> None:
    outcomes = outcomes_for(model, app, 3)
    fake = FakeApp()
    before = (model.stats.results, model.stats.dead_letters)
    asyncio.run(model.publish(fake, outcomes))  # type: ignore[arg-type]

    assert [(t, k) for t, k, _, _ in fake.sent] == [
        ("faust.out", b"k0"),
        ("faust.out", b"k1"),
        ("faust.out", b"k2"),
        ("faust.dlq", b"k3"),
    ]
    assert fake.sent[0][3] is None
    headers = dict(fake.sent[3][3])
    assert headers["kp.reason"] == b"undecodable"
    assert headers["kp.source"] == f"{TOPIC}/1/101".encode()
    assert (model.stats.results, model.stats.dead_letters) == (before[0] + 3, before[1] + 1)


def test_a_result_too_large_for_the_broker_becomes_an_undeliverable_dead_letter(
    model: KpFaustModel, app: faust.App
) -> None:
    outcomes = outcomes_for(model, app, 2)
    too_large = outcomes[1].value

    def refuse(topic: str, value: bytes) -> Any:
        if value != too_large:
            return None
        error = ProducerSendError("Error while sending")  # how Faust wraps aiokafka's error
        error.__cause__ = MessageSizeTooLargeError()
        return error

    fake = FakeApp(refuse)
    asyncio.run(model.publish(fake, outcomes))  # type: ignore[arg-type]

    assert [(t, k) for t, k, _, _ in fake.sent] == [
        ("faust.out", b"k0"),
        ("faust.dlq", b"k2"),  # the junk record's letter
        ("faust.dlq", b"k1"),  # the refused result, sent again as a dead letter
    ]
    letter = CODEC.decode_dead_letter(fake.sent[2][2])
    assert letter.reason == "undeliverable"
    assert "MessageSizeTooLarge" in letter.error


def test_any_other_delivery_failure_raises(model: KpFaustModel, app: faust.App) -> None:
    outcomes = outcomes_for(model, app, 2)
    fake = FakeApp(lambda topic, value: KafkaConnectionError("broker gone"))
    with pytest.raises(DeliveryError, match="broker gone"):
        asyncio.run(model.publish(fake, outcomes))  # type: ignore[arg-type]


# -- set-up ----------------------------------------------------------------------------


def test_attach_defines_one_agent_on_the_input_topics_with_the_topology_batching(
    model: KpFaustModel,
) -> None:
    app = faust.App("attach-unit", broker="kafka://127.0.0.1:1", web_enabled=False)
    assert attach(app, model) is model
    agents = list(app.agents.values())
    assert [a.name for a in agents] == ["kp-inference"]
    assert agents[0].channel.topics == (TOPIC,)
    assert (model.take_size, model.max_delay_s) == (16, 0.007)  # 8 for each of 2 instances


def test_from_topology_refuses_a_model_it_does_not_have(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(TOPOLOGY)
    with pytest.raises(KpError, match="no model 'nope' \\(it has tiny-mlp\\)"):
        KpFaustModel.from_topology(path, model="nope", env={})


def test_with_tracing_each_delivered_outcome_gets_a_span_with_its_phases(
    model: KpFaustModel, app: faust.App
) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from pipeline.observability.tracing import Tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    assert model.tracing is None  # the topology does not ask for it
    model.tracing, model.encoder.tracing = Tracing(provider.get_tracer("t")), True
    try:
        outcomes = outcomes_for(model, app, 2)
        asyncio.run(model.publish(FakeApp(), outcomes))  # type: ignore[arg-type]
    finally:
        model.tracing, model.encoder.tracing = None, False
    spans = exporter.get_finished_spans()
    requests = [s for s in spans if s.name.startswith("kp-pipeline")]
    assert sorted(s.attributes["kp.outcome"] for s in requests) == ["OK", "OK", "undecodable"]
    phases = sorted(s.name for s in spans if s.parent is not None)
    assert phases == sorted(["queue", "preprocess", "infer", "postprocess", "publish"] * 2)
