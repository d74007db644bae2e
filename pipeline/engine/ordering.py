"""Results in offset order per key or per partition, while batches mix keys: the reorder buffer.

A model's rows are batched across keys and its instances finish batches in any order
(a slow and a fast instance, a retried batch, a batch split to isolate poison), so
outcomes reach the Kafka loop out of offset order. A model with ``ordering: key`` or
``ordering: partition`` (`ModelSettings.ordering`) gets them published in order anyway:

- When a consumed batch is admitted, each row of such a model takes its place at the end
  of its *sequence*: its partition's (``partition``), or its partition's and record
  key's (``key``). Rows are admitted in offset order, so a sequence is in offset order.
- An outcome (result, EXPIRED result or dead letter: every admitted row ends as exactly
  one) of a sequenced row is held until every row before it in its sequence has been
  released, then released with them, in order. Everything else passes straight through.

``ordering: key`` keeps the order the key names: records without a key name none, so
they are not held (they pass through as with ``none``; ``kp_reorder_unkeyed_total``
counts them). Keys are compared per partition: Kafka orders a key's records only within
the partition its producer chose.

Bounds: a held outcome's record is still in flight (not acknowledged, so not committed),
so the buffer counts in the in-flight window (``flow.max_in_flight``), whose backpressure
pauses consuming when it fills; nothing here grows on its own. A head-of-line row always
finishes (the runtime gives every row an outcome: deadlines, retries, dead letters), so
the rows behind it never wait for ever. What waits is measured: outcomes held now
(``kp_reorder_held``) and the time each one waited (``kp_reorder_wait_seconds``).

Exactly-once delivery publishes every partition in offset order already (it must, for its
offsets and outcomes to commit together), so it needs no sequencer.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from pipeline.observability.metrics import Metrics
from pipeline.serving.outcomes import Outcome
from schemas.messages import Envelope

__all__ = ["ORDERINGS", "Sequencer"]

ORDERINGS = ("none", "partition", "key")
"""What ``ordering`` may say: no order, offset order per partition, per key."""


def _position(env: Envelope) -> tuple[str, int, int]:
    return env.topic, env.partition, env.offset


@dataclass(slots=True)
class _Sequence:
    """Rows of one sequence in offset order, and the outcomes that wait for earlier ones."""

    name: Hashable
    model: str
    rows: deque[int] = field(default_factory=deque)  # id() of each row's envelope
    ready: dict[int, tuple[Outcome, float]] = field(default_factory=dict)  # held, since


class Sequencer:
    """The reorder buffer of one replica: which rows are sequenced, and what is held.

    ``orderings`` maps models to their ``ordering`` (those with ``none`` are left out).
    Rows of a ``key`` model without a key, and each held outcome's wait, are counted in
    ``metrics`` when given.
    """

    def __init__(self, orderings: Mapping[str, str], metrics: Metrics | None = None) -> None:
        self.orderings = {m: o for m, o in orderings.items() if o != "none"}
        self.metrics = metrics
        self._sequences: dict[Hashable, _Sequence] = {}
        self._sequence_of: dict[int, tuple[_Sequence, Envelope]] = {}  # row id -> its sequence
        self.held = 0  # outcomes waiting for an earlier row of their sequence

    def __bool__(self) -> bool:
        return bool(self.orderings)

    def held_by_model(self) -> dict[str, int]:
        """Outcomes held now, per model; also set on the gauge, when there are metrics."""
        counts = dict.fromkeys(self.orderings, 0)
        for seq in self._sequences.values():
            counts[seq.model] += len(seq.ready)
        if self.metrics is not None:
            for model, held in counts.items():
                self.metrics.reorder_held.labels(model).set(held)
        return counts

    def admit_groups(self, groups: Mapping[tuple[str, Hashable], Sequence[Envelope]]) -> None:
        """A consumed batch's admitted rows, grouped by (model, batch key), join their sequences.

        A model's rows may be split over several groups (shape buckets): they are put back
        in offset order first, so each sequence stays in offset order.
        """
        by_model: dict[str, list[Sequence[Envelope]]] = {}
        for (model, _), members in groups.items():
            if model in self.orderings:
                by_model.setdefault(model, []).append(members)
        for model, parts in by_model.items():
            if len(parts) == 1:
                self.admit(model, parts[0])
            else:
                self.admit(model, sorted((e for p in parts for e in p), key=_position))

    def admit(self, model: str, rows: Sequence[Envelope]) -> None:
        """Rows of ``model``, in offset order per partition: they join their sequences' ends."""
        how = self.orderings.get(model)
        if how is None:
            return
        unkeyed = 0
        sequences, sequence_of = self._sequences, self._sequence_of
        for env in rows:
            if how == "key":
                if env.key is None:
                    unkeyed += 1
                    continue
                name: Hashable = (model, env.topic, env.partition, env.generation, env.key)
            else:
                name = (model, env.topic, env.partition, env.generation)
            seq = sequences.get(name)
            if seq is None:
                seq = sequences[name] = _Sequence(name, model)
            seq.rows.append(id(env))
            sequence_of[id(env)] = (seq, env)  # keeps env alive, so its id stays its own
        if unkeyed and self.metrics is not None:
            self.metrics.reorder_unkeyed.labels(model).inc(unkeyed)

    def release(self, outcomes: Iterable[Outcome]) -> list[Outcome]:
        """The outcomes that may be published now, in the order they must be.

        The usual outcome is its sequence's head with nothing held behind it (batches of
        one instance finish in order): it goes out at once. Others are held, and each
        sequence they touched releases its ready run, in offset order, after the rest.
        """
        out: list[Outcome] = []
        touched: dict[int, _Sequence] = {}
        sequence_of, now = self._sequence_of, time.monotonic()
        for outcome in outcomes:
            env = outcome.envelope
            row = id(env)
            placed = sequence_of.get(row)
            if placed is None or placed[1] is not env:  # not sequenced
                out.append(outcome)
                continue
            seq = placed[0]
            if seq.rows[0] == row and not seq.ready:  # the head, and none held behind it
                seq.rows.popleft()
                del sequence_of[row]
                out.append(outcome)
                if not seq.rows:
                    del self._sequences[seq.name]
                continue
            seq.ready[row] = (outcome, now)
            self.held += 1
            touched[id(seq)] = seq
        for seq in touched.values():
            self._drain(seq, out, now)
        return out

    def _drain(self, seq: _Sequence, out: list[Outcome], now: float) -> None:
        """Release the ready run at the head of ``seq``; drop it once empty."""
        waits: list[float] = []
        rows, ready = seq.rows, seq.ready
        while rows and rows[0] in ready:
            row = rows.popleft()
            outcome, since = ready.pop(row)
            del self._sequence_of[row]
            out.append(outcome)
            waits.append(now - since)
        self.held -= len(waits)
        if waits and self.metrics is not None:
            self.metrics.reorder_wait.observe_many(seq.model, waits)
        if not rows:
            del self._sequences[seq.name]

    def forget(self, partitions: Iterable[tuple[str, int]]) -> None:
        """Drop the sequences of partitions let go, with what they hold.

        Their records are the next owner's to serve; outcomes held for them would be of
        an older generation, which delivery ignores anyway.
        """
        gone = set(partitions)
        for name in [n for n in self._sequences if (n[1], n[2]) in gone]:  # type: ignore[index]
            seq = self._sequences.pop(name)
            self.held -= len(seq.ready)
            for row in seq.rows:
                self._sequence_of.pop(row, None)
