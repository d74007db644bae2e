"""ModelRuntime with real stages and an in-memory backend: every row ends as one outcome.

Failing runs: transient errors are retried, poison requests are isolated by halving and
become dead letters alone; expired requests get EXPIRED results and never run.
"""

from __future__ import annotations

import io
import math
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from prometheus_client import generate_latest

from backends.base import ModelInfo, ModelSpec
from pipeline.config.topology import ModelSettings, RetrySettings, SchedulingSettings
from pipeline.observability.metrics import Metrics
from pipeline.serving.graph import ServedModel
from pipeline.serving.outcomes import Outcome, OutcomeEncoder
from pipeline.serving.recovery import ISOLATE, halve, isolation_budget
from pipeline.serving.runtime import DEPTH, ModelRuntime
from pipeline.serving.scheduler import DeviceScheduler, RequestClass
from pipeline.serving.steps import Prepared
from schemas.codec import AvroCodec
from schemas.messages import Envelope, Request, Status
from schemas.tensors import TensorSpec
from stages.base import Batch, Stage, StageBase
from stages.postprocess.classification import Softmax, SoftmaxParams, TopK, TopKParams
from stages.preprocess.image import (
    CenterCrop,
    CenterCropParams,
    DecodeImage,
    DecodeImageParams,
    Normalize,
    NormalizeParams,
    Resize,
    ResizeParams,
    ToNCHW,
    ToNCHWParams,
)

CODEC = AvroCodec()
RED, GREEN, BLUE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 0)


class FakeBackend:
    """Per-channel mean brightness as logits; refuses any batch holding a black image.

    The refusal reads like an out-of-memory error, so it is retried before it is isolated.
    """

    def __init__(self) -> None:
        self.batches: list[int] = []

    def load(self, spec: ModelSpec, device: str) -> ModelInfo:
        return ModelInfo(
            {"input": TensorSpec("FP32", (3, 4, 4))}, {"logits": TensorSpec("FP32", (3,))}
        )

    def infer(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = batch["input"]
        self.batches.append(len(x))
        if (x.reshape(len(x), -1).max(axis=1) < 0.1).any():
            raise RuntimeError("CUDA out of memory (pretend)")
        return {"logits": x.mean(axis=(2, 3)) * 10}

    def unload(self) -> None:
        pass


class Sink:
    """Collects what the runtime emits from its worker threads."""

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []
        self._cond = threading.Condition()

    def emit(self, outcomes: list[Outcome]) -> None:
        with self._cond:
            self.outcomes.extend(outcomes)
            self._cond.notify_all()

    def wait_for(self, n: int, timeout: float = 10) -> dict[int, Outcome]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.outcomes) >= n, timeout), (
                f"{len(self.outcomes)} of {n} outcomes"
            )
        by_offset = {o.envelope.offset: o for o in self.outcomes}
        assert len(by_offset) == len(self.outcomes) == n  # exactly one outcome per row
        return by_offset


