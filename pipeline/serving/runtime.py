"""Running one model's batches off the caller's thread: preprocess, infer, postprocess.

Per model, a dispatch thread takes routed batches and picks the least-busy instance (the
one with the fewest batches queued or running; ties rotate), waiting while every
instance holds `DEPTH` batches. Each instance (its own backend session, device and, on a
GPU, its own CUDA stream) is a small pipeline of two threads: one preprocesses its
batches, the other runs the model on them. So preprocessing of the next batch overlaps
inference of the current one, the instances' preprocessing overlaps too (decoding and
resizing release the GIL), and a front door that waits for each batch (the Faust
adapter) still gets its batches preprocessed side by side. Preprocessing runs only a
little ahead of the models. Outcomes (encoded results and dead letters) go back through
the batch's ``emit``.

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
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from backends.base import Backend
from pipeline.observability.metrics import Metrics
from pipeline.serving.graph import ServedModel
from pipeline.serving.outcomes import Outcome, OutcomeEncoder
from pipeline.serving.recovery import Recovery
from pipeline.serving.steps import Prepared, complete, expire, prepare
from schemas.errors import describe
from schemas.messages import Envelope

__all__ = ["DEPTH", "Emit", "InstanceStats", "ModelRuntime"]

log = logging.getLogger(__name__)

Emit = Callable[[list[Outcome]], None]
"""Where a batch's outcomes go; called from the runtime's threads, maybe several times."""

DEPTH = 2
"""Batches one instance may hold: the one it runs and the next one, ready."""


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


class ModelRuntime:
    """Threads serving one model: one preprocess thread, one thread per instance."""

    def __init__(
        self,
        graph: ServedModel,
        encoder: OutcomeEncoder,
        emit: Emit,
        metrics: Metrics | None = None,
    ) -> None:
        self.graph = graph
        self.encoder = encoder
        self.emit = emit
        self.metrics = metrics or Metrics()
        self.recovery = Recovery(graph.name, graph.settings.retry, self._letters, self.metrics)
        # Unbounded here, bounded by the caller's in-flight limit.
        self._incoming: queue.SimpleQueue[tuple[list[Envelope], Emit] | None] = queue.SimpleQueue()
        self._instances = [
            _Instance(backend, InstanceStats(i, device), queue.SimpleQueue(), queue.SimpleQueue())
            for i, (backend, device) in enumerate(zip(graph.instances, graph.devices, strict=True))
        ]
        self._room = threading.Condition()
        self._turn = 0
        self._threads: list[threading.Thread] = []
        self._busy = 0
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        """The model's name."""
        return self.graph.name

    def start(self) -> None:
        """Start the dispatch thread, and a preprocess and an infer thread per instance."""
        name = self.name
        self._threads.append(
            threading.Thread(target=self._dispatch_loop, name=f"dispatch-{name}", daemon=True)
        )
        for inst in self._instances:
            i = inst.stats.index
            for loop, role in ((self._preprocess_loop, "pre"), (self._infer_loop, "infer")):
                self._threads.append(
                    threading.Thread(
                        target=loop, args=(inst,), name=f"{role}-{name}-{i}", daemon=True
                    )
                )
        for t in self._threads:
            t.start()

    def submit(self, rows: list[Envelope], emit: Emit | None = None) -> None:
        """Queue a batch of routed requests (never blocks).

        Its outcomes go to ``emit``, or to the runtime's own when None.
        """
        with self._lock:
            self._busy += 1
        self._incoming.put((rows, emit or self.emit))

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

    def _release(self, inst: _Instance, rows: int, busy_s: float) -> None:
        with self._room:
            inst.outstanding -= 1
            if rows:
                inst.stats.batches += 1
                inst.stats.rows += rows
                inst.stats.busy_s += busy_s
            self._room.notify_all()

    # -- threads --------------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        while True:
            work = self._incoming.get()
            if work is None:
                for inst in self._instances:
                    inst.raw.put(None)
                return
            # Chosen before preprocessing, so GPU stages can run on the instance's device.
            self._acquire().raw.put(work)

    def _preprocess_loop(self, inst: _Instance) -> None:
        while True:
            work = inst.raw.get()
            if work is None:
                inst.inbox.put(None)
                return
            rows, emit = work
            # Checked after the wait for an instance: the last moment before any work.
            s = self.graph.settings
            rows, expired = expire(self.encoder, s.name, s.version, rows)
            if expired:
                if not rows:
                    self._release(inst, 0, 0.0)
                    self._finish(emit, expired)
                    continue
                emit(expired)
            try:
                stages = self.graph.stages_for(inst.stats.index)
                item = prepare(self.graph, self.encoder, rows, stages)
            except Exception as e:
                log.exception("model %s: preprocessing failed", self.name)
                self._release(inst, 0, 0.0)
                error = describe(e)
                self._finish(
                    emit, [self.encoder.dead_letter(r, "preprocess_failed", error) for r in rows]
                )
                continue
            self._observe_prepared(inst, rows, item)
            if not item.batch.rows:
                self._release(inst, 0, 0.0)
                self._finish(emit, item.dead_letters)
                continue
            if item.dead_letters:
                emit(item.dead_letters)
            inst.inbox.put((item, emit))

    def _infer_loop(self, inst: _Instance) -> None:
        def run(item: Prepared) -> list[Outcome]:
            """One model run; its phase times are observed only when it succeeds."""
            outcomes = complete(self.graph, self.encoder, inst.backend, item)
            instance, m = str(inst.stats.index), self.metrics
            m.compute_time.labels(self.name, instance).observe(item.compute_ms / 1000.0)
            m.postprocess_time.labels(self.name, instance).observe(item.postprocess_ms / 1000.0)
            return outcomes

        while True:
            work = inst.inbox.get()
            if work is None:
                return
            item, emit = work
            t0 = time.monotonic()
            outcomes, slept = self.recovery.serve(run, item, inst.stats.index)
            # Backoff sleeps are not work: busy time stays the instance's compute.
            self._release(inst, len(item.batch), time.monotonic() - t0 - slept)
            self._finish(emit, outcomes)

    def _letters(self, rows: Sequence[Envelope], error: str) -> list[Outcome]:
        return [self.encoder.dead_letter(r, "inference_failed", error) for r in rows]

    def _observe_prepared(self, inst: _Instance, rows: list[Envelope], item: Prepared) -> None:
        m, name = self.metrics, self.name
        # A batch's queue time is its oldest request's: the wait the batch policy caused.
        m.queue_time.labels(name).observe(max(0.0, item.started - rows[0].consumed_at))
        m.preprocess_time.labels(name, str(inst.stats.index)).observe(item.preprocess_ms / 1000.0)
        columns = item.batch.columns
        real = sum(int(np.size(columns[n])) for n in self.graph.info.inputs if n in columns)
        padded = item.batch.padded_elements
        m.padding.labels(name, "real").inc(max(0, real - padded))
        if padded:
            m.padding.labels(name, "padded").inc(padded)

    def _finish(self, emit: Emit, outcomes: list[Outcome]) -> None:
        emit(outcomes)
        with self._lock:
            self._busy -= 1
