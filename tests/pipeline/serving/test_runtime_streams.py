"""ModelRuntime on a GPU instance (faked): its two threads keep the streams' ordering rules.

The preprocess thread runs the stages on the instance's preprocess stream and marks each
batch's end with a ``ready`` event; the infer thread hands that event to the backend,
whose inference stream waits on it (`backends.streams`). Recorded with the fake streams
of tests/gpu_fakes.py; the instance's threads really run, so batch N+1 may be
preprocessed while batch N waits to infer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
from gpu_fakes import RecordingStream, Timeline

from backends.base import ModelInfo, ModelSpec
from backends.streams import GpuPipeline
from pipeline.config.topology import ModelSettings
from pipeline.serving.graph import ServedModel
from pipeline.serving.outcomes import Outcome, OutcomeEncoder
from pipeline.serving.runtime import ModelRuntime
from schemas.codec import AvroCodec
from schemas.messages import Envelope, Request, Status
from schemas.tensors import TensorSpec
from stages.base import Batch, StageBase, StageContext, StageParams


class _OnPreprocessStream(StageBase):
    """A device stage: queues one launch per batch on the stream it was set up with."""

    Params: ClassVar[type[StageParams]] = StageParams
    name = "gpu_stage"

    def setup(self, ctx: StageContext) -> None:
        self.stream = ctx.stream

    def signature(self, inputs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        return dict(inputs)

    def process(self, batch: Batch) -> Batch:
        self.stream.launch(f"pre:{_batch_id(batch.columns['x'])}")
        return batch


class _GpuDoubler:
    """``y = 2x`` on a faked GPU instance; its model run is one launch on its stream."""

    def __init__(self, timeline: Timeline) -> None:
        self.timeline = timeline
        self.poison: set[int] = set()
        self.waiting: Callable[[], int] = lambda: 1
        self.gpu = GpuPipeline(timeline.stream("pre"), timeline.stream("infer"))
        self.preprocess_stream = self.gpu.preprocess
        self.stream = self.gpu.inference

    def load(self, spec: ModelSpec, device: str) -> ModelInfo:
        return ModelInfo({"x": TensorSpec("FP32", (2,))}, {"y": TensorSpec("FP32", (2,))}, None)

    def infer(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray[Any, Any]]:
        return self.submit(batch)()

    def submit(self, batch: Mapping[str, Any]) -> Callable[[], dict[str, Any]]:
        """As the torch backend: queue the batch, and wait for it only in ``collect``."""
        x = np.asarray(batch["x"])
        n = _batch_id(x)
        if n == 0:
            # Hold batch 0 until batch 1 is preprocessed, so an event recorded now on the
            # preprocess stream (instead of batch 0's own) would cover batch 1's work too,
            # and batch 1 is in the instance's inbox when batch 0 is to be collected.
            deadline = time.monotonic() + 5
            while self.waiting() < 1:
                assert time.monotonic() < deadline, "batch 1 was never preprocessed"
                time.sleep(0.001)
        if n in self.poison:
            raise RuntimeError(f"batch {n} refused")
        assert isinstance(self.stream, RecordingStream)
        with self.gpu.batch(defer_wait=True) as run:
            self.stream.launch(f"model:{n}")
            self.stream.launch(f"d2h:{n}")
        done = run.done
        assert done is not None

        def collect() -> dict[str, Any]:
            self.gpu.wait(done)
            return {"y": x * 2}

        return collect

    def unload(self) -> None:
        pass


def _batch_id(x: Any) -> int:
    return int(np.asarray(x)[0, 0])


def _row(offset: int, batch: int) -> Envelope:
    return Envelope(
        topic="in",
        partition=0,
        offset=offset,
        key=None,
        value=b"",
        timestamp_ms=int(time.time() * 1000),
        consumed_at=time.monotonic(),
        request=Request(f"r{offset}", "m", {"x": np.array([batch, offset], np.float32)}),
    )


def _serve(backend: _GpuDoubler, batches: int) -> list[Outcome]:
    """Serve ``batches`` batches of two rows on one faked GPU instance; the outcomes."""
    stage = _OnPreprocessStream(StageParams())
    stage.setup(StageContext("m", "cuda:0", backend.preprocess_stream))
    settings = ModelSettings(
        name="m",
        version="1",
        backend="fake",
        artifact="unused.onnx",
        inputs=[{"name": "x", "datatype": "FP32", "shape": [2]}],
        retry={"backoff_ms": 0, "max_backoff_ms": 0},
    )
    info = backend.load(ModelSpec("m", settings.artifact), "cuda:0")
    graph = ServedModel(
        settings, [stage], [], [backend], info, dict(info.inputs), dict(info.outputs), ["cuda:0"]
    )
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def emit(batch: list[Outcome]) -> None:
        with lock:
            outcomes.extend(batch)

    runtime = ModelRuntime(graph, OutcomeEncoder(AvroCodec(), "results", "dlq"), emit)
    # Batch 0 is held until batch 1 waits in the instance's inbox (preprocessed).
    backend.waiting = runtime._instances[0].inbox.qsize
    runtime.start()
    try:
        for b in range(batches):
            runtime.submit([_row(2 * b, b), _row(2 * b + 1, b)])
        deadline = time.monotonic() + 10
        while runtime.busy and time.monotonic() < deadline:
            time.sleep(0.001)
    finally:
        assert runtime.stop(5)
    assert len(outcomes) == 2 * batches
    return outcomes


def test_each_batch_infers_after_its_own_ready_event_with_one_host_wait() -> None:
    timeline = Timeline()
    backend = _GpuDoubler(timeline)
    batches = 6
    outcomes = _serve(backend, batches)
    assert {o.reason for o in outcomes} == {None}
    codec = AvroCodec()
    assert {codec.decode_result(o.value).status for o in outcomes} == {Status.OK}

    assert backend.gpu.host_waits == batches  # one per batch
    assert all(name.startswith("infer#") for name in timeline.host_waits())
    for b in range(batches):
        (ready,) = timeline.waited_before("infer", f"model:{b}")
        assert timeline.covers(ready, f"pre:{b}")  # after its own preprocessing
        later = [f"pre:{n}" for n in range(b + 1, batches)]
        assert not any(timeline.covers(ready, label) for label in later)  # not after later


def test_the_next_batch_is_queued_before_the_host_waits_for_this_one() -> None:
    """Batch 0's copy to the host overlaps batch 1: batch 1 is queued before the wait."""
    timeline = Timeline()
    backend = _GpuDoubler(timeline)
    _serve(backend, 3)
    first_wait = timeline.index(("host_wait", timeline.host_waits()[0]))
    assert timeline.covers(timeline.host_waits()[0], "d2h:0")  # the wait is batch 0's
    assert timeline.index(("launch", "infer", "model:1")) < first_wait
    assert backend.gpu.host_waits == 3


def test_a_batch_whose_queueing_fails_is_served_through_recovery() -> None:
    timeline = Timeline()
    backend = _GpuDoubler(timeline)
    backend.poison = {1}  # refused every time: its rows become dead letters, alone
    outcomes = _serve(backend, 3)
    reasons = {o.envelope.offset: o.reason for o in outcomes}
    assert reasons == {
        0: None,
        1: None,
        2: "inference_failed",
        3: "inference_failed",
        4: None,
        5: None,
    }
