"""Running one model's batches off the Kafka thread: preprocess, infer, postprocess.

Per model, a preprocess thread takes routed batches, picks the least-busy instance (the
one with the fewest batches queued or running; ties rotate), preprocesses the batch for
it and hands it over. Each instance (its own backend session, device and, on a GPU, its
own CUDA stream) runs on its own thread, so preprocessing of the next batch overlaps
inference of the current one, and N instances overlap each other. An instance holds at
most `DEPTH` batches, so preprocessing runs only a little ahead of the models. Outcomes
(encoded results and dead letters) go back to the Kafka thread through ``emit``.

Nothing here raises out of a thread; every row ends as one outcome:

- A request whose ``deadline_ms`` has passed when its batch reaches preprocessing gets an
  EXPIRED result and never runs: its client has stopped waiting, and running it would
  only delay the requests behind it.
- A preprocessing failure (a stage that raised) makes dead letters of its batch.
- A failing model run is retried on the same instance while its error looks transient
  (out of memory: `RetrySettings.transient`), with jittered exponential backoff. Then,
  or at once for any other error, the batch is treated as holding poison: it is halved,
  and each failing half halved again, until every failing request is alone. Those become
  ``inference_failed`` dead letters naming the error; every other request gets its result,
  from the smaller batch it ran in. One poison request in a batch of n costs about
  2·log2(n) extra runs; the hunt stops splitting after `isolation_budget` runs (enough to
  isolate 8 poison requests wherever they sit), so a model that fails every input costs a
  bounded number of runs per batch, not 2n.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from backends.base import Backend
from pipeline.observability.metrics import Metrics
from pipeline.serving.graph import ModelGraph
from pipeline.serving.outcomes import Outcome, OutcomeEncoder
from schemas.devices import is_device_array
from schemas.errors import describe
from schemas.messages import Envelope
from stages.base import Batch, Stage

__all__ = [
    "DEPTH",
    "ISOLATE",
    "InstanceStats",
    "ModelRuntime",
    "Prepared",
    "complete",
    "expire",
    "halve",
    "isolation_budget",
    "prepare",
    "run_stages",
]

log = logging.getLogger(__name__)

Emit = Callable[[list[Outcome]], None]

DEPTH = 2
"""Batches one instance may hold: the one it runs and the next one, ready."""

ISOLATE = 8
"""Poison requests one batch's hunt can always isolate, wherever they sit in it."""


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
        self._rng = random.Random()  # backoff jitter

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
            # Checked after the wait for an instance: the last moment before any work.
            s = self.graph.settings
            rows, expired = expire(self.encoder, s.name, s.version, rows)
            if expired:
                if not rows:
                    self._release(inst, 0, 0.0)
                    self._finish(expired)
                    continue
                self.emit(expired)
            try:
                stages = self.graph.stages_for(inst.stats.index)
                item = prepare(self.graph, self.encoder, rows, stages)
            except Exception as e:
                log.exception("model %s: preprocessing failed", self.name)
                self._release(inst, 0, 0.0)
                self._fail(rows, "preprocess_failed", describe(e))
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
            outcomes, slept = self._serve(inst, item)
            # Backoff sleeps are not work: busy time stays the instance's compute.
            self._release(inst, len(item.batch), time.monotonic() - t0 - slept)
            self._finish(outcomes)

    def _serve(self, inst: _Instance, item: Prepared) -> tuple[list[Outcome], float]:
        """Every row's outcome, retrying transient failures and isolating poison.

        Returns the outcomes and the seconds spent sleeping between retries.
        """
        retry = self.graph.settings.retry
        slept = 0.0
        attempt = 1
        while True:
            try:
                return self._run(inst, item), slept
            except Exception as e:
                failure = e
            error = describe(failure)
            if attempt >= retry.max_attempts or not retry.is_transient(error):
                break
            delay = retry.backoff_s(attempt, self._rng)
            log.warning(
                "model %s instance %d: run %d of %d failed transiently, again in %.0f ms: %s",
                *(self.name, inst.stats.index, attempt, retry.max_attempts, delay * 1e3, error),
            )
            self.metrics.inference_retries.labels(self.name).inc()
            time.sleep(delay)  # this instance's thread only; no lock is held
            slept += delay
            attempt += 1
        rows = item.batch.rows
        if not retry.split_on_failure or len(rows) == 1:
            # The traceback once per batch: a stage's bug shows where it is.
            log.warning("model %s: a batch of %d failed", self.name, len(rows), exc_info=failure)
            return self._letters(rows, error), slept
        log.warning(
            "model %s: a batch of %d failed; halving it", self.name, len(rows), exc_info=failure
        )
        return self._isolate(inst, item), slept

    def _isolate(self, inst: _Instance, item: Prepared) -> list[Outcome]:
        """Halve a failing batch until each failing request is alone (depth first).

        Each part runs once, without retries: a transient error that outlasted the whole
        batch's attempts is most likely the batch's size (out of memory), which halving
        cures. A part that fails is halved again; alone, or once the budget is spent, it
        becomes dead letters. Parts that succeed keep their results.
        """
        budget = isolation_budget(len(item.batch))
        pending = list(reversed(halve(item)))  # the left half runs first
        splits, runs = 1, 0
        alone: list[Envelope] = []
        unisolated: list[Envelope] = []
        outcomes: list[Outcome] = []
        while pending:
            part = pending.pop()
            runs += 1
            try:
                outcomes += self._run(inst, part)
                continue
            except Exception as e:
                error = describe(e)
            if len(part.batch) > 1 and runs < budget:
                pending.extend(reversed(halve(part)))
                splits += 1
                continue
            (alone if len(part.batch) == 1 else unisolated).extend(part.batch.rows)
            outcomes += self._letters(part.batch.rows, error)
        self.metrics.batch_splits.labels(self.name).inc(splits)
        ids = ", ".join(r.request.id if r.request else "?" for r in alone[:10])
        past = f"; {len(unisolated)} more in parts failing past the budget" if unisolated else ""
        log.warning(
            "model %s: %d of a batch of %d fail alone (%s)%s; %d runs, %d splits",
            *(self.name, len(alone), len(item.batch), ids, past, runs, splits),
        )
        return outcomes

    def _run(self, inst: _Instance, item: Prepared) -> list[Outcome]:
        """One model run of ``item``; its phase times are observed only when it succeeds."""
        outcomes = complete(self.graph, self.encoder, inst.backend, item)
        instance, m = str(inst.stats.index), self.metrics
        m.compute_time.labels(self.name, instance).observe(item.compute_ms / 1000.0)
        m.postprocess_time.labels(self.name, instance).observe(item.postprocess_ms / 1000.0)
        return outcomes

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


