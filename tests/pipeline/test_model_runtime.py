"""ModelRuntime with real stages and an in-memory backend: every row ends as one outcome."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytest
from PIL import Image

from backends.base import ModelInfo, ModelSpec
from pipeline.config import ModelSettings
from pipeline.graph import ModelGraph
from pipeline.messages import Envelope, Request
from pipeline.model_runtime import DEPTH, ModelRuntime
from pipeline.outcomes import Outcome, OutcomeEncoder
from pipeline.tensors import TensorSpec
from schemas.codec import AvroCodec
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
    """Per-channel mean brightness as logits; refuses any batch holding a black image."""

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


def _graph(
    backends: list[Any], pre: list[Stage] | None = None, post: list[Stage] | None = None
) -> ModelGraph:
    settings = ModelSettings(
        name="m",
        version="3",
        backend="fake",
        artifact="unused.onnx",
        instances=len(backends),
        inputs=[{"name": "image", "datatype": "BYTES", "shape": [1]}],
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
    return ModelGraph(
        settings, pre, post, backends, info, {"image": TensorSpec("BYTES", (1,))}, outputs, devices
    )


@pytest.fixture
def serve() -> Iterator[Any]:
    started: list[ModelRuntime] = []

    def start(graph: ModelGraph) -> tuple[ModelRuntime, Sink]:
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


def test_a_failing_inference_dead_letters_every_row_of_its_batch_only(serve: Any) -> None:
    runtime, sink = serve(_graph([FakeBackend(), FakeBackend()]))
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
        out = outcomes[offset]
        assert out.topic == "dlq"
        letter = CODEC.decode_dead_letter(out.value)
        assert (letter.reason, letter.id, letter.model) == ("inference_failed", f"r{offset}", "m")
        assert letter.error == "RuntimeError: CUDA out of memory (pretend)"
        assert (letter.topic, letter.partition, letter.offset) == ("in", 2, offset)
        assert letter.payload == b"raw-%d" % offset
        assert dict(out.headers or [])["kp.reason"] == b"inference_failed"
    assert CODEC.decode_result(outcomes[3].value).outputs["classes"].tolist() == [1]


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
