"""Running one model's batches off the Kafka thread: preprocess, infer, postprocess.

Per model, a preprocess thread takes routed batches, picks the least-busy instance (the
one with the fewest batches queued or running; ties rotate), preprocesses the batch for
it and hands it over. Each instance (its own backend session, device and, on a GPU, its
own CUDA stream) runs on its own thread, so preprocessing of the next batch overlaps
inference of the current one, and N instances overlap each other. An instance holds at
most `DEPTH` batches, so preprocessing runs only a little ahead of the models. Outcomes
(encoded results and dead letters) go back to the Kafka thread through ``emit``.
Nothing here raises out of a thread: any failure becomes dead letters for the rows it
touched.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from backends.base import Backend
from backends.devices import is_device_array
from pipeline.graph import ModelGraph
from pipeline.messages import Envelope
from pipeline.metrics import Metrics
from pipeline.outcomes import Outcome, OutcomeEncoder
from stages.base import Batch, Stage

__all__ = [
    "DEPTH",
    "InstanceStats",
    "ModelRuntime",
    "Prepared",
    "complete",
    "prepare",
    "run_stages",
]

log = logging.getLogger(__name__)

Emit = Callable[[list[Outcome]], None]

DEPTH = 2
"""Batches one instance may hold: the one it runs and the next one, ready."""


@dataclass(slots=True)
class Prepared:
    """A preprocessed batch on its way to an instance, and the dead letters it shed."""

    batch: Batch
    started: float
    preprocess_ms: float
    dead_letters: list[Outcome]
    compute_ms: float = 0.0  # set by `complete`
    postprocess_ms: float = 0.0


@dataclass(slots=True)
class InstanceStats:
    """What one model instance did: the evidence that work was spread across instances."""

    index: int
    device: str
    batches: int = 0
    rows: int = 0
    busy_s: float = 0.0


class _StageContractError(Exception):
    pass


@dataclass(slots=True)
class _Instance:
    backend: Backend
    stats: InstanceStats
    inbox: queue.SimpleQueue[Prepared | None]
    outstanding: int = 0


class ModelRuntime:
    """Threads serving one model: one preprocess thread, one thread per instance."""

    def __init__(
        self,
        graph: ModelGraph,
        encoder: OutcomeEncoder,
        emit: Emit,
        metrics: Metrics | None = None,
    ) -> None:
        self.graph = graph
        self.encoder = encoder
        self.emit = emit
        self.metrics = metrics or Metrics()
        # Unbounded here, bounded by the caller's in-flight limit.
        self._incoming: queue.SimpleQueue[list[Envelope] | None] = queue.SimpleQueue()
        self._instances = [
            _Instance(backend, InstanceStats(i, device), queue.SimpleQueue())
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
        """Start the preprocess thread and one thread per instance."""
        pre = threading.Thread(target=self._preprocess_loop, name=f"pre-{self.name}", daemon=True)
        self._threads.append(pre)
        for inst in self._instances:
            t = threading.Thread(
                target=self._infer_loop,
                args=(inst,),
                name=f"infer-{self.name}-{inst.stats.index}",
                daemon=True,
            )
            self._threads.append(t)
        for t in self._threads:
            t.start()

    def submit(self, rows: list[Envelope]) -> None:
        """Queue a batch of routed requests (never blocks)."""
        with self._lock:
            self._busy += 1
        self._incoming.put(rows)

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
                self.name,
                s.index,
                s.device,
                s.batches,
                s.rows,
                s.busy_s,
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

    def _preprocess_loop(self) -> None:
        while True:
            rows = self._incoming.get()
            if rows is None:
                for inst in self._instances:
                    inst.inbox.put(None)
                return
            # Chosen before preprocessing, so GPU stages can run on the instance's device.
            inst = self._acquire()
            try:
                stages = self.graph.stages_for(inst.stats.index)
                item = prepare(self.graph, self.encoder, rows, stages)
            except Exception as e:
                log.exception("model %s: preprocessing failed", self.name)
                self._release(inst, 0, 0.0)
                self._fail(rows, "preprocess_failed", f"{type(e).__name__}: {e}")
                continue
            self._observe_prepared(inst, rows, item)
            if not item.batch.rows:
                self._release(inst, 0, 0.0)
                self._finish(item.dead_letters)
                continue
            if item.dead_letters:
                self.emit(item.dead_letters)
            inst.inbox.put(item)

    def _infer_loop(self, inst: _Instance) -> None:
        while True:
            item = inst.inbox.get()
            if item is None:
                return
            t0 = time.monotonic()
            try:
                outcomes = complete(self.graph, self.encoder, inst.backend, item)
            except Exception as e:
                log.exception(
                    "model %s: inference failed for a batch of %d", self.name, len(item.batch)
                )
                self._release(inst, len(item.batch), time.monotonic() - t0)
                self._fail(item.batch.rows, "inference_failed", f"{type(e).__name__}: {e}")
                continue
            self._release(inst, len(item.batch), time.monotonic() - t0)
            instance = str(inst.stats.index)
            m = self.metrics
            m.compute_time.labels(self.name, instance).observe(item.compute_ms / 1000.0)
            m.postprocess_time.labels(self.name, instance).observe(item.postprocess_ms / 1000.0)
            self._finish(outcomes)

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

    def _fail(self, rows: Sequence[Envelope], reason: str, error: str) -> None:
        self._finish([self.encoder.dead_letter(r, reason, error) for r in rows])

    def _finish(self, outcomes: list[Outcome]) -> None:
        self.emit(outcomes)
        with self._lock:
            self._busy -= 1


def prepare(
    graph: ModelGraph,
    encoder: OutcomeEncoder,
    rows: list[Envelope],
    stages: Sequence[Stage] | None = None,
) -> Prepared:
    """Stack the rows' tensors into columns and run the preprocess stages.

    ``stages`` are the chosen instance's (its device and stream); default: the model's.

    Rows a stage rejects leave the batch as encoded dead letters in the result.
    """
    started = time.monotonic()
    columns: dict[str, Any] = {
        name: np.stack([r.request.inputs[name] for r in rows])  # type: ignore[union-attr]
        for name in graph.inputs
    }
    chain = graph.preprocess if stages is None else stages
    batch = run_stages(chain, Batch(list(rows), columns))
    letters = [encoder.dead_letter(r, reason, msg) for r, reason, msg in batch.rejected]
    batch.rejected = []
    return Prepared(batch, started, (time.monotonic() - started) * 1000.0, letters)


def complete(
    graph: ModelGraph, encoder: OutcomeEncoder, backend: Backend, item: Prepared
) -> list[Outcome]:
    """Run the model on a prepared batch, then postprocess and encode every row's outcome."""
    batch = item.batch
    if not batch.rows:
        return []
    feeds = {name: _feed(batch.columns[name]) for name in graph.info.inputs}
    t0 = time.monotonic()
    outputs = backend.infer(feeds)
    t1 = time.monotonic()
    # Postprocess sees what fed the model too (an attention mask for pooling, say).
    post = run_stages(graph.postprocess, Batch(batch.rows, {**batch.columns, **outputs}))
    t2 = time.monotonic()
    outcomes = [encoder.dead_letter(r, reason, msg) for r, reason, msg in post.rejected]
    item.compute_ms, item.postprocess_ms = (t1 - t0) * 1000.0, (t2 - t1) * 1000.0
    phases = (item.preprocess_ms, item.compute_ms, item.postprocess_ms)
    size = len(batch.rows)  # the rows the model ran, postprocess rejects included
    s = graph.settings
    published = {name: post.columns[name] for name in graph.outputs}
    outcomes += encoder.results(post.rows, s.name, s.version, published, item.started, phases, size)
    return outcomes


def run_stages(stages: Sequence[Stage], batch: Batch) -> Batch:
    """Run stages in order, checking each keeps every row accounted for (rows + rejects)."""
    for stage in stages:
        if not batch.rows:  # every row rejected: keep their reasons, run nothing more
            break
        before = len(batch) + len(batch.rejected)
        batch = stage.process(batch)
        if len(batch) + len(batch.rejected) != before:
            raise _StageContractError(
                f"stage {stage.name} returned {len(batch)} rows and {len(batch.rejected)} "
                f"rejects for {before} rows in"
            )
    return batch


def _feed(column: Any) -> Any:
    """A column as the backend takes it: device arrays as they are, the rest as NumPy."""
    return column if is_device_array(column) else np.asarray(column)