def expire(
    encoder: OutcomeEncoder, model: str, version: str, rows: list[Envelope]
) -> tuple[list[Envelope], list[Outcome]]:
    """The rows still within their deadline, and EXPIRED results for the others."""
    if all(r.request is None or r.request.deadline_ms is None for r in rows):
        return rows, []  # the usual case: nobody set a deadline
    now_ms, started = time.time() * 1000.0, time.monotonic()
    live: list[Envelope] = []
    expired: list[Outcome] = []
    for r in rows:
        deadline = None if r.request is None else r.request.deadline_ms
        if deadline is not None and deadline < now_ms:
            expired.append(encoder.expired(r, model, version, now_ms, started))
        else:
            live.append(r)
    return live, expired


def halve(item: Prepared) -> tuple[Prepared, Prepared]:
    """The two halves of a prepared batch of two rows or more, every column cut on axis 0.

    Columns are NumPy arrays, device arrays (CuPy, torch) or lists: slicing works on all,
    and a slice of a C-contiguous array along axis 0 stays C-contiguous, as backends that
    bind device memory need. The halves start without dead letters (they were emitted).
    """
    batch, n = item.batch, len(item.batch)
    assert n >= 2, "a single row cannot be halved"
    mid = n // 2

    def part(lo: int, hi: int) -> Prepared:
        columns = {name: col[lo:hi] for name, col in batch.columns.items()}
        return Prepared(Batch(batch.rows[lo:hi], columns), item.started, item.preprocess_ms, [])

    return part(0, mid), part(mid, n)


def isolation_budget(n: int) -> int:
    """Runs a poison hunt in a batch of ``n`` may make before it stops splitting.

    Isolating one poison request runs two halves per level, 2·⌈log2 n⌉ runs; ``ISOLATE``
    of them at most ``ISOLATE`` times that. Past the budget a failing part becomes dead
    letters whole, so a model that fails on everything costs this many runs, not 2n.
    """
    return 2 * ISOLATE * max(1, math.ceil(math.log2(max(n, 2))))


def complete(
    graph: ModelGraph, encoder: OutcomeEncoder, backend: Backend, item: Prepared
) -> list[Outcome]:
    """Run the model on a prepared batch, then postprocess and encode every row's outcome.

    Raises whatever the backend or a postprocess stage raised; nothing is emitted then.
    """
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
