"""What happens when a model run fails: retry what looks transient, then isolate poison.

A failing run is retried on the same instance while its error looks transient (out of
memory: `RetrySettings.transient`), with jittered exponential backoff. Then, or at once
for any other error, the batch is treated as holding poison: it is halved, and each
failing half halved again, until every failing request is alone. Those become
``inference_failed`` dead letters naming the error; every other request gets its result,
from the smaller batch it ran in. One poison request in a batch of n costs about
2·log2(n) extra runs; the hunt stops splitting after `isolation_budget` runs (enough to
isolate `ISOLATE` poison requests wherever they sit), so a model that fails every input
costs a bounded number of runs per batch, not 2n.

Every front door gets this through `pipeline.serving.runtime.ModelRuntime`.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence

from pipeline.config.topology import RetrySettings
from pipeline.observability.metrics import Metrics
from pipeline.serving.outcomes import Outcome
from pipeline.serving.steps import Prepared
from schemas.errors import describe
from schemas.messages import Envelope
from stages.base import Batch

__all__ = ["ISOLATE", "Recovery", "halve", "isolation_budget"]

log = logging.getLogger(__name__)

ISOLATE = 8
"""Poison requests one batch's hunt can always isolate, wherever they sit in it."""

Run = Callable[[Prepared], list[Outcome]]
"""One model run of a prepared batch on a chosen instance; raises when the run fails."""


class Recovery:
    """Serves one prepared batch until every row has an outcome, whatever fails."""

    def __init__(
        self,
        model: str,
        retry: RetrySettings,
        letters: Callable[[Sequence[Envelope], str], list[Outcome]],
        metrics: Metrics,
    ) -> None:
        self.model = model
        self.retry = retry
        self.letters = letters  # rows + error → their inference_failed dead letters
        self.metrics = metrics
        self._rng = random.Random()  # backoff jitter

    def serve(self, run: Run, item: Prepared, instance: int) -> tuple[list[Outcome], float]:
        """Every row's outcome; also the seconds spent sleeping between retries."""
        retry, slept, attempt = self.retry, 0.0, 1
        while True:
            try:
                return run(item), slept
            except Exception as e:
                failure = e
            error = describe(failure)
            if attempt >= retry.max_attempts or not retry.is_transient(error):
                break
            delay = retry.backoff_s(attempt, self._rng)
            log.warning(
                "model %s instance %d: run %d of %d failed transiently, again in %.0f ms: %s",
                *(self.model, instance, attempt, retry.max_attempts, delay * 1e3, error),
            )
            self.metrics.inference_retries.labels(self.model).inc()
            time.sleep(delay)  # this instance's thread only; no lock is held
            slept += delay
            attempt += 1
        rows = item.batch.rows
        if not retry.split_on_failure or len(rows) == 1:
            # The traceback once per batch: a stage's bug shows where it is.
            log.warning("model %s: a batch of %d failed", self.model, len(rows), exc_info=failure)
            return self.letters(rows, error), slept
        log.warning(
            "model %s: a batch of %d failed; halving it", self.model, len(rows), exc_info=failure
        )
        return self._isolate(run, item), slept

    def _isolate(self, run: Run, item: Prepared) -> list[Outcome]:
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
                outcomes += run(part)
                continue
            except Exception as e:
                error = describe(e)
            if len(part.batch) > 1 and runs < budget:
                pending.extend(reversed(halve(part)))
                splits += 1
                continue
            (alone if len(part.batch) == 1 else unisolated).extend(part.batch.rows)
            outcomes += self.letters(part.batch.rows, error)
        self.metrics.batch_splits.labels(self.model).inc(splits)
        ids = ", ".join(r.request.id if r.request else "?" for r in alone[:10])
        past = f"; {len(unisolated)} more in parts failing past the budget" if unisolated else ""
        log.warning(
            "model %s: %d of a batch of %d fail alone (%s)%s; %d runs, %d splits",
            *(self.model, len(alone), len(item.batch), ids, past, runs, splits),
        )
        return outcomes


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
        half = Prepared(Batch(batch.rows[lo:hi], columns), item.started, item.preprocess_ms, [])
        half.ready = item.ready  # the halves' data was written by the same preprocessing
        return half

    return part(0, mid), part(mid, n)


def isolation_budget(n: int) -> int:
    """Runs a poison hunt in a batch of ``n`` may make before it stops splitting.

    Isolating one poison request runs two halves per level, 2·⌈log2 n⌉ runs; ``ISOLATE``
    of them at most ``ISOLATE`` times that. Past the budget a failing part becomes dead
    letters whole, so a model that fails on everything costs this many runs, not 2n.
    """
    return 2 * ISOLATE * max(1, math.ceil(math.log2(max(n, 2))))
