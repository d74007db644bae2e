"""The steps one batch goes through, as plain functions: no threads, no metrics.

`expire` answers requests whose deadline has passed; `prepare` stacks the rows' tensors
into columns and runs the preprocess stages; `complete` runs the model and the
postprocess stages and encodes every row's outcome, in two halves that a GPU instance
runs apart (`start` queues the model, `finish` collects, postprocesses and encodes), so
batch N+1 is queued on the GPU before the host waits for batch N. `pipeline.serving.runtime` runs
them on its threads; `pipeline.serving.recovery` re-runs `complete` on parts of a batch
that failed.

A stage must account for every row it is given (kept, or rejected with a reason):
`run_stages` checks that after each stage, so a buggy stage fails its batch loudly
instead of losing requests.
"""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from backends.base import Backend
from pipeline.serving.batch_rows import gather, inputs, no_deadlines
from pipeline.serving.graph import ServedModel
from pipeline.serving.outcomes import Outcome, OutcomeEncoder
from schemas.devices import is_device_array
from schemas.messages import Envelope
from stages.base import Batch, Stage

__all__ = [
    "Prepared",
    "StageContractError",
    "Started",
    "complete",
    "expire",
    "finish",
    "prepare",
    "run_stages",
    "stack_rows",
    "start",
]


@dataclass(slots=True)
class Prepared:
    """A preprocessed batch on its way to an instance, and the dead letters it shed."""

    batch: Batch
    started: float
    preprocess_ms: float
    dead_letters: list[Outcome]
    compute_ms: float = 0.0  # set by `complete`
    postprocess_ms: float = 0.0
    # On a GPU instance, the batch's `ready` event (`backends.streams.Ready`), recorded on
    # the preprocess stream after its stages; the inference stream waits on it.
    ready: Any = None


class StageContractError(Exception):
    """A stage returned a different number of rows (kept + rejected) than it was given."""


def stack_rows(arrays: list[np.ndarray[Any, Any]]) -> np.ndarray[Any, Any]:
    """The rows' tensors as one array with a batch dimension first: ``np.stack``.

    A batch's rows all have one shape (it is part of the key the batcher groups them by),
    so they are copied end to end into one new array (`batch_rows.gather`, one memcpy a
    row: ~0.02 µs, where ``np.concatenate`` spends ~0.23 on its checks of each small
    array and ``np.stack`` more). Without the compiled pass, or for arrays it does not
    take, ``np.concatenate`` joins them after a check of the shapes (in C: ``map`` of an
    attribute getter); rows of differing shapes, or scalars, take ``np.stack`` and its
    error.
    """
    joined = gather(arrays)  # compiled: one memcpy a row, where it applies
    if joined is not None:
        return joined
    first = arrays[0]
    if first.ndim and len(set(map(_SHAPE, arrays))) == 1:
        return np.concatenate(arrays).reshape((len(arrays), *first.shape))
    return np.stack(arrays)


_SHAPE = operator.attrgetter("shape")

_STAMP = operator.attrgetter("timestamp_ms")  # of a row, read in C


def prepare(
    graph: ServedModel,
    encoder: OutcomeEncoder,
    rows: list[Envelope],
    stages: Sequence[Stage] | None = None,
) -> Prepared:
    """Stack the rows' tensors into columns and run the preprocess stages.

    ``stages`` are the chosen instance's (its device and stream); default: the model's.

    Rows a stage rejects leave the batch as encoded dead letters in the result.
    """
    started = time.monotonic()
    columns: dict[str, Any] = {name: stack_rows(inputs(rows, name)) for name in graph.inputs}
    chain = graph.preprocess if stages is None else stages
    batch = run_stages(chain, Batch(list(rows), columns))
    letters = [encoder.dead_letter(r, reason, msg) for r, reason, msg in batch.rejected]
    batch.rejected = []
    return Prepared(batch, started, (time.monotonic() - started) * 1000.0, letters)


def expire(
    encoder: OutcomeEncoder,
    model: str,
    version: str,
    rows: list[Envelope],
    max_age_ms: float | None = None,
    late_topic: str | None = None,
) -> tuple[list[Envelope], list[Outcome]]:
    """The rows still within their deadline, and EXPIRED results for the others.

    A row's deadline is its request's ``deadline_ms``, or its record timestamp plus the
    model's ``max_age_ms`` (staleness by event time), whichever comes first.
    """
    now_ms = time.time() * 1000.0
    oldest_ok = -math.inf if max_age_ms is None else now_ms - max_age_ms
    if no_deadlines(rows) and (max_age_ms is None or min(map(_STAMP, rows)) >= oldest_ok):
        return rows, []  # the usual case: nobody set a deadline, nothing is too old
    started = time.monotonic()
    live: list[Envelope] = []
    expired: list[Outcome] = []
    for r in rows:
        deadline = None if r.request is None else r.request.deadline_ms
        if (deadline is not None and deadline < now_ms) or r.timestamp_ms < oldest_ok:
            expired.append(
                encoder.expired(r, model, version, now_ms, started, max_age_ms, late_topic)
            )
        else:
            live.append(r)
    return live, expired


def complete(
    graph: ServedModel, encoder: OutcomeEncoder, backend: Backend, item: Prepared
) -> list[Outcome]:
    """Run the model on a prepared batch, then postprocess and encode every row's outcome.

    Raises whatever the backend or a postprocess stage raised; nothing is emitted then.
    """
    if not item.batch.rows:
        return []
    return finish(graph, encoder, item, start(graph, backend, item))


@dataclass(slots=True)
class Started:
    """A model run queued (a GPU backend's ``submit``) or done; ``collect`` gives outputs."""

    collect: Callable[[], Mapping[str, Any]]
    at: float


def start(graph: ServedModel, backend: Backend, item: Prepared) -> Started:
    """Start the model on a batch: queued on the GPU where the backend can (``submit``).

    A backend with ``submit(feeds)`` returns a ``collect`` callable without waiting for
    the device (`backends.streams`: the host waits in ``collect``); any other runs
    ``infer`` here. Raises whatever the backend raised.
    """
    feeds = {name: _feed(item.batch.columns[name]) for name in graph.info.inputs}
    gpu = getattr(backend, "gpu", None)
    if gpu is not None:
        gpu.hand_over(item.ready)  # the inference stream waits on it, not the host
    at = time.monotonic()
    submit = getattr(backend, "submit", None)
    if submit is not None:
        return Started(submit(feeds), at)
    outputs = backend.infer(feeds)
    return Started(lambda: outputs, at)


def finish(
    graph: ServedModel, encoder: OutcomeEncoder, item: Prepared, started: Started
) -> list[Outcome]:
    """Collect a started run's outputs, postprocess them and encode every row's outcome."""
    batch = item.batch
    outputs = started.collect()
    t1 = time.monotonic()
    # Postprocess sees what fed the model too (an attention mask for pooling, say).
    post = run_stages(graph.postprocess, Batch(batch.rows, {**batch.columns, **outputs}))
    t2 = time.monotonic()
    outcomes = [encoder.dead_letter(r, reason, msg) for r, reason, msg in post.rejected]
    item.compute_ms, item.postprocess_ms = (t1 - started.at) * 1000.0, (t2 - t1) * 1000.0
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
            raise StageContractError(
                f"stage {stage.name} returned {len(batch)} rows and {len(batch.rejected)} "
                f"rejects for {before} rows in"
            )
    return batch


def _feed(column: Any) -> Any:
    """A column as the backend takes it: device arrays as they are, the rest as NumPy."""
    return column if is_device_array(column) else np.asarray(column)