def _jpeg(rgb: tuple[int, int, int], size: tuple[int, int] = (8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _env(offset: int, image: bytes, reply_topic: str | None = None) -> Envelope:
    arr = np.empty(1, dtype=object)
    arr[0] = image
    return Envelope(
        topic="in",
        partition=2,
        offset=offset,
        key=b"k%d" % offset,
        value=b"raw-%d" % offset,
        timestamp_ms=int(time.time() * 1000),
        consumed_at=time.monotonic(),
        generation=1,
        request=Request(f"r{offset}", "m", {"image": arr}, reply_topic=reply_topic),
    )


FAST_RETRY = {"backoff_ms": 1}  # the default's 50 ms jittered backoff, shortened


def _graph(
    backends: list[Any],
    pre: list[Stage] | None = None,
    post: list[Stage] | None = None,
    retry: Mapping[str, Any] = FAST_RETRY,
) -> ServedModel:
    settings = ModelSettings(
        name="m",
        version="3",
        backend="fake",
        artifact="unused.onnx",
        instances=len(backends),
        inputs=[{"name": "image", "datatype": "BYTES", "shape": [1]}],
        retry=retry,
    )
    if pre is None:
        pre = [
            DecodeImage(DecodeImageParams()),
            Resize(ResizeParams(size=(4, 4))),
            Normalize(NormalizeParams(mean=[0, 0, 0], std=[1, 1, 1])),
            ToNCHW(ToNCHWParams(output="input")),
        ]
    if post is None:
        post = [Softmax(SoftmaxParams(input="logits")), TopK(TopKParams(input="logits", k=1))]
    info = backends[0].load(ModelSpec("m", settings.artifact), "cpu")
    devices = ["cpu"] * len(backends)
    outputs = dict(info.outputs)
    for stage in post:  # what the graph would publish
        outputs = stage.signature(outputs)
    return ServedModel(
        settings, pre, post, backends, info, {"image": TensorSpec("BYTES", (1,))}, outputs, devices
    )


@pytest.fixture
def serve() -> Iterator[Any]:
    started: list[ModelRuntime] = []

    def start(graph: ServedModel) -> tuple[ModelRuntime, Sink]:
        sink = Sink()
        runtime = ModelRuntime(graph, OutcomeEncoder(CODEC, "results", "dlq"), sink.emit)
        runtime.start()
        started.append(runtime)
        return runtime, sink

    yield start
    for runtime in started:
        assert runtime.stop(5)


def _wait_idle(runtime: ModelRuntime, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while runtime.busy and time.monotonic() < deadline:
        time.sleep(0.001)
    assert runtime.busy == 0


def test_every_row_gets_its_result(serve: Any) -> None:
    backend = FakeBackend()
    runtime, sink = serve(_graph([backend]))
    colours = [RED, GREEN, BLUE, GREEN, RED]
    runtime.submit([_env(i, _jpeg(c)) for i, c in enumerate(colours)])
    outcomes = sink.wait_for(5)
    _wait_idle(runtime)
    assert backend.batches == [5]
    for offset, colour in enumerate(colours):
        out = outcomes[offset]
        assert (out.topic, out.reason, out.headers) == ("results", None, None)
        result = CODEC.decode_result(out.value)
        assert (result.id, result.model, result.model_version) == (f"r{offset}", "m", "3")
        assert result.outputs["classes"].tolist() == [colour.index(255)]
        assert result.outputs["scores"][0] > 0.9
        assert (result.topic, result.partition, result.offset) == ("in", 2, offset)
        assert result.batch_size == 5
        assert result.timings.compute_ms >= 0
        assert result.timings.end_to_end_ms >= 0


def test_a_reply_topic_overrides_the_output_topic(serve: Any) -> None:
    runtime, sink = serve(_graph([FakeBackend()]))
    runtime.submit([_env(0, _jpeg(RED), reply_topic="mine"), _env(1, _jpeg(RED))])
    outcomes = sink.wait_for(2)
    assert (outcomes[0].topic, outcomes[1].topic) == ("mine", "results")


def test_a_replay_ignores_reply_topics() -> None:
    sink = Sink()
    encoder = OutcomeEncoder(CODEC, "replayed", "dlq", reply_topics=False)
    runtime = ModelRuntime(_graph([FakeBackend()]), encoder, sink.emit)
    runtime.start()
    try:
        runtime.submit([_env(0, _jpeg(RED), reply_topic="live-reply")])
        assert sink.wait_for(1)[0].topic == "replayed"
    finally:
        assert runtime.stop(5)


def test_each_instance_preprocesses_with_its_own_stages(serve: Any) -> None:
    class Marks(StageBase):
        """Counts the rows it preprocessed."""

        name = "marks"

        def __init__(self) -> None:
            self.rows = 0

        def signature(self, inputs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
            return dict(inputs)

        def process(self, batch: Batch) -> Batch:
            self.rows += len(batch)
            return batch

    graph = _graph([FakeBackend(), FakeBackend()])
    marks = [Marks(), Marks()]
    graph.instance_preprocess = [[marks[i], *graph.preprocess] for i in range(2)]
    runtime, sink = serve(graph)
    for b in range(8):
        runtime.submit([_env(b * 2 + i, _jpeg(RED)) for i in range(2)])
    sink.wait_for(16)
    stats = runtime.instance_stats()
    assert [m.rows for m in marks] == [s.rows for s in stats]  # each its own instance's
    assert all(m.rows > 0 for m in marks)


def test_a_failing_row_is_isolated_and_the_rest_of_its_batch_is_served(serve: Any) -> None:
    backend = FakeBackend()
    runtime, sink = serve(_graph([backend]))
    runtime.submit([_env(0, _jpeg(RED)), _env(1, _jpeg(BLACK)), _env(2, _jpeg(BLUE))])
    runtime.submit([_env(3, _jpeg(GREEN))])
    outcomes = sink.wait_for(4)
    _wait_idle(runtime)
    # 3 attempts (the error looks transient), then [0] ok, [1, 2] fails, [1] fails, [2] ok.
    assert backend.batches == [3, 3, 3, 1, 2, 1, 1, 1]
    assert {o: outcomes[o].reason for o in outcomes} == {
        0: None,
        1: "inference_failed",
        2: None,
        3: None,
    }
    out = outcomes[1]
    assert out.topic == "dlq"
    letter = CODEC.decode_dead_letter(out.value)
    assert (letter.reason, letter.id, letter.model) == ("inference_failed", "r1", "m")
    assert letter.error == "RuntimeError: CUDA out of memory (pretend)"
    assert (letter.topic, letter.partition, letter.offset) == ("in", 2, 1)
    assert letter.payload == b"raw-1"
    assert dict(out.headers or [])["kp.reason"] == b"inference_failed"
    for offset, cls in ((0, 0), (2, 2), (3, 1)):
        result = CODEC.decode_result(outcomes[offset].value)
        assert result.outputs["classes"].tolist() == [cls]
        assert result.batch_size == 1  # the size of the run that served it
    m = runtime.metrics
    assert m.batch_splits.labels("m")._value.get() == 2
    assert m.inference_retries.labels("m")._value.get() == 2
    assert runtime.instance_stats()[0].batches == 2  # batches dispatched, not runs


def test_without_split_on_failure_a_failing_batch_is_dead_letters_whole(serve: Any) -> None:
    retry = {"split_on_failure": False, "transient": []}
    backend = FakeBackend()
    runtime, sink = serve(_graph([backend, FakeBackend()], retry=retry))
    runtime.submit([_env(0, _jpeg(RED)), _env(1, _jpeg(BLACK)), _env(2, _jpeg(BLUE))])
    runtime.submit([_env(3, _jpeg(GREEN))])
    outcomes = sink.wait_for(4)
    _wait_idle(runtime)
    assert {o: outcomes[o].reason for o in outcomes} == {
        0: "inference_failed",
        1: "inference_failed",
        2: "inference_failed",
        3: None,
    }
    for offset in (0, 1, 2):
        letter = CODEC.decode_dead_letter(outcomes[offset].value)
        assert letter.error == "RuntimeError: CUDA out of memory (pretend)"
        assert letter.payload == b"raw-%d" % offset
    assert backend.batches == [3]  # no retry ([] transient), no split
    assert runtime.metrics.batch_splits.labels("m")._value.get() == 0


def test_corrupt_images_become_dead_letters_and_the_rest_are_served(serve: Any) -> None:
    backend = FakeBackend()
    runtime, sink = serve(_graph([backend]))
    good = _jpeg(BLUE)
    images = [_jpeg(RED), good[: len(good) // 2], b"not a jpeg", good, _jpeg(GREEN, (20, 3))]
    runtime.submit([_env(i, img) for i, img in enumerate(images)])
    outcomes = sink.wait_for(5)
    _wait_idle(runtime)
    assert backend.batches == [3]  # the rejected rows never reach the model
    for offset in (1, 2):
        out = outcomes[offset]
        assert (out.topic, out.reason) == ("dlq", "bad_image")
        headers = dict(out.headers or [])
        assert headers["kp.reason"] == b"bad_image"
        assert headers["kp.source"] == b"in/2/%d" % offset
        assert headers["kp.error"].startswith(b"cannot decode image")
        letter = CODEC.decode_dead_letter(out.value)
        assert (letter.reason, letter.offset, letter.payload) == (
            "bad_image",
            offset,
            b"raw-%d" % offset,
        )
    for offset, cls in ((0, 0), (3, 2), (4, 1)):
        result = CODEC.decode_result(outcomes[offset].value)
        assert outcomes[offset].reason is None
        assert result.outputs["classes"].tolist() == [cls]
        assert result.batch_size == 3  # the rows the model ran; rejected ones left before


def _with_crop() -> list[Stage]:
    return [
        DecodeImage(DecodeImageParams()),
        Resize(ResizeParams(size=4)),
        CenterCrop(CenterCropParams(size=4)),
        Normalize(NormalizeParams(mean=[0, 0, 0], std=[1, 1, 1])),
        ToNCHW(ToNCHWParams(output="input")),
    ]


def test_a_batch_rejected_entirely_emits_only_its_dead_letters(serve: Any) -> None:
    backend = FakeBackend()
    runtime, sink = serve(_graph([backend], pre=_with_crop()))
    runtime.submit([_env(0, b"junk"), _env(1, b"")])
    outcomes = sink.wait_for(2)
    _wait_idle(runtime)
    assert [outcomes[o].reason for o in (0, 1)] == ["bad_image", "bad_image"]
    assert backend.batches == []


def test_a_batch_rejected_entirely_keeps_the_reject_reason_without_a_crop(serve: Any) -> None:
    runtime, sink = serve(_graph([FakeBackend()]))  # decode, resize to [4, 4], normalize
    runtime.submit([_env(0, b"junk"), _env(1, b"")])
    outcomes = sink.wait_for(2)
    assert [outcomes[o].reason for o in (0, 1)] == ["bad_image", "bad_image"]


def test_a_stage_that_breaks_the_contract_fails_its_batch_as_preprocess_failed(
    serve: Any,
) -> None:
    class DropsRows(StageBase):
        name = "drops_rows"

        def process(self, batch: Batch) -> Batch:
            return Batch(batch.rows[:1], {k: v[:1] for k, v in batch.columns.items()})

    runtime, sink = serve(_graph([FakeBackend()], pre=[DropsRows(None)]))  # type: ignore[arg-type]
    runtime.submit([_env(0, _jpeg(RED)), _env(1, _jpeg(RED))])
    outcomes = sink.wait_for(2)
    _wait_idle(runtime)
    assert {o.reason for o in outcomes.values()} == {"preprocess_failed"}
    letter = CODEC.decode_dead_letter(outcomes[0].value)
    assert "stage drops_rows returned 1 rows and 0 rejects for 2 rows in" in letter.error


def test_busy_counts_batches_until_their_outcomes_are_emitted(serve: Any) -> None:
    gate = threading.Event()

    class SlowBackend(FakeBackend):
        def infer(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            assert gate.wait(5)
            return super().infer(batch)

    runtime, sink = serve(_graph([SlowBackend()]))
    for i in range(3):
        runtime.submit([_env(i, _jpeg(RED))])
    assert runtime.busy == 3
    gate.set()
    sink.wait_for(3)
    _wait_idle(runtime)


def test_many_batches_over_two_instances_all_come_back(serve: Any) -> None:
    backends = [FakeBackend(), FakeBackend()]
    runtime, sink = serve(_graph(backends))
    images = [_jpeg(c) for c in (RED, GREEN, BLUE)]
    for b in range(20):
        runtime.submit([_env(b * 3 + i, images[i]) for i in range(3)])
    outcomes = sink.wait_for(60)
    _wait_idle(runtime)
    assert sum(len(b.batches) for b in backends) == 20
    for offset, out in outcomes.items():
        assert CODEC.decode_result(out.value).outputs["classes"].tolist() == [offset % 3]


def test_equally_idle_instances_take_turns_and_count_what_they_ran(serve: Any) -> None:
    backends = [FakeBackend(), FakeBackend()]
    runtime, sink = serve(_graph(backends))
    for b in range(6):  # one at a time: every instance is idle when the next arrives
        runtime.submit([_env(b, _jpeg(RED))])
        sink.wait_for(b + 1)
        _wait_idle(runtime)
    assert [len(b.batches) for b in backends] == [3, 3]
    stats = runtime.instance_stats()
    assert [(s.index, s.device, s.batches, s.rows) for s in stats] == [
        (0, "cpu", 3, 3),
        (1, "cpu", 3, 3),
    ]
    assert all(s.busy_s > 0 for s in stats)


def test_a_busy_instance_gets_no_more_than_depth_while_another_is_free(serve: Any) -> None:
    """The least-busy instance gets the next batch; a stuck one holds at most DEPTH."""
    gate = threading.Event()

    class Stuck(FakeBackend):
        def infer(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            assert gate.wait(10)
            return super().infer(batch)

    stuck, free = Stuck(), FakeBackend()
    runtime, sink = serve(_graph([stuck, free]))
    for b in range(12):
        runtime.submit([_env(b, _jpeg(GREEN))])
    sink.wait_for(12 - DEPTH)
    deadline = time.monotonic() + 5  # until the free instance has run all it was given
    while not (
        len(sink.outcomes) == runtime.instance_stats()[1].batches
        and len(sink.outcomes) + runtime.busy == 12
    ):
        assert time.monotonic() < deadline
        time.sleep(0.001)
    held = runtime.busy
    assert 1 <= held <= DEPTH
    gate.set()
    sink.wait_for(12)
    _wait_idle(runtime)
    assert len(stuck.batches) == held
    assert len(free.batches) == 12 - held


def test_stop_finishes_queued_batches_first() -> None:
    sink = Sink()
    runtime = ModelRuntime(_graph([FakeBackend()]), OutcomeEncoder(CODEC, "r", "d"), sink.emit)
    runtime.start()
    runtime.submit([_env(0, _jpeg(RED))])
    runtime.submit([_env(1, _jpeg(GREEN))])
    assert runtime.stop(5)
    assert len(sink.outcomes) == 2
    assert runtime.busy == 0


def test_batch_size_is_the_rows_the_model_ran_when_postprocess_rejects(serve: Any) -> None:
    class RejectsFirst(StageBase):
        name = "rejects_first"

        def signature(self, inputs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
            return dict(inputs)

        def process(self, batch: Batch) -> Batch:
            return batch.reject({0: ("low_confidence", "pretend")})

    backend = FakeBackend()
    post = [RejectsFirst(None), TopK(TopKParams(input="logits", k=1))]  # type: ignore[arg-type]
    runtime, sink = serve(_graph([backend], post=post))
    runtime.submit([_env(i, _jpeg(RED)) for i in range(4)])
    outcomes = sink.wait_for(4)
    assert backend.batches == [4]
    assert outcomes[0].reason == "low_confidence"
    assert [CODEC.decode_result(outcomes[i].value).batch_size for i in (1, 2, 3)] == [4, 4, 4]


# -- failing runs on numbers: poison isolation, transient retries, deadlines --------------

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.77 GiB total capacity)"


class Doubler:
    """``y = 2x`` on rows of two floats; a row whose x[0] < 0 is poison.

    A batch holding poison fails like onnxruntime's Gather on an id out of range: the
    whole run raises, naming the first bad value. ``oom`` decides, from the batch size and
    the number of the call, whether the run first fails for lack of memory.
    """

    def __init__(self, oom: Callable[[int, int], bool] | None = None) -> None:
        self.batches: list[int] = []
        self.served: list[int] = []  # sizes of the runs that succeeded
        self.oom = oom

    def load(self, spec: ModelSpec, device: str) -> ModelInfo:
        return ModelInfo({"x": TensorSpec("FP32", (2,))}, {"y": TensorSpec("FP32", (2,))})

    def infer(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = batch["x"]
        self.batches.append(len(x))
        if self.oom is not None and self.oom(len(x), len(self.batches)):
            raise RuntimeError(OOM)
        bad = x[:, 0][x[:, 0] < 0]
        if bad.size:
            raise ValueError(f"indices element out of data bounds, idx={int(bad[0])}")
        self.served.append(len(x))
        return {"y": x * 2}

    def unload(self) -> None:
        pass


def _numbers(backend: Doubler, **retry: Any) -> ServedModel:
    settings = ModelSettings(
        name="m",
        version="3",
        backend="fake",
        artifact="unused.onnx",
        inputs=[{"name": "x", "datatype": "FP32", "shape": [2]}],
        retry={"backoff_ms": 0, "max_backoff_ms": 0, **retry},
    )
    info = backend.load(ModelSpec("m", settings.artifact), "cpu")
    return ServedModel(
        settings, [], [], [backend], info, dict(info.inputs), dict(info.outputs), ["cpu"]
    )


def _row(offset: int, poison: bool = False, deadline_ms: int | None = None) -> Envelope:
    x = np.array([-(offset + 1) if poison else offset, 0.5], np.float32)
    return Envelope(
        topic="in",
        partition=0,
        offset=offset,
        key=None,
        value=b"raw-%d" % offset,
        timestamp_ms=int(time.time() * 1000),
        consumed_at=time.monotonic(),
        request=Request(f"r{offset}", "m", {"x": x}, deadline_ms=deadline_ms),
    )


class _TopOfRange(random.Random):
    """Jitter that always draws the longest wait."""

    def uniform(self, a: float, b: float) -> float:
        return b


def _serve_once(
    graph: ServedModel, rows: list[Envelope], top_jitter: bool = False
) -> tuple[ModelRuntime, dict[int, Outcome]]:
    sink = Sink()
    metrics = Metrics()
    metrics.declare_model("m", ["cpu"])  # as the runner does
    runtime = ModelRuntime(graph, OutcomeEncoder(CODEC, "results", "dlq"), sink.emit, metrics)
    if top_jitter:
        runtime.recovery._rng = _TopOfRange()
    runtime.start()
    try:
        runtime.submit(rows)
        outcomes = sink.wait_for(len(rows))
        _wait_idle(runtime)
    finally:
        assert runtime.stop(5)
    return runtime, outcomes


def _count(runtime: ModelRuntime, name: str, **labels: str) -> float:
    value = runtime.metrics.registry.get_sample_value(name, {"model": "m", **labels})
    assert value is not None, name
    return value


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_poison_rows_alone_become_dead_letters_and_every_other_row_its_result(
    data: st.DataObject,
) -> None:
    n = data.draw(st.integers(1, 96), label="n")
    poison = data.draw(st.sets(st.integers(0, n - 1), max_size=min(n, ISOLATE)), label="poison")
    backend = Doubler()
    runtime, outcomes = _serve_once(_numbers(backend), [_row(i, i in poison) for i in range(n)])
    for offset, out in outcomes.items():
        if offset in poison:
            assert (out.topic, out.reason) == ("dlq", "inference_failed")
            letter = CODEC.decode_dead_letter(out.value)
            want = f"ValueError: indices element out of data bounds, idx={-(offset + 1)}"
            assert letter.error == want
            continue
        assert (out.topic, out.reason, out.status) == ("results", None, "OK")
        result = CODEC.decode_result(out.value)
        np.testing.assert_array_equal(result.outputs["y"], [2 * offset, 1.0])
        assert result.batch_size in backend.served  # the size of the run that served it
    # Every good row ran successfully exactly once; the hunt stays within ~2·k·log2(n).
    assert sum(backend.served) == n - len(poison)
    depth = math.ceil(math.log2(n)) if n > 1 else 0
    splits = _count(runtime, "kp_batch_splits_total")
    assert splits <= len(poison) * depth
    assert len(backend.batches) == 1 + 2 * splits
    if not poison:
        assert backend.batches == [n]
    elif n > 1 and len(poison) == 1:
        assert splits == depth or splits == depth - 1  # halves of odd sizes differ by one
    assert _count(runtime, "kp_inference_retries_total") == 0  # not a transient error
    # One compute observation per successful run, on instance 0.
    assert _count(runtime, "kp_compute_seconds_count", model_instance="0") == len(backend.served)


@pytest.mark.parametrize("n", [64, 256])
def test_a_model_failing_every_row_costs_a_bounded_number_of_runs(n: int) -> None:
    backend = Doubler()
    _, outcomes = _serve_once(_numbers(backend), [_row(i, True) for i in range(n)])
    assert {o.reason for o in outcomes.values()} == {"inference_failed"}
    budget = isolation_budget(n)
    assert budget < 2 * n - 1  # a full hunt would run every node of the halving tree
    depth = math.ceil(math.log2(n))
    assert len(backend.batches) <= 1 + budget + depth + 1
    assert backend.served == []


def test_a_transient_error_is_retried_on_the_same_batch_without_splitting() -> None:
    backend = Doubler(oom=lambda size, call: call <= 2)  # fails twice, then runs
    graph = _numbers(backend, backoff_ms=1, max_backoff_ms=4)
    runtime, outcomes = _serve_once(graph, [_row(i) for i in range(8)])
    assert backend.batches == [8, 8, 8]
    assert all(o.reason is None for o in outcomes.values())
    assert {CODEC.decode_result(o.value).batch_size for o in outcomes.values()} == {8}
    assert _count(runtime, "kp_inference_retries_total") == 2
    assert _count(runtime, "kp_batch_splits_total") == 0


def test_a_transient_error_that_persists_uses_its_attempts_then_splits() -> None:
    backend = Doubler(oom=lambda size, call: size > 2)  # only two rows fit in "memory"
    runtime, outcomes = _serve_once(_numbers(backend), [_row(i) for i in range(8)])
    assert backend.batches == [8, 8, 8, 4, 2, 2, 4, 2, 2]  # halves are not retried
    assert all(o.reason is None for o in outcomes.values())
    assert {CODEC.decode_result(o.value).batch_size for o in outcomes.values()} == {2}
    assert _count(runtime, "kp_inference_retries_total") == 2
    assert _count(runtime, "kp_batch_splits_total") == 3


def test_a_transient_error_alone_in_its_row_ends_as_a_dead_letter_naming_it() -> None:
    backend = Doubler(oom=lambda size, call: True)
    _, outcomes = _serve_once(_numbers(backend, max_attempts=2), [_row(0), _row(1)])
    assert backend.batches == [2, 2, 1, 1]
    for out in outcomes.values():
        assert CODEC.decode_dead_letter(out.value).error == f"RuntimeError: {OOM}"


def test_without_split_on_failure_attempts_are_used_then_the_batch_is_dead_letters() -> None:
    backend = Doubler(oom=lambda size, call: True)
    runtime, outcomes = _serve_once(
        _numbers(backend, split_on_failure=False), [_row(i) for i in range(4)]
    )
    assert backend.batches == [4, 4, 4]
    assert {o.reason for o in outcomes.values()} == {"inference_failed"}
    assert _count(runtime, "kp_batch_splits_total") == 0


def test_one_attempt_means_no_retry_and_an_unlisted_error_is_not_transient() -> None:
    once = Doubler(oom=lambda size, call: call == 1)
    _serve_once(_numbers(once, max_attempts=1), [_row(i) for i in range(4)])
    assert once.batches == [4, 2, 2]  # split at once, and the halves run
    unlisted = Doubler(oom=lambda size, call: call == 1)
    _serve_once(_numbers(unlisted, transient=["ResourceExhausted"]), [_row(i) for i in range(4)])
    assert unlisted.batches == [4, 2, 2]


def test_backoff_sleeps_are_not_counted_as_busy_time() -> None:
    backend = Doubler(oom=lambda size, call: call <= 2)
    graph = _numbers(backend, backoff_ms=100, max_backoff_ms=150)
    start = time.monotonic()
    runtime, _ = _serve_once(graph, [_row(0)], top_jitter=True)
    assert time.monotonic() - start >= 0.25  # slept 100 ms, then min(200, 150) ms
    assert backend.batches == [1, 1, 1]
    assert runtime.instance_stats()[0].busy_s < 0.1


@given(
    attempt=st.integers(1, 20),
    backoff=st.floats(0, 5000),
    ceiling=st.floats(0, 60000),
    seed=st.integers(0, 2**32),
)
def test_backoff_is_full_jitter_under_an_exponential_capped_ceiling(
    attempt: int, backoff: float, ceiling: float, seed: int
) -> None:
    retry = RetrySettings(backoff_ms=backoff, max_backoff_ms=max(backoff, ceiling))
    delay = retry.backoff_s(attempt, random.Random(seed))
    assert 0 <= delay <= min(retry.max_backoff_ms, backoff * 2 ** (attempt - 1)) / 1000.0


def test_backoff_spreads_over_its_whole_range() -> None:
    retry = RetrySettings(backoff_ms=100, max_backoff_ms=250)
    rng = random.Random(1)
    third = [retry.backoff_s(3, rng) for _ in range(2000)]  # ceiling min(400, 250) ms
    assert max(third) <= 0.25
    assert min(third) < 0.01  # full jitter: from ~0...
    assert max(third) > 0.24  # ...to the ceiling


def test_halving_cuts_rows_and_every_column_on_axis_zero() -> None:
    rows = [_row(i) for i in range(5)]
    columns: dict[str, Any] = {
        "x": np.arange(10).reshape(5, 2),
        "names": ["a", "b", "c", "d", "e"],  # a column of items of different shapes
    }
    left, right = halve(Prepared(Batch(rows, columns), 1.0, 2.0, []))
    assert [r.offset for r in left.batch.rows] == [0, 1]
    assert [r.offset for r in right.batch.rows] == [2, 3, 4]
    x_left, x_right = left.batch.columns["x"], right.batch.columns["x"]
    assert isinstance(x_left, np.ndarray)
    assert isinstance(x_right, np.ndarray)
    assert x_left.tolist() == [[0, 1], [2, 3]]
    assert x_right.flags.c_contiguous
    assert right.batch.columns["names"] == ["c", "d", "e"]
    assert (right.started, right.preprocess_ms, right.dead_letters) == (1.0, 2.0, [])


def test_isolation_budget_grows_with_log_n() -> None:
    assert isolation_budget(2) == 2 * ISOLATE
    assert isolation_budget(32) == 2 * ISOLATE * 5
    assert isolation_budget(1000) == 2 * ISOLATE * 10


def test_expired_requests_get_expired_results_and_the_rest_run() -> None:
    now = int(time.time() * 1000)
    rows = [
        _row(0, deadline_ms=now - 5_000),
        _row(1),
        _row(2, deadline_ms=now + 60_000),
        _row(3, deadline_ms=now - 1),
    ]
    backend = Doubler()
    _, outcomes = _serve_once(_numbers(backend), rows)
    assert backend.batches == [2]  # rows 1 and 2
    for offset in (0, 3):
        out = outcomes[offset]
        assert (out.topic, out.reason, out.status, out.model) == ("results", None, "EXPIRED", "m")
        result = CODEC.decode_result(out.value)
        assert (result.status, result.outputs, result.batch_size) == (Status.EXPIRED, {}, 0)
        assert (result.id, result.model_version, result.offset) == (f"r{offset}", "3", offset)
        assert result.error is not None
        assert result.error.startswith("deadline passed ")
        missed = float(result.error.split()[2])
        assert missed >= (5_000 if offset == 0 else 1)
    for offset in (1, 2):
        result = CODEC.decode_result(outcomes[offset].value)
        assert (result.status, result.batch_size) == (Status.OK, 2)


def test_a_batch_expired_entirely_never_reaches_the_model() -> None:
    past = int(time.time() * 1000) - 10
    backend = Doubler()
    _, outcomes = _serve_once(_numbers(backend), [_row(i, deadline_ms=past) for i in range(3)])
    assert backend.batches == []
    assert {o.status for o in outcomes.values()} == {"EXPIRED"}


def test_split_and_retry_counters_are_declared_at_zero() -> None:
    m = Metrics()
    m.declare_model("tiny", ["cpu"])
    text = generate_latest(m.registry).decode()
    assert 'kp_batch_splits_total{model="tiny"} 0.0' in text
    assert 'kp_inference_retries_total{model="tiny"} 0.0' in text


# -- failures outside the steps' own handling: dead letters, the next batch served ---------


class _ToTorch(StageBase):
    """Hands the model torch tensors, as a custom GPU stage would (on the CPU here)."""

    name = "to_torch"

    def signature(self, inputs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        return dict(inputs)

    def process(self, batch: Batch) -> Batch:
        import torch

        return batch.with_columns({"x": torch.from_numpy(np.asarray(batch.columns["x"]))})


class _TorchDoubler(Doubler):
    """``y = 2x`` on torch tensors; answers NumPy, as backends do."""

    def infer(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        import torch

        x = batch["x"]
        assert isinstance(x, torch.Tensor)
        self.batches.append(len(x))
        return {"y": (x * 2).numpy()}


def _started(graph: ServedModel) -> tuple[ModelRuntime, Sink]:
    sink = Sink()
    runtime = ModelRuntime(graph, OutcomeEncoder(CODEC, "results", "dlq"), sink.emit)
    runtime.start()
    return runtime, sink


def test_a_torch_tensor_column_is_served_and_counted() -> None:
    pytest.importorskip("torch")
    backend = _TorchDoubler()
    graph = _numbers(backend)
    graph.preprocess = [_ToTorch(None)]  # type: ignore[arg-type]
    runtime, sink = _started(graph)
    try:
        runtime.submit([_row(i) for i in range(3)])
        runtime.submit([_row(3)])
        outcomes = sink.wait_for(4, timeout=5)
        for offset, out in outcomes.items():
            assert out.reason is None
            np.testing.assert_array_equal(
                CODEC.decode_result(out.value).outputs["y"], [2 * offset, 1.0]
            )
        _wait_idle(runtime)
        assert backend.batches == [3, 1]
        real = runtime.metrics.registry.get_sample_value(
            "kp_padding_elements_total", {"model": "m", "kind": "real"}
        )
        assert real == 4 * 2  # every element that fed the model, from the tensor's shape
        assert runtime.fatal is None
    finally:
        assert runtime.stop(5)


def test_a_failure_past_preprocessing_ends_as_dead_letters_and_frees_the_instance() -> None:
    backend = Doubler()
    runtime, sink = _started(_numbers(backend))
    real = runtime._observe_prepared
    failures = DEPTH + 1  # more than the instance's slots: each failure must free its own

    def broken(*args: Any) -> None:
        if len(sink.outcomes) < failures:
            raise RuntimeError("bookkeeping bug")
        real(*args)

    runtime._observe_prepared = broken  # type: ignore[method-assign]
    try:
        for i in range(failures):
            runtime.submit([_row(i)])
            sink.wait_for(i + 1, timeout=5)
        runtime.submit([_row(failures), _row(failures + 1)])
        outcomes = sink.wait_for(failures + 2, timeout=5)
        _wait_idle(runtime)
    finally:
        assert runtime.stop(5)
    for i in range(failures):
        assert (outcomes[i].topic, outcomes[i].reason) == ("dlq", "preprocess_failed")
        letter = CODEC.decode_dead_letter(outcomes[i].value)
        assert letter.error == "RuntimeError: bookkeeping bug"
    assert [outcomes[i].reason for i in (failures, failures + 1)] == [None, None]
    assert backend.batches == [2]
    assert runtime.instance_stats()[0].batches == 1
    assert runtime.fatal is None


def test_rows_already_answered_are_not_answered_again_when_their_batch_fails() -> None:
    runtime, sink = _started(_numbers(Doubler()))

    def broken(*args: Any) -> None:
        raise RuntimeError("bookkeeping bug")

    runtime._observe_prepared = broken  # type: ignore[method-assign]
    past = int(time.time() * 1000) - 10
    try:
        runtime.submit([_row(0, deadline_ms=past), _row(1), _row(2)])
        outcomes = sink.wait_for(3, timeout=5)  # asserts one outcome per row
        _wait_idle(runtime)
    finally:
        assert runtime.stop(5)
    assert outcomes[0].status == "EXPIRED"
    assert [outcomes[i].reason for i in (1, 2)] == ["preprocess_failed", "preprocess_failed"]


def test_a_failure_past_recovery_ends_as_dead_letters_and_the_next_batch_is_served() -> None:
    backend = Doubler()
    runtime, sink = _started(_numbers(backend))
    real = runtime.recovery.serve
    calls: list[int] = []

    def broken(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("recovery bug")
        return real(*args)

    runtime.recovery.serve = broken  # type: ignore[method-assign]
    try:
        runtime.submit([_row(0), _row(1)])
        runtime.submit([_row(2)])
        outcomes = sink.wait_for(3, timeout=5)
        _wait_idle(runtime)
    finally:
        assert runtime.stop(5)
    for i in (0, 1):
        assert (outcomes[i].topic, outcomes[i].reason) == ("dlq", "inference_failed")
        assert CODEC.decode_dead_letter(outcomes[i].value).error == "RuntimeError: recovery bug"
    assert outcomes[2].reason is None
    assert runtime.fatal is None


def test_outcomes_that_cannot_be_handed_over_stop_the_runtime_fatally() -> None:
    def refusing(outcomes: list[Outcome]) -> None:
        raise RuntimeError("the caller is gone")

    runtime = ModelRuntime(_numbers(Doubler()), OutcomeEncoder(CODEC, "r", "dlq"), refusing)
    runtime.start()
    try:
        runtime.submit([_row(0)])
        _wait_idle(runtime)
        assert runtime.fatal == "model m: emit refused 1 outcomes: RuntimeError: the caller is gone"
    finally:
        assert runtime.stop(5)


def test_dead_letters_that_cannot_be_made_stop_the_runtime_fatally() -> None:
    class Broken(OutcomeEncoder):
        def dead_letter(self, *args: Any, **kwargs: Any) -> Outcome:
            raise ValueError("cannot encode")

    sink = Sink()
    runtime = ModelRuntime(_numbers(Doubler()), Broken(CODEC, "r", "dlq"), sink.emit)
    runtime.start()
    try:
        runtime.submit([_row(0, poison=True), _row(1, poison=True)])
        _wait_idle(runtime)
        assert runtime.fatal is not None
        assert "2 requests left without an outcome: ValueError: cannot encode" in runtime.fatal
    finally:
        assert runtime.stop(5)


def test_a_worker_thread_that_dies_stops_the_runtime_fatally_and_stop_returns() -> None:
    runtime, _ = _started(_numbers(Doubler()))

    def broken(*args: Any) -> None:
        raise RuntimeError("bookkeeping bug")

    def also_broken(*args: Any) -> None:
        raise RuntimeError("handler bug")

    runtime._observe_prepared = broken  # type: ignore[method-assign]
    runtime._abandon = also_broken  # type: ignore[method-assign]
    runtime.submit([_row(0)])
    deadline = time.monotonic() + 5
    while runtime.fatal is None:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert runtime.fatal == "model m: pre-m-0 died: RuntimeError: handler bug"
    assert runtime.stop(5)


def test_with_the_device_scheduler_every_batch_takes_a_slot_and_gives_it_back() -> None:
    """Served, poisoned (isolated by halving) and failed batches all return their slots."""
    graph = _graph([FakeBackend(), FakeBackend()])
    metrics = Metrics()
    settings = SchedulingSettings(enabled=True, concurrency=1)
    scheduler = DeviceScheduler.for_graph(settings, [graph], metrics)
    assert scheduler is not None
    sink = Sink()
    runtime = ModelRuntime(
        graph, OutcomeEncoder(CODEC, "results", "dlq"), sink.emit, metrics, scheduler
    )
    runtime.start()
    try:
        for i in range(6):
            image = _jpeg(BLACK) if i == 3 else _jpeg(RED)  # a poison row in batch 3
            runtime.submit([_env(2 * i, image), _env(2 * i + 1, b"not a jpeg")])
        sink.wait_for(12)
        _wait_idle(runtime)
    finally:
        assert runtime.stop(5)
    assert scheduler._lanes["cpu"].policy.total == 0
    assert metrics.scheduler_grants.labels("m", "cpu")._value.get() == 6
    assert metrics.scheduler_running.labels("cpu")._value.get() == 0
    assert metrics.scheduler_queued.labels("m")._value.get() == 0


class Gated(Doubler):
    """A Doubler whose first run waits for the test to open the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.first: list[float] = []  # x[0] of each batch's first row, in run order

    def infer(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.first:
            self.gate.wait(5)
        self.first.append(float(batch["x"][0, 0]))
        return super().infer(batch)


def test_a_higher_priority_batch_of_the_model_overtakes_its_queued_ones() -> None:
    """Batches wait for the device in priority order, not in the order they came."""
    backend = Gated()
    graph = _numbers(backend)
    settings = SchedulingSettings(enabled=True, concurrency=1)
    scheduler = DeviceScheduler.for_graph(settings, [graph], Metrics())
    sink = Sink()
    runtime = ModelRuntime(graph, OutcomeEncoder(CODEC, "r", "dlq"), sink.emit, None, scheduler)
    runtime.start()
    try:
        runtime.submit([_row(0)])  # takes the device's one slot, and waits at the gate
        deadline = time.monotonic() + 5
        while scheduler is not None and scheduler._lanes["cpu"].policy.total == 0:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        runtime.submit([_row(1)])
        runtime.submit([_row(2)])
        runtime.submit([_row(3)], None, RequestClass(9, None))
        time.sleep(0.05)  # all three offered to the device
        backend.gate.set()
        sink.wait_for(4)
    finally:
        assert runtime.stop(5)
    assert backend.first == [0, 3, 1, 2]
