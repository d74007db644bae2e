"""Each GPU instance as a small GPU pipeline: two streams, events between them, one host wait.

The ordering rules of every GPU backend and GPU stage are written here, where the
streams are made, next to the small objects that keep them.

The ordering rules
------------------
Streams. A model instance on ``cuda:N`` owns two CUDA streams, both made for it
(`backends.devices.instance_stream`, never torch's pool of 32):

- the *preprocess stream*: every device stage of the instance queues its work there
  (``normalize_nchw``'s kernel and its host→device copy, ``dali_image``'s pipeline run,
  ``cast``/``scale``/``pad_crop`` on device columns); the graph hands it to the stages as
  `stages.base.StageContext.stream`. The instance's preprocess thread is its only user.
- the *inference stream*: the backend queues there the copies of host inputs to the
  device (from pinned buffers), the model's compute, and the copies of outputs to pinned
  host buffers. The instance's infer thread is its only user.

Events, per batch N:

1. ``ready[N]`` is recorded on the preprocess stream after batch N's stages
   (`GpuPipeline.preprocessed`, called by the preprocess thread; it travels with the
   batch). The inference stream waits on it (``cudaStreamWaitEvent``) before anything of
   batch N is queued there (`GpuPipeline.batch`). The host does not wait: batch N+1's
   preprocessing is queued on the preprocess stream while the GPU still infers batch N,
   and batch N's inference never waits for batch N+1's preprocessing (it waits on an
   event, not on the stream).
2. ``done[N]`` is recorded on the inference stream after batch N's device→host copies,
   when `GpuPipeline.batch` ends. The host waits on it, once: the one host
   synchronization of a batch, just before its results are read on the host. It waits
   for this instance's batch only: never a stream's or the device's whole queue.
3. Release events. A pinned host buffer an instance reuses batch after batch is held
   by one batch at a time (`BufferRing`) and released with the event recorded when its
   last consumer's work was queued (``done[N]`` for the backends' buffers; the event
   after the copy for a stage's pinned upload buffer). (A device buffer that one stream
   both writes and reads, TensorRT's output buffers, needs no event: stream order.)
   It is written again only after that event: by the device after a stream wait on it
   (no host wait), by the host (a CPU copy into pinned memory) once the event has
   completed. ``done[N]`` completed when the host waited on it, so a backend's buffers
   are free again without a further wait; a stage's upload buffer is two batches old
   when it is reused (two slots), and the host waits only if that copy is still running.
   Device arrays the preprocess stages allocate from CuPy's pool are freed when the
   batch's columns are dropped, after ``done[N]`` was waited for, so the pool gives
   their memory to batch N+2's preprocessing only after its consumer finished with it.

Where the host waits, and why:

- once per batch on ``done[N]`` (every backend), because the results go to Kafka from
  the host;
- TensorFlow, which takes no external stream or event (``tf.experimental.dlpack`` names
  no stream and TF computes on its own streams), also waits on ``ready[N]`` on the host
  at the hand-off, so TF never reads a column before it is written, and its output
  copy to NumPy is TF's own synchronous one;
- ONNX Runtime's ``copy_outputs_to_cpu`` is a synchronous copy of its own after the
  wait on ``done[N]`` (its Python API has no asynchronous copy into our pinned memory);
- a stage's pinned upload buffer, only in the rare case described in 3.

A known cost: a CuPy column handed to the torch backend through DLPack is asked for with
the inference stream named; CuPy then makes that stream wait on an event on the infer
thread's current CuPy stream (the legacy default one), which holds none of our work but
may hold other code's. Harmless for correctness; a small stall at worst.

Overlap of batch N's copy to the host with batch N+1. A backend with ``submit`` (torch,
TensorRT; not yet ONNX Runtime or TensorFlow, which wait for each batch before the next
is queued) queues a batch without the host wait (``batch(defer_wait=True)``) and returns a
``collect`` that waits on ``done[N]``. When batch N+1 is already preprocessed, the
instance's infer thread queues it before it collects batch N
(`pipeline.serving.runtime`), so batch N's device→host copy overlaps batch N+1's
copies in and compute, and the GPU does not idle while the host postprocesses batch N.
Still one host wait per batch. The pinned buffers have two slots for this: batch N+1
writes the other one, and batch N+2 (queued only after batch N was collected) finds
its slot's ``done[N]`` complete.

The ordering logic is tested on the CPU with a recording fake of streams and events
(tests/gpu_fakes.py). The library calls it makes (CuPy ``Event.record``,
``Stream.wait_event``, ``Event.synchronize``/``done``; torch ``Event.record``,
``Stream.wait_event``, ``Event.query``) were checked against the CuPy and PyTorch
documentation; they run on a GPU only in the ``gpu``-marked tests (make gpu-check), and
no GPU was lent to this work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from schemas.streams import BufferRing, Event, LibraryEvent, Stream

__all__ = ["BufferRing", "Event", "GpuPipeline", "Ready", "Stream"]


@dataclass(frozen=True, slots=True)
class Ready:
    """A batch's ``ready`` event: its preprocessing, recorded on the preprocess stream."""

    event: Event


