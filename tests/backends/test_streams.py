"""The ordering rules of a GPU instance (`backends.streams`), on a recording fake of CUDA.

Each test plays what the instance's threads queue (preprocessing kernels on the
preprocess stream, copies and the model on the inference stream) and checks the order
the pipeline put around them: inference after the batch's own ``ready`` event and not
after later preprocessing; one host wait per batch, on ``done``; buffers reused only
after the event that released them.
"""

from __future__ import annotations

from typing import Any

import pytest
from gpu_fakes import RecordingStream, Timeline

from backends.streams import BufferRing, GpuPipeline


@pytest.fixture
def timeline() -> Timeline:
    return Timeline()


@pytest.fixture
def gpu(timeline: Timeline) -> GpuPipeline:
    return GpuPipeline(timeline.stream("pre"), timeline.stream("infer"))


def _preprocess(gpu: GpuPipeline, n: int) -> Any:
    """What the preprocess thread does for batch ``n``: stages, then its ``ready`` event."""
    pre = gpu.preprocess
    assert isinstance(pre, RecordingStream)
    pre.launch(f"pre:{n}")
    return gpu.preprocessed()


def _infer(gpu: GpuPipeline, n: int, ready: Any) -> None:
    """What the infer thread does for batch ``n``: hand over, then copies and compute."""
    gpu.hand_over(ready)
    with gpu.batch():
        infer = gpu.inference
        assert isinstance(infer, RecordingStream)
        infer.launch(f"h2d:{n}")
        infer.launch(f"model:{n}")
        infer.launch(f"d2h:{n}")


def test_inference_waits_on_its_batchs_ready_event_and_not_on_later_preprocessing(
    timeline: Timeline, gpu: GpuPipeline
) -> None:
    ready0 = _preprocess(gpu, 0)
    ready1 = _preprocess(gpu, 1)  # the next batch is preprocessed before batch 0 infers
    _infer(gpu, 0, ready0)
    _infer(gpu, 1, ready1)

    for n, ready in enumerate((ready0, ready1)):
        waited = timeline.waited_before("infer", f"h2d:{n}")
        assert ready.event.name in waited  # queued behind its own preprocessing
        assert timeline.covers(ready.event.name, f"pre:{n}")
    # batch 0 waits on an event recorded before batch 1's preprocessing: not on it
    assert not timeline.covers(ready0.event.name, "pre:1")
    assert timeline.waited_before("infer", "h2d:0") == {ready0.event.name}
    # and nothing on the host waited for preprocessing
    assert all(not name.startswith("pre") for name in timeline.host_waits())


def test_each_batch_makes_one_host_wait_on_the_event_after_its_copies_out(
    timeline: Timeline, gpu: GpuPipeline
) -> None:
    for n in range(3):
        _infer(gpu, n, _preprocess(gpu, n))
    assert gpu.host_waits == 3
    waits = timeline.host_waits()
    assert len(waits) == 3
    for n, done in enumerate(waits):
        assert timeline.covers(done, f"d2h:{n}")  # recorded after the batch's last copy
        assert timeline.events[done].stream == "infer"
    assert not [e for e in timeline.log if e[0] == "stream_sync"]  # never a whole stream


def test_without_a_handed_over_event_inference_waits_late_but_never_early(
    timeline: Timeline, gpu: GpuPipeline
) -> None:
    """The warm-up batch has no ``ready``: an event recorded then covers all preprocessing."""
    _preprocess(gpu, 0)
    with gpu.batch():
        assert isinstance(gpu.inference, RecordingStream)
        gpu.inference.launch("model:warm")
    (waited,) = timeline.waited_before("infer", "model:warm")
    assert timeline.covers(waited, "pre:0")


def test_a_handed_over_event_is_used_once(timeline: Timeline, gpu: GpuPipeline) -> None:
    ready = _preprocess(gpu, 0)
    _infer(gpu, 0, ready)
    with gpu.batch():  # a later batch nobody handed an event for
        assert isinstance(gpu.inference, RecordingStream)
        gpu.inference.launch("model:next")
    assert ready.event.name not in timeline.waited_before("infer", "model:next")


def test_a_failing_batch_still_waits_for_its_copies_and_releases_its_buffers(
    timeline: Timeline, gpu: GpuPipeline
) -> None:
    ring = BufferRing(bytearray, depth=1)
    infer = gpu.inference
    assert isinstance(infer, RecordingStream)

    def failing_batch() -> None:
        with gpu.batch() as run:
            run.take(ring, 8)
            infer.launch("h2d:0")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        failing_batch()
    assert gpu.host_waits == 1
    (done,) = timeline.host_waits()
    assert timeline.covers(done, "h2d:0")
    before = len(timeline.log)
    ring.take(8)  # free again: the host waited for `done`
    assert timeline.log[before:] == []


def test_a_buffer_held_by_a_batch_is_free_for_the_next_without_another_wait(
    timeline: Timeline, gpu: GpuPipeline
) -> None:
    ring = BufferRing(bytearray, depth=1)
    taken = []
    for n in range(3):
        gpu.hand_over(_preprocess(gpu, n))
        with gpu.batch() as run:
            taken.append(run.take(ring, 16))
    assert taken[0] is taken[1] is taken[2]  # one pinned buffer, reused
    assert gpu.host_waits == 3  # the batches' own `done` waits, nothing more


def test_a_device_writer_reuses_a_buffer_only_after_a_stream_wait_on_its_release(
    timeline: Timeline,
) -> None:
    writer, reader = timeline.stream("pre"), timeline.stream("infer")
    ring = BufferRing(lambda need: object(), depth=2)
    slots = []
    for n in range(3):
        index, buf = ring.take(None, writer=writer)
        writer.launch(f"write:{n}")
        reader.launch(f"read:{n}")
        ring.release(index, reader.record())
        slots.append((index, buf))
    assert [i for i, _ in slots] == [0, 1, 0]  # two slots in turn
    assert slots[0][1] is slots[2][1]
    # the third write reuses slot 0: it waits on the event after read 0, on the device
    assert timeline.waited_before("pre", "write:2") == {"infer#1"}
    assert timeline.covers("infer#1", "read:0")
    assert timeline.waited_before("pre", "write:1") == set()  # a fresh slot waits for nothing
    assert timeline.host_waits() == []


def test_a_host_writer_waits_for_a_release_only_while_it_is_pending(timeline: Timeline) -> None:
    reader = timeline.stream("pre")
    host_waits = []
    ring = BufferRing(lambda need: object(), depth=1, on_host_wait=lambda: host_waits.append(1))
    ring.take(None)
    reader.launch("h2d:0")
    first = reader.record()
    ring.release(0, first)
    ring.take(None)  # the copy out of it may still run: the host must wait
    assert timeline.host_waits() == [first.name]
    assert host_waits == [1]
    second = reader.record()
    ring.release(0, second)
    second.complete()  # the GPU finished it: reuse without a wait
    ring.take(None)
    assert timeline.host_waits() == [first.name]


def test_a_buffer_too_small_for_the_batch_is_replaced() -> None:
    ring = BufferRing(bytearray, depth=1, fits=lambda buf, need: len(buf) >= need)
    small = ring.take(4)[1]
    assert ring.take(2)[1] is small
    assert len(ring.take(64)[1]) == 64


def test_a_ring_needs_a_slot() -> None:
    with pytest.raises(ValueError, match="at least one slot"):
        BufferRing(bytearray, depth=0)
