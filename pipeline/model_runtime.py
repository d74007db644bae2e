"""Running one model's batches off the Kafka thread: preprocess, infer, postprocess.

Per model, a preprocess thread feeds a small bounded queue that the model's instances
(one thread each, each with its own backend session) drain, so preprocessing of the
next batch overlaps inference of the current one. Outcomes (encoded results and dead
letters) go back to the Kafka thread through ``emit``. Nothing here raises out of a
thread: any failure becomes dead letters for the rows it touched.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from backends.base import Backend
from pipeline.graph import ModelGraph
from pipeline.messages import Envelope
from pipeline.outcomes import Outcome, OutcomeEncoder
from stages.base import Batch, Stage

__all__ = ["ModelRuntime", "Prepared", "complete", "prepare", "run_stages"]

log = logging.getLogger(__name__)

Emit = Callable[[list[Outcome]], None]


@dataclass(slots=True)
class Prepared:
    """A preprocessed batch on its way to an instance, and the dead letters it shed."""

    batch: Batch
    started: float
    preprocess_ms: float
    dead_letters: list[Outcome]


class _StageContractError(Exception):
    pass


class ModelRuntime:
    """Threads serving one model: one preprocess thread, one thread per instance."""

    def __init__(self, graph: ModelGraph, encoder: OutcomeEncoder, emit: Emit) -> None:
        self.graph = graph
        self.encoder = encoder
        self.emit = emit
        n = len(graph.instances)
        # Bounded by the caller's in-flight limit; the hand-off to instances is kept short
        # so preprocessing runs at most a couple of batches ahead of the model.
        self._incoming: queue.Queue[list[Envelope] | None] = queue.Queue()
        self._ready: queue.Queue[Prepared | None] = queue.Queue(maxsize=2 * n)
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
        for i, backend in enumerate(self.graph.instances):
            t = threading.Thread(
                target=self._infer_loop, args=(backend,), name=f"infer-{self.name}-{i}", daemon=True
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

    def stop(self, timeout: float) -> bool:
        """Finish queued batches, then stop the threads; False if they did not stop in time."""
        self._incoming.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    # -- threads --------------------------------------------------------------------------

    def _preprocess_loop(self) -> None:
        while True:
            rows = self._incoming.get()
            if rows is None:
                for _ in self.graph.instances:
                    self._ready.put(None)
                return
            try:
                item = prepare(self.graph, self.encoder, rows)
            except Exception as e:
                log.exception("model %s: preprocessing failed", self.name)
                self._fail(rows, "preprocess_failed", f"{type(e).__name__}: {e}")
                continue
            if not item.batch.rows:
                self._finish(item.dead_letters)
                continue
            if item.dead_letters:
                self.emit(item.dead_letters)
            self._ready.put(item)

    def _infer_loop(self, backend: Backend) -> None:
        while True:
            item = self._ready.get()
            if item is None:
                return
            try:
                outcomes = complete(self.graph, self.encoder, backend, item)
            except Exception as e:
                log.exception(
                    "model %s: inference failed for a batch of %d", self.name, len(item.batch)
                )
                self._fail(item.batch.rows, "inference_failed", f"{type(e).__name__}: {e}")
                continue
            self._finish(outcomes)

    def _fail(self, rows: Sequence[Envelope], reason: str, error: str) -> None:
        self._finish([self.encoder.dead_letter(r, reason, error) for r in rows])

    def _finish(self, outcomes: list[Outcome]) -> None:
        self.emit(outcomes)
        with self._lock:
            self._busy -= 1


def prepare(graph: ModelGraph, encoder: OutcomeEncoder, rows: list[Envelope]) -> Prepared:
    """Stack the rows' tensors into columns and run the preprocess stages.

    Rows a stage rejects leave the batch as encoded dead letters in the result.
    """
    started = time.monotonic()
    columns: dict[str, Any] = {
        name: np.stack([r.request.inputs[name] for r in rows])  # type: ignore[union-attr]
        for name in graph.inputs
    }
    batch = run_stages(graph.preprocess, Batch(list(rows), columns))
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
    feeds = {name: np.asarray(batch.columns[name]) for name in graph.info.inputs}
    t0 = time.monotonic()
    outputs = backend.infer(feeds)
    t1 = time.monotonic()
    post = run_stages(graph.postprocess, Batch(batch.rows, dict(outputs)))
    t2 = time.monotonic()
    outcomes = [encoder.dead_letter(r, reason, msg) for r, reason, msg in post.rejected]
    phases = (item.preprocess_ms, (t1 - t0) * 1000.0, (t2 - t1) * 1000.0)
    size = len(batch.rows)  # the rows the model ran, postprocess rejects included
    s = graph.settings
    outcomes += encoder.results(
        post.rows, s.name, s.version, post.columns, item.started, phases, size
    )
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