@dataclass(slots=True)
class _Run:
    """What one batch holds on the inference stream until its ``done`` event."""

    stream: Stream
    held: list[tuple[BufferRing, int]] = field(default_factory=list)
    done: Event | None = None  # recorded when the batch's work is all queued

    def take(self, ring: BufferRing, need: Any, *, host_writes: bool = True) -> Any:
        """A buffer of ``ring`` for this batch, released with the batch's ``done`` event."""
        index, buffer = ring.take(need, writer=None if host_writes else self.stream)
        self.held.append((ring, index))
        return buffer


class GpuPipeline:
    """The two streams of one GPU instance and the events between them (rules above).

    `preprocessed` is called by the instance's preprocess thread after each batch's
    stages; `hand_over` and `batch` by its infer thread. ``host_waits`` counts the
    host's waits on the inference side (the tests hold it to one per batch).
    """

    def __init__(self, preprocess: Stream, inference: Stream) -> None:
        self.preprocess = preprocess
        self.inference = inference
        self.host_waits = 0
        self._ready: Ready | None = None

    def preprocessed(self) -> Ready:
        """Mark the end of a batch's preprocessing on the preprocess stream (no host wait)."""
        return Ready(self.preprocess.record())

    def hand_over(self, ready: Ready | None) -> None:
        """The ``ready`` event of the batch the next `batch` runs."""
        self._ready = ready

    def ready_event(self) -> Event:
        """The handed-over ``ready`` event, taken once.

        Without one (the warm-up batch, a caller that did not hand one over) an event
        recorded now on the preprocess stream stands in: it covers everything queued
        there so far, the batch's preprocessing included, so it is late but never early.
        """
        ready, self._ready = self._ready, None
        return ready.event if ready is not None else self.preprocess.record()

    def wait_ready_on_host(self) -> None:
        """For a runtime that cannot wait on an event on its streams (TensorFlow)."""
        event = self.ready_event()
        self.host_waits += 1
        event.synchronize()

    @contextlib.contextmanager
    def batch(self, *, defer_wait: bool = False) -> Iterator[_Run]:
        """One batch on the inference stream, from the wait on ``ready`` to ``done``.

        On entry the inference stream waits on the batch's ``ready`` event. The caller
        queues its copies and compute on ``inference`` and takes reusable buffers through
        the yielded run. On exit ``done`` is recorded (``run.done``) and the buffers are
        released with it; then the host waits on it, the batch's one host
        synchronization, unless ``defer_wait``: the caller then waits later with
        `wait`, after queueing the next batch. After an error the host always waits
        (copies may still be in flight into the buffers).
        """
        self.inference.wait(self.ready_event())
        run = _Run(self.inference)
        queued = False
        try:
            yield run
            queued = True
        finally:
            run.done = self.inference.record()
            for ring, index in run.held:
                ring.release(index, run.done)
            if not (queued and defer_wait):
                self.wait(run.done)

    def wait(self, done: Event) -> None:
        """The host waits for a batch's ``done`` event (counted in ``host_waits``)."""
        self.host_waits += 1
        done.synchronize()


def cupy_events(stream: Any, device: int) -> tuple[Callable[[], Event], Callable[[Event], None]]:
    """``record`` and ``wait`` for a ``cupy.cuda.Stream`` on ``device`` (CuPy's documented API).

    Events are made on the stream's device (an event records only on its own device's
    streams), without timing data (``disable_timing``: cheaper to record).
    """
    import cupy

    def record() -> Event:
        with cupy.cuda.Device(device):
            event = cupy.cuda.Event(disable_timing=True)
        event.record(stream)
        return LibraryEvent(event)

    def wait(event: Event) -> None:
        stream.wait_event(_raw(event))

    return record, wait


def torch_events(stream: Any) -> tuple[Callable[[], Event], Callable[[Event], None]]:
    """``record`` and ``wait`` for a ``torch.cuda`` stream (PyTorch's documented API)."""
    import torch

    def record() -> Event:
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(stream)
        return LibraryEvent(event)

    def wait(event: Event) -> None:
        stream.wait_event(_raw(event))

    return record, wait


def _raw(event: Event) -> Any:
    """The library's own event behind ours (each instance's streams use one library)."""
    return getattr(event, "raw", event)
