"""Running one model's batches off the caller's thread: preprocess, infer, postprocess.

Per model, a dispatch thread takes routed batches and picks the least-busy instance (the
one with the fewest batches queued or running; ties rotate), waiting while every
instance holds `DEPTH` batches. Each instance (its own backend session, device and, on a
GPU, its own CUDA stream) is a small pipeline of two threads: one preprocesses its
batches, the other runs the model on them. So preprocessing of the next batch overlaps
inference of the current one, the instances' preprocessing overlaps too (decoding and
resizing release the GIL), and a front door that waits for each batch (the Faust
adapter) still gets its batches preprocessed side by side. On a GPU the two threads
queue on the instance's two CUDA streams, ordered by one event per batch (the
preprocess thread records it, the model's stream waits on it: `backends.streams`), so
the GPU overlaps them too; and when the next batch is ready, the infer thread queues it
on the GPU before it waits for the one before (`_queueing_loop`), so that one's copy to
the host overlaps it. CPU instances have no streams and none of this. Preprocessing
runs only a little ahead of the models. Outcomes (encoded results and dead letters) go back through
the batch's ``emit``.

Long because its three kinds of thread share the instance slots, the device scheduler's
grants and one rule (every row ends as exactly one outcome); apart, each thread's
failure handling would sit far from the slots it must give back.

This is the one serving core: the Kafka loop (`pipeline.engine.loop`) and the Faust
adapter (`pipeline.integrations.faust`) both submit batches here, so deadlines, retries
and poison isolation behave the same behind every front door.

Nothing here raises out of a thread; every row ends as one outcome:

- A request whose ``deadline_ms`` has passed when its batch reaches preprocessing gets an
  EXPIRED result and never runs (`pipeline.serving.steps.expire`): its client has stopped
  waiting, and running it would only delay the requests behind it.
- A preprocessing failure (a stage that raised) makes dead letters of its batch.
- A failing model run is retried, then its poison is isolated by halving
  (`pipeline.serving.recovery`).
- Anything else that fails while a thread handles a batch (a bug in the bookkeeping
  around the steps, say) makes dead letters of the batch's rows that have no outcome yet
  (``preprocess_failed`` before the model, ``inference_failed`` after), frees its instance
  slot, and the thread goes on with the next batch.

What cannot end that way, outcomes the caller's ``emit`` refused or dead letters that
cannot be made, sets `ModelRuntime.fatal`: requests are then left without an outcome, so
the caller must stop (the Kafka loop reads it in ``Replica._failure``) rather than wait
for them forever.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from backends.base import Backend
from pipeline.observability.metrics import Metrics
from pipeline.serving.batch_rows import ages
from pipeline.serving.graph import ServedModel
from pipeline.serving.outcomes import Outcome, OutcomeEncoder
from pipeline.serving.recovery import Recovery
from pipeline.serving.scheduler import DeviceScheduler, RequestClass
from pipeline.serving.steps import Prepared, Started, complete, expire, finish, prepare, start
from schemas.errors import describe
from schemas.messages import Envelope

__all__ = ["DEPTH", "Emit", "InstanceStats", "ModelRuntime"]

log = logging.getLogger(__name__)

Emit = Callable[[list[Outcome]], None]
"""Where a batch's outcomes go; called from the runtime's threads, maybe several times."""

DEPTH = 2
"""Batches one instance may hold: the one it runs and the next one, ready."""

_REOFFER_S = 0.005
"""While the device scheduler admits none of a model's batches, how often it is offered
what has arrived since (a request of higher priority must not wait behind the offer)."""

_Work = tuple[list[Envelope], Emit, RequestClass | None]
"""A submitted batch: its rows, where its outcomes go, its requests' class."""


@dataclass(slots=True)
class InstanceStats:
    """What one model instance did: the evidence that work was spread across instances."""

    index: int
    device: str
    batches: int = 0
    rows: int = 0
    busy_s: float = 0.0


@dataclass(slots=True)
class _Instance:
    backend: Backend
    stats: InstanceStats
    raw: queue.SimpleQueue[tuple[list[Envelope], Emit] | None]  # to preprocess
    inbox: queue.SimpleQueue[tuple[Prepared, Emit] | None]  # to run
    outstanding: int = 0
    granted: int = 0  # of its outstanding batches, those holding a device slot


@dataclass(slots=True)
class _Owed:
    """A batch's rows still without an outcome, and the instance slot it holds, if any."""

    rows: Sequence[Envelope]
    slot: _Instance | None


class ModelRuntime:
    """Threads serving one model: one preprocess thread, one thread per instance."""

    def __init__(
        self,
        graph: ServedModel,
        encoder: OutcomeEncoder,
        emit: Emit,
        metrics: Metrics | None = None,
        scheduler: DeviceScheduler | None = None,
    ) -> None:
        self.graph = graph
        self.encoder = encoder
        self.emit = emit
        self.metrics = metrics or Metrics()
        self.scheduler = scheduler  # shared by the models of a replica, when enabled
        self.recovery = Recovery(graph.name, graph.settings.retry, self._letters, self.metrics)
        # Unbounded here, bounded by the caller's in-flight limit.
        self._incoming: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._instances = [
            _Instance(backend, InstanceStats(i, device), queue.SimpleQueue(), queue.SimpleQueue())
            for i, (backend, device) in enumerate(zip(graph.instances, graph.devices, strict=True))
        ]
        self._room = threading.Condition()
        self._turn = 0
        self._threads: list[threading.Thread] = []
        self._busy = 0
        self._queued = 0  # submitted, not yet handed to an instance
        self._lock = threading.Lock()
        self._fatal: str | None = None

    @property
    def name(self) -> str:
        """The model's name."""
        return self.graph.name

    @property
    def fatal(self) -> str | None:
        """Why this runtime cannot go on (requests left without an outcome); None if it can."""
        return self._fatal

    def start(self) -> None:
        """Start the dispatch thread, and a preprocess and an infer thread per instance."""
        name = self.name

        def thread(role: str, loop: Callable[[], None], after: list[Any]) -> None:
            target = self._guarded(loop, after)
            self._threads.append(threading.Thread(target=target, name=role, daemon=True))

        thread(f"dispatch-{name}", self._dispatch_loop, [i.raw for i in self._instances])
        for inst in self._instances:
            i = inst.stats.index
            thread(f"pre-{name}-{i}", functools.partial(self._preprocess_loop, inst), [inst.inbox])
            thread(f"infer-{name}-{i}", functools.partial(self._infer_loop, inst), [])
        for t in self._threads:
            t.start()

    def submit(
        self, rows: list[Envelope], emit: Emit | None = None, cls: RequestClass | None = None
    ) -> None:
        """Queue a batch of routed requests (never blocks).

        Its outcomes go to ``emit``, or to the runtime's own when None; ``cls``: what its
        requests ask of the device scheduler (their priority and tenant), if anything.
        """
        with self._lock:
            self._busy += 1
            self._queued += 1
            self.metrics.scheduler_queued.labels(self.name).set(self._queued)
        self._incoming.put((rows, emit or self.emit, cls))

    @property
    def busy(self) -> int:
        """Batches submitted and not yet emitted."""
        return self._busy

    def instance_stats(self) -> list[InstanceStats]:
        """A snapshot of each instance's counters."""
        with self._room:
            return [dataclasses.replace(i.stats) for i in self._instances]

    def stop(self, timeout: float) -> bool:
        """Finish queued batches, then stop the threads; False if they did not stop in time."""
        self._incoming.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        for s in self.instance_stats():
            log.info(
                "model %s instance %d (%s): %d batches, %d requests, busy %.2f s",
                *(self.name, s.index, s.device, s.batches, s.rows, s.busy_s),
            )
        return not any(t.is_alive() for t in self._threads)

    # -- dispatch -------------------------------------------------------------------------

    def _acquire(self) -> _Instance:
        """The least-busy instance with room, waiting until one has room."""
        with self._room:
            self._room.wait_for(lambda: any(i.outstanding < DEPTH for i in self._instances))
            least = min(i.outstanding for i in self._instances)
            tied = [i for i in self._instances if i.outstanding == least]
            chosen = tied[self._turn % len(tied)]
            self._turn += 1
            chosen.outstanding += 1
            return chosen

    def _admit(self, inst: _Instance, pending: list[_Work]) -> _Work:
        """The batch of ``pending`` the device scheduler admits to ``inst``'s device.

        Without a scheduler, the oldest. With one, every pending batch is offered (the
        device picks by priority and fair share) and, while none is admitted, what has
        arrived meanwhile is added to the offer every `_REOFFER_S`.
        """
        chosen = 0
        if self.scheduler is not None:
            device = inst.stats.device
            while True:
                offer = [self.scheduler.batch(self.name, len(w[0]), w[2]) for w in pending]
                picked = self.scheduler.acquire(device, offer, _REOFFER_S)
                if picked is not None:
                    chosen = picked
                    break
                self._gather(pending)
            with self._room:
                inst.granted += 1
        with self._lock:
            self._queued -= 1
            self.metrics.scheduler_queued.labels(self.name).set(self._queued)
        return pending.pop(chosen)

    def _gather(self, pending: list[_Work]) -> None:
        """Move what has been submitted meanwhile into ``pending`` (the end mark stays)."""
        while True:
            try:
                work = self._incoming.get_nowait()
            except queue.Empty:
                return
            if work is None:
                self._incoming.put(None)  # the end: taken once ``pending`` is empty
                return
            pending.append(work)

    def _release(self, inst: _Instance, rows: int, busy_s: float) -> None:
        if self.scheduler is not None:
            with self._room:
                granted, inst.granted = inst.granted > 0, max(0, inst.granted - 1)
            if granted:
                self.scheduler.release(self.name, inst.stats.device)
        with self._room:
            inst.outstanding -= 1
            if rows:
                inst.stats.batches += 1
                inst.stats.rows += rows
                inst.stats.busy_s += busy_s
            self._room.notify_all()

    # -- threads --------------------------------------------------------------------------

    def _guarded(self, loop: Callable[[], None], after: list[Any]) -> Callable[[], None]:
        """``loop`` as a thread's target that, should it die, stops cleanly.

        Each loop ends every failing batch itself; what still escapes is a bug there. The
        runtime then turns `fatal`, and the threads after this one get the end of work
        (``after``), so that `stop` still returns.
        """

        def run() -> None:
            try:
                loop()
            except Exception as e:
                log.exception("model %s: %s died", self.name, threading.current_thread().name)
                self._stop(f"{threading.current_thread().name} died: {describe(e)}")
                for q in after:
                    q.put(None)

        return run

    def _dispatch_loop(self) -> None:
        pending: list[_Work] = []
        while True:
            if not pending:
                work = self._incoming.get()
                if work is None:
                    for inst in self._instances:
                        inst.raw.put(None)
                    return
                pending.append(work)
            if self.scheduler is not None:
                self._gather(pending)  # the scheduler chooses among all that waits
            owed = _Owed(pending[0][0], None)
            emit = pending[0][1]
            try:
                # Chosen before preprocessing, so GPU stages can run on the instance's device.
                owed.slot = self._acquire()
                rows, emit, _ = self._admit(owed.slot, pending)
                owed.rows = rows
                owed.slot.raw.put((rows, emit))
            except Exception as e:
                if pending and pending[0][0] is owed.rows:  # not admitted: it ends here
                    pending.pop(0)
                    with self._lock:
                        self._queued -= 1
                self._abandon(emit, owed, "preprocess_failed", e)

    def _preprocess_loop(self, inst: _Instance) -> None:
        while True:
            work = inst.raw.get()
            if work is None:
                inst.inbox.put(None)
                return
            rows, emit = work
            owed = _Owed(rows, inst)
            try:
                self._preprocess(inst, emit, owed)
            except Exception as e:  # a stage that raised, or the bookkeeping around them
                self._abandon(emit, owed, "preprocess_failed", e)

    def _preprocess(self, inst: _Instance, emit: Emit, owed: _Owed) -> None:
        """Expire, prepare and pass one batch on; ``owed`` follows what is left to answer."""
        # Checked after the wait for an instance: the last moment before any work.
        s = self.graph.settings
        rows, expired = expire(
            self.encoder, s.name, s.version, list(owed.rows), s.max_age_ms, s.late_topic
        )
        if expired:
            if not rows:
                self._end(emit, owed, expired)
                return
            self._deliver(emit, expired)
            owed.rows = rows
        item = prepare(self.graph, self.encoder, rows, self.graph.stages_for(inst.stats.index))
        gpu = getattr(inst.backend, "gpu", None)
        if gpu is not None:
            # The end of this batch's preprocessing, marked on the preprocess stream: the
            # inference stream waits on it, the host does not (`backends.streams`).
            item.ready = gpu.preprocessed()
        self._observe_prepared(inst, rows, item)
        if not item.batch.rows:
            self._end(emit, owed, item.dead_letters)
            return
        if item.dead_letters:
            self._deliver(emit, item.dead_letters)
            owed.rows = item.batch.rows
        owed.slot = None  # the infer thread releases it
        inst.inbox.put((item, emit))

    def _infer_loop(self, inst: _Instance) -> None:
        if getattr(inst.backend, "gpu", None) is not None and hasattr(inst.backend, "submit"):
            self._queueing_loop(inst)
            return
        while True:
            work = inst.inbox.get()
            if work is None:
                return
            item, emit = work
            self._serve(inst, item, emit, time.monotonic())

    def _run(self, inst: _Instance, item: Prepared) -> list[Outcome]:
        """One model run; its phase times are observed only when it succeeds."""
        return self._observed(inst, item, complete(self.graph, self.encoder, inst.backend, item))

    def _observed(self, inst: _Instance, item: Prepared, outcomes: list[Outcome]) -> list[Outcome]:
        instance, m = str(inst.stats.index), self.metrics
        m.compute_time.labels(self.name, instance).observe(item.compute_ms / 1000.0)
        m.postprocess_time.labels(self.name, instance).observe(item.postprocess_ms / 1000.0)
        return outcomes

    def _serve(self, inst: _Instance, item: Prepared, emit: Emit, t0: float) -> None:
        """Run one batch with retries and poison isolation, and hand its outcomes on."""
        try:
            outcomes, slept = self.recovery.serve(
                functools.partial(self._run, inst), item, inst.stats.index
            )
        except Exception as e:  # recovery letters failing runs: this is past it
            self._abandon(emit, _Owed(item.batch.rows, inst), "inference_failed", e)
            return
        # Backoff sleeps are not work: busy time stays the instance's compute.
        self._release(inst, len(item.batch), time.monotonic() - t0 - slept)
        self._finish(emit, outcomes)

    def _queueing_loop(self, inst: _Instance) -> None:
        """A GPU instance's infer thread: batch N+1 is queued before batch N is collected.

        When the next batch is already preprocessed, it is started (queued on the GPU,
        no host wait: `steps.start`) before the host waits for the batch before it, so
        that one's copy to the host overlaps the next one's work (`backends.streams`).
        A batch whose start or collection fails is run again through `Recovery`, alone,
        with its retries and isolation (the failed first run is not counted among them).
        """
        pending: tuple[Prepared, Emit, Started, float] | None = None
        while True:
            if pending is None:
                work = inst.inbox.get()
            else:
                try:
                    work = inst.inbox.get_nowait()
                except queue.Empty:  # nothing to queue behind it: collect it now
                    self._collect(inst, pending)
                    pending = None
                    continue
            if work is None:
                if pending is not None:
                    self._collect(inst, pending)
                return
            item, emit = work
            t0 = time.monotonic()
            try:
                started = start(self.graph, inst.backend, item)
            except Exception as e:
                log.info("model %s: queueing a batch failed (%s); serving it alone", self.name, e)
                if pending is not None:
                    self._collect(inst, pending)
                    pending = None
                self._serve(inst, item, emit, t0)
                continue
            if pending is not None:
                self._collect(inst, pending)
            pending = (item, emit, started, t0)

    def _collect(self, inst: _Instance, pending: tuple[Prepared, Emit, Started, float]) -> None:
        item, emit, started, t0 = pending
        try:
            outcomes = self._observed(inst, item, finish(self.graph, self.encoder, item, started))
        except Exception as e:
            log.info("model %s: a queued batch failed (%s); serving it alone", self.name, e)
            self._serve(inst, item, emit, t0)
            return
        self._release(inst, len(item.batch), time.monotonic() - t0)
        self._finish(emit, outcomes)

    def _letters(self, rows: Sequence[Envelope], error: str) -> list[Outcome]:
        return [self.encoder.dead_letter(r, "inference_failed", error) for r in rows]

    def _observe_prepared(self, inst: _Instance, rows: list[Envelope], item: Prepared) -> None:
        m, name = self.metrics, self.name
        # A batch's queue time is its oldest request's: the wait the batch policy caused.
        m.queue_time.labels(name).observe(max(0.0, item.started - rows[0].consumed_at))
        now_ms = time.time() * 1000.0
        m.request_age.observe_many(name, ages(rows, now_ms))
        m.preprocess_time.labels(name, str(inst.stats.index)).observe(item.preprocess_ms / 1000.0)
        columns = item.batch.columns
        real = sum(_elements(columns[n]) for n in self.graph.info.inputs if n in columns)
        padded = item.batch.padded_elements
        m.padding.labels(name, "real").inc(max(0, real - padded))
        if padded:
            m.padding.labels(name, "padded").inc(padded)

    def _abandon(self, emit: Emit, owed: _Owed, reason: str, error: Exception) -> None:
        """End a batch that failed past the steps' own handling: its owed rows, dead letters."""
        log.error(
            "model %s: a batch failed; its %d requests without an outcome become %s",
            *(self.name, len(owed.rows), reason),
            exc_info=error,
        )
        letters: list[Outcome] = []
        try:
            letters = [self.encoder.dead_letter(r, reason, describe(error)) for r in owed.rows]
        except Exception as e:
            log.exception("model %s: cannot make dead letters", self.name)
            self._stop(f"{len(owed.rows)} requests left without an outcome: {describe(e)}")
        self._end(emit, owed, letters)

    def _end(self, emit: Emit, owed: _Owed, outcomes: list[Outcome]) -> None:
        """The batch's last outcomes; its slot, if it still holds one, goes back."""
        if owed.slot is not None:
            self._release(owed.slot, 0, 0.0)
            owed.slot = None
        owed.rows = []
        self._finish(emit, outcomes)

    def _finish(self, emit: Emit, outcomes: list[Outcome]) -> None:
        self._deliver(emit, outcomes)
        with self._lock:
            self._busy -= 1

    def _deliver(self, emit: Emit, outcomes: list[Outcome]) -> None:
        """Hand outcomes to the caller; one it refuses stops the runtime (`fatal`)."""
        if not outcomes:
            return
        try:
            emit(outcomes)
        except Exception as e:
            log.exception("model %s: emit refused %d outcomes", self.name, len(outcomes))
            self._stop(f"emit refused {len(outcomes)} outcomes: {describe(e)}")

    def _stop(self, why: str) -> None:
        """Turn `fatal` (the first reason stays): the caller stops on it."""
        with self._lock:
            if self._fatal is None:
                self._fatal = f"model {self.name}: {why}"


def _elements(column: Any) -> int:
    """Elements in a column of any array type (NumPy, CuPy, torch) or a list of rows.

    From the shape: ``np.size`` converts its argument, which a CuPy array refuses, and on
    a torch tensor it returns the tensor's ``size`` method.
    """
    if isinstance(column, list):
        return sum(_elements(row) for row in column)
    shape = getattr(column, "shape", None)
    if shape is None:  # a Python object as one row's value
        return int(np.size(column))
    return math.prod(int(d) for d in shape)
