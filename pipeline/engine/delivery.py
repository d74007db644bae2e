"""Getting outcomes to Kafka and committing the offsets they answer, under two guarantees.

Long because both guarantees share their refusal handling, and the at-least-once commit
points need their reasoning next to the code (all of it is the delivery contract).

**At-least-once** (`AtLeastOnce`): outcomes are produced as soon as they are ready, with
no Python callback per delivered record. Records become done at *commit points*, a batch
at a time. The replica's own producer is a `pipeline.kafka.batch_producer.BatchProducer`
where one can serve: each published batch is one ``send``, librdkafka's delivery reports
are counted against their batch in C (during the loop's ``poll(0)``, GIL released), and
a batch's commit point is the moment its last report is counted: `BatchProducer.resolved`
says so after each poll, with every failed record's batch and index. Nothing waits in
``flush`` except a forced commit (revoke, shutdown). A failure is handled as below
(stand-in or fatal) before its batch is marked delivered, and a record refused at
``send`` (too large, not bytes) is treated as a failure at once.

With confluent-kafka's producer (no compiler at install, a callback in the settings,
``KP_BATCH_PRODUCER=0``, or a producer handed in) it runs with
``delivery.report.only.error``, so librdkafka reports only the records it failed to
deliver, and commit points are found this way:

- A commit point is a moment when the producer holds nothing (``len(producer) == 0``:
  librdkafka counts every record produced and not yet acknowledged, and every delivery
  report not yet served). Then every outcome produced before it was either acknowledged
  by the broker, or its failure was reported to this module's callback, during a
  ``poll`` or ``flush`` that ran before the count reached zero. So the outcomes produced
  before the point, less those reported failed, are delivered: their offsets are marked
  done (`OffsetTracker.done_many`, per partition and generation) and counted.
- The loop checks for a free commit point after each ``poll(0)``; when none came for a
  while (``confirm_every`` outcomes waiting, or a commit due) it makes one with
  ``flush``, which sends at once (ignoring ``linger.ms``) and returns when everything
  produced is acknowledged: about one broker round trip. It waits at most
  ``_POINT_WAIT_S`` (a forced commit on revoke or shutdown: ``timeout_s``); a broker
  that is slow or away then gives no point, in-flight work grows to the backpressure
  mark, the consumer pauses, and the producer's drained queue gives the next one.
- Then the consumer commits each partition's contiguous done prefix
  (`pipeline.engine.offsets`). An offset is therefore committed only after its outcome is
  acknowledged, as before: a crash at any moment repeats what was in flight or produced
  since the last commit point, never less; duplicates stay bounded by the in-flight window.
- A record the broker refuses for good (too large, topic gone) is reported to
  `Delivery.on_report`, the producer's one default callback (``on_delivery`` in its
  settings, so no record carries a callback of its own), which finds its outcome among
  those produced since the last commit point by topic and value (a value names its
  source record, so it is unique there). That outcome is left out of the commit point
  and replaced by its dead letter (`Delivery.replacement`, an ``undeliverable`` result or
  a trimmed dead letter), produced next turn; the record becomes done at the commit
  point after its stand-in. Dead letters stay one per record. Any other failure is
  fatal: its record stays not done, so nothing at or past it commits, and a restart
  serves it again.
- Outcomes of a partition revoked meanwhile carry an older generation: the tracker
  ignores them when their commit point comes.

**Exactly-once** (`ExactlyOnce`): consume-process-produce inside Kafka transactions, the
way Kafka Streams' EOS v2 (KIP-447) does it. Outcomes are held until every earlier record
of their partition has its outcome too, then produced into the open transaction in offset
order; each commit interval the transaction gets the offsets of exactly that prefix
(``send_offsets_to_transaction`` with the consumer's group metadata) and commits. So a
transaction's outcomes and its offsets move together: after a crash, a ``read_committed``
reader sees each outcome once, and the replica serves again exactly what the last
committed transaction did not cover. Holding to the prefix is what makes that exact: an
outcome committed ahead of its offset would be served, and published, twice. The
transaction's commit is its commit point: it needs no per-record delivery callback (one
is attached only after an abort, to find which outcome the broker refused).

The transactional id is the replica's and stays the same across restarts: the restarted
replica's ``init_transactions`` fences the old producer (a zombie that was only paused
gets a fatal error on its next call and stops) and aborts whatever it left open. The
group metadata sent with the offsets lets the broker refuse a commit from a member the
group has already replaced.

Both share what happens when the broker refuses an outcome for good (too large, topic
gone): the request becomes a dead letter instead, see `Delivery.replacement`.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from pipeline.engine.offsets import OffsetTracker
from pipeline.engine.rows import offset_runs, produce_plain
from pipeline.kafka.batch_producer import BatchProducer
from pipeline.kafka.refusals import is_permanent
from pipeline.serving.outcomes import Outcome, OutcomeEncoder
from schemas.errors import describe
from schemas.messages import Partition, partition_of

__all__ = ["AtLeastOnce", "Delivery", "ExactlyOnce"]

log = logging.getLogger(__name__)

# A newer producer with our transactional id exists: we are the zombie.
_FENCED = frozenset(
    {KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH}
)

Positions = dict[Partition, int]

# The longest a periodic commit point waits for the producer to flush (a forced one, on
# revoke and shutdown, waits timeout_s): about a broker round trip is what it takes.
_POINT_WAIT_S = 0.1

# The shortest gap between two commits of a replica with nothing left in flight: every
# transaction writes a marker to each partition it touched, so they are not free.
_IDLE_COMMIT_S = 0.01


def _refusal(e: Exception) -> KafkaError:
    return KafkaError(KafkaError.TOPIC_EXCEPTION, describe(e))


def _send(
    producer: Producer,
    out: Outcome,
    callback: Callable[[KafkaError | None, Message], None] | None,
) -> None:
    """``produce`` with keywords only where the outcome needs them (each costs ~0.4 µs)."""
    if callback is None:
        if out.headers is None:
            producer.produce(out.topic, out.value, out.envelope.key)
        else:
            producer.produce(out.topic, out.value, out.envelope.key, headers=out.headers)
    else:
        producer.produce(
            out.topic, out.value, out.envelope.key, headers=out.headers, on_delivery=callback
        )


class Delivery:
    """What both guarantees share: the clients, the tracker, and refused outcomes.

    ``on_acked`` is called with each batch of outcomes readers can now see (for counting);
    ``on_committed`` with the positions committed. ``pending`` holds outcomes to publish
    on the next turn (dead letters standing in for refused results); ``fatal`` is set
    when the pipeline must stop, saying why.
    """

    def __init__(
        self,
        producer: Producer,
        consumer: Consumer,
        tracker: OffsetTracker,
        encoder: OutcomeEncoder,
        on_acked: Callable[[Sequence[Outcome]], None],
        on_committed: Callable[[Positions], None],
        commit_interval_ms: int,
        timeout_s: float = 30.0,
        confirm_every: int = 1000,
        default_reports: bool = False,
    ) -> None:
        self.producer = producer
        # The producer was built with `on_report` as its default delivery callback (its
        # ``on_delivery`` setting), so a record is produced without one of its own:
        # confluent-kafka spends ~0.5 µs of the loop's time on each callback it is handed.
        self.default_reports = default_reports
        self.consumer = consumer
        self.tracker = tracker
        self.encoder = encoder
        self.on_acked = on_acked
        self.on_committed = on_committed
        self.commit_interval_s = commit_interval_ms / 1000.0
        self.timeout_s = timeout_s  # of one blocking call to the cluster
        self.confirm_every = confirm_every  # outcomes waiting that make a commit point
        self.pending: list[Outcome] = []
        self.fatal: str | None = None
        self.transactions = {"committed": 0, "aborted": 0}  # stays 0 at-least-once
        self._last_commit = time.monotonic()

    def start(self) -> None:
        """Anything to do with the cluster before the first record is consumed."""

    def publish(self, outcomes: Iterable[Outcome]) -> None:
        """Send outcomes on their way (or hold them, for exactly-once)."""
        raise NotImplementedError

    def confirm(self, force: bool, wait: float | None = None) -> None:
        """Mark what is delivered done, at a commit point; ``force``: make one now."""

    def commit(self, force: bool) -> None:
        """Commit what is done, when the commit interval has passed or ``force``."""
        raise NotImplementedError

    def settle(self, timeout: float) -> int:
        """Deliver and commit everything publishable; returns outcomes still undelivered."""
        raise NotImplementedError

    def commit_done(self, err: KafkaError | None, offsets: list[TopicPartition]) -> None:
        """The consumer's answer to one of its commits (exactly-once commits none)."""

    def lost(self, partitions: list[Partition]) -> None:
        """Partitions were taken without a chance to commit: drop what they owe."""

    def forget(self, partitions: list[Partition]) -> None:
        """Partitions were let go after their last commit: drop anything kept for them."""

    def _take_pending(self) -> list[Outcome]:
        pending, self.pending = self.pending, []
        return pending

    def _due(self, force: bool) -> bool:
        now = time.monotonic()
        if not force and now - self._last_commit < self.commit_interval_s:
            return False
        self._last_commit = now
        return True

    def on_report(self, err: KafkaError | None, msg: Message) -> None:
        """A delivery report from the producer (with ``delivery.report.only.error``, failures)."""

    def _produce(
        self, out: Outcome, callback: Callable[[KafkaError | None, Message], None] | None
    ) -> bool:
        """Produce, waiting while the producer's queue is full; False if refused at once."""
        while True:
            try:
                _send(self.producer, out, callback)
                return True
            except BufferError:  # the producer's queue is full: let it drain
                self.producer.poll(0.05)
            except (KafkaException, ValueError, TypeError) as e:  # refused before sending
                # (too large, unknown topic; a name librdkafka cannot even take raises
                # ValueError): permanent, so the request becomes a dead letter.
                err = e.args[0] if isinstance(e, KafkaException) else _refusal(e)
                replacement = self.replacement(out, err)
                if replacement is not None:
                    self.pending.append(replacement)
                return False

    def replacement(self, out: Outcome, err: KafkaError) -> Outcome | None:
        """The dead letter to send instead of an outcome the broker refused for good.

        See `OutcomeEncoder.stand_in`. Any other failure sets ``fatal``: the record stays
        uncommitted and a restart serves it again, rather than running on with a hole in
        the partition.
        """
        env = out.envelope
        where = f"{env.topic}/{env.partition}@{env.offset}"
        if not is_permanent(err.code()):
            self.fatal = self.fatal or f"delivery to {out.topic} failed for {where}: {err}"
            return None
        stand_in = self.encoder.stand_in(out, err.str())
        if stand_in is None:
            self.fatal = self.fatal or f"dead letter for {where} cannot be written: {err}"
        return stand_in


@dataclass(slots=True)
class _Sent:
    """Outcomes produced by one `AtLeastOnce.publish`, waiting for a commit point."""

    outcomes: list[Outcome] = field(default_factory=list)
    failed: set[int] = field(default_factory=set)  # indexes the broker reported failed
    batch: int = -1  # its id at a `BatchProducer`
    _where: dict[tuple[str, bytes], int] | None = None

    def find(self, topic: str | None, value: bytes | None) -> int | None:
        """Index of the outcome produced with this topic and value (built on first use)."""
        if self._where is None:
            self._where = {(o.topic, o.value): i for i, o in enumerate(self.outcomes)}
        return self._where.get((topic or "", value or b""))


class AtLeastOnce(Delivery):
    """Produce at once; at commit points mark what was delivered done; commit the prefix."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sent: deque[_Sent] = deque()  # produced since the last commit point
        self._waiting = 0  # outcomes in them
        # The replica's own producer for at-least-once, where it could build one.
        self._batches: BatchProducer | None = (
            self.producer if isinstance(self.producer, BatchProducer) else None
        )

    def publish(self, outcomes: Iterable[Outcome]) -> None:
        """Produce each one now; failures come to `on_report` (or `_resolve`).

        With a `BatchProducer` the whole list is one call, and one batch to be resolved.

        The usual outcome (no headers, the producer's default callback) goes out in one
        compiled pass over the batch (`rows.produce_plain`: positionally, as keywords
        cost); one with headers, a callback of its own, or that the producer refused is
        produced (or replaced) by `_produce`, and the pass goes on after it. The list is
        kept, as the outcomes produced since the last commit point.
        """
        outs = outcomes if type(outcomes) is list else list(outcomes)
        if self._batches is not None:
            if outs:
                self._send_batch(outs)
            return
        report = None if self.default_reports else self.on_report
        refused: list[int] = []
        i, n = 0, len(outs)
        while i < n:
            if report is None:
                i = produce_plain(self.producer.produce, outs, i)
                if i == n:
                    break
            if not self._produce(outs[i], report):
                refused.append(i)
            i += 1
        if refused:
            gone = set(refused)
            outs = [out for j, out in enumerate(outs) if j not in gone]
        if outs:
            self._sent.append(_Sent(outs))
            self._waiting += len(outs)

    def _send_batch(self, outs: list[Outcome]) -> None:
        """One `BatchProducer.send`; what it refused at once is replaced like a failure."""
        assert self._batches is not None
        batch, refused = self._batches.send(outs)
        sent = _Sent(outs, batch=batch)
        for i, code, reason in refused:
            self._failed(sent, i, KafkaError(code, reason))
        self._sent.append(sent)
        self._waiting += len(outs)

    def _failed(self, sent: _Sent, i: int, err: KafkaError) -> None:
        sent.failed.add(i)
        replacement = self.replacement(sent.outcomes[i], err)
        if replacement is not None:
            self.pending.append(replacement)

    def _resolve(self, flush: float | None) -> None:
        """A `BatchProducer`'s commit points: each batch whose records all have a report.

        Its reports were served by the loop's ``poll`` (or this ``flush``, on a forced
        commit) in C; failures come first, so a batch is never marked delivered before
        its failed records are left out of it and their stand-ins are pending.
        """
        assert self._batches is not None
        if flush is not None:
            self._batches.flush(flush)
        done, failures = self._batches.resolved()
        # A producer failed for good (idempotence broken) purges what it holds: say why.
        fatal = self._batches.fatal_error() if failures else None
        for batch, i, code, reason in failures:
            why = reason if fatal is None else f"{reason} (the producer failed: {fatal[1]})"
            self._failed(self._sent[batch - self._sent[0].batch], i, KafkaError(code, why))
        for _ in range(done):
            sent = self._sent.popleft()
            self._waiting -= len(sent.outcomes)
            self._delivered(sent)

    def on_report(self, err: KafkaError | None, msg: Message) -> None:
        """A delivery report: with ``delivery.report.only.error``, only failures come.

        The failed outcome is in a batch produced since the last commit point (the point
        waits until every report is served), found by topic and value.
        """
        if err is None:  # a producer reporting successes too: the commit point decides
            return
        topic, value = msg.topic(), msg.value()
        for sent in reversed(self._sent):
            i = sent.find(topic, value)
            if i is not None:
                break
        else:  # cannot happen: every outcome produced since the last point is kept
            self.fatal = self.fatal or f"delivery failed for an unknown record: {err}"
            return
        sent.failed.add(i)
        replacement = self.replacement(sent.outcomes[i], err)
        if replacement is not None:
            self.pending.append(replacement)

    def confirm(self, force: bool, wait: float | None = None) -> None:
        """At a commit point, mark every outcome produced before it (and not failed) done.

        Free when the producer holds nothing; made with ``flush`` when ``force``, or when
        `confirm_every` outcomes wait for one, waiting at most ``wait`` seconds (default
        `_POINT_WAIT_S`). A flush that does not finish in time (the broker is slow or
        away) makes no point: the outcomes wait for a later one.
        """
        if not self._sent:
            return
        if self._batches is not None:
            self._resolve(wait if force and wait is not None else None)
            return
        if len(self.producer):
            if not (force or self._waiting >= self.confirm_every):
                return
            if self.producer.flush(_POINT_WAIT_S if wait is None else wait):
                return
        sent, self._sent, self._waiting = self._sent, deque(), 0
        for batch in sent:
            self._delivered(batch)

    def _delivered(self, sent: _Sent) -> None:
        outcomes = sent.outcomes
        if sent.failed:
            outcomes = [o for i, o in enumerate(outcomes) if i not in sent.failed]
        for (topic, partition, generation), offsets in offset_runs(outcomes).items():
            self.tracker.done_many((topic, partition), offsets, generation)
        self.on_acked(outcomes)

    def commit(self, force: bool) -> None:
        """Commit the consumer's done prefixes: asynchronously, or synchronously if forced.

        A commit point comes first, so a commit covers everything delivered by then; a
        periodic commit waits at most `_POINT_WAIT_S` for it (a broker that is slow or
        away must not stall the loop), a forced one (revoke, shutdown) ``timeout_s``.
        """
        if not self._due(force):
            return
        self.confirm(force=True, wait=self.timeout_s if force else None)
        positions = self.tracker.committable()
        if not positions:
            return
        offsets = [TopicPartition(t, p, o) for (t, p), o in positions.items()]
        try:
            if force:
                self.consumer.commit(offsets=offsets, asynchronous=False)
            else:
                self.consumer.commit(offsets=offsets, asynchronous=True)
        except Exception as e:  # a failed commit is retried with the next one
            log.warning("commit failed (will retry): %s", e)
            return
        self.tracker.mark_committed(positions)
        self.on_committed(positions)

    def commit_done(self, err: KafkaError | None, offsets: list[TopicPartition]) -> None:
        """The consumer's answer to a commit (its ``on_commit``): retry what failed.

        `commit` marks positions committed when it hands them over, so that an unchanged
        position is not committed again every interval. An asynchronous commit that then
        fails (the broker went away, a coordinator moved) must be offered again: otherwise
        a partition that makes no further progress keeps a stale committed offset, which
        lag exporters and autoscalers read as lag that never drains, and a restart would
        serve its records again.
        """
        failed = [
            tp for tp in offsets if (err is not None or tp.error is not None) and tp.offset >= 0
        ]
        retried = [tp for tp in failed if self.tracker.commit_failed(partition_of(tp), tp.offset)]
        if retried:
            log.warning(
                "commit of %d partitions failed (%s); it is retried with the next commit",
                len(retried),
                err if err is not None else retried[0].error,
            )
            self._last_commit = 0.0  # the next turn commits, not one interval later

    def settle(self, timeout: float) -> int:
        """Flush the producer (and stand-in dead letters), then commit synchronously."""
        deadline = time.monotonic() + timeout
        remaining = self.producer.flush(max(0.0, timeout))
        while self.pending and self.fatal is None and time.monotonic() < deadline:
            self.publish(self._take_pending())  # dead letters for results refused meanwhile
            remaining = self.producer.flush(max(0.0, deadline - time.monotonic()))
        if self.fatal is None:
            self.commit(force=True)
        return remaining + self._waiting


class ExactlyOnce(Delivery):
    """Outcomes and offsets committed together in one transaction per commit interval."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Outcomes waiting for an earlier record of their partition, by offset.
        self._held: defaultdict[Partition, dict[int, Outcome]] = defaultdict(dict)
        self._in_txn: list[Outcome] = []  # produced into the open transaction
        self._refused: dict[int, KafkaError] = {}  # id(outcome) -> the broker's refusal
        self._open = False
        # Delivery reports are asked for only after an abort, to find which outcome the
        # broker refused: a callback per outcome costs the main loop ~5% of its time.
        self._watch = False
        # The periodic commit runs on its own thread: the main loop keeps consuming and the
        # models keep running meanwhile; outcomes wait in _held until it is over.
        self._committing: threading.Thread | None = None
        self._commit_error: KafkaError | None = None
        self._commit_positions: Positions = {}

    def start(self) -> None:
        """Fence an older producer with this transactional id; abort what it left open."""
        self.producer.init_transactions(self.timeout_s)

    def publish(self, outcomes: Iterable[Outcome]) -> None:
        """Hold each one until its partition's earlier records have theirs, then produce."""
        touched = set()
        for out in outcomes:
            env = out.envelope
            tp = partition_of(env)
            if self.tracker.generation(tp) != env.generation:
                continue  # the partition moved on: its new owner serves the record
            self._held[tp][env.offset] = out
            touched.add(tp)
        if self._committing is None:  # else released once the commit is over
            for tp in touched:
                self._release(tp)

    def _release(self, tp: Partition) -> None:
        """Produce the held outcomes that continue the partition's done prefix, in order."""
        held = self._held[tp]
        while held:
            oldest = self.tracker.oldest(tp)
            if oldest is None or oldest[0] not in held:
                break
            released: dict[int, list[int]] = {}  # by generation (one, unless revoked)
            offset = oldest[0]
            while offset in held:  # the held run from the oldest on, as one batch
                out = held.pop(offset)
                self._send(out)
                released.setdefault(out.envelope.generation, []).append(offset)
                offset += 1  # past a gap (compaction), the outer loop asks the tracker
            for generation, offsets in released.items():
                self.tracker.done_many(tp, offsets, generation)

    def _send(self, out: Outcome) -> None:
        if not self._open:
            self.producer.begin_transaction()
            self._open = True
        callback = functools.partial(self._delivered, out) if self._watch else None
        if self._produce(out, callback):
            self._in_txn.append(out)
        else:
            # Refused before sending: its stand-in goes in this transaction, in its place.
            for replacement in self._take_pending():
                self._send(replacement)

    def _delivered(self, out: Outcome, err: KafkaError | None, _: Message) -> None:
        if err is not None:
            self._refused[id(out)] = err  # the commit will fail; the retry replaces it

    def commit(self, force: bool) -> None:
        """Send the done prefixes' offsets into the open transaction and commit it.

        Forced (revoke, shutdown), it commits here and now; otherwise on a thread of its
        own, whose end a later call takes note of. The commit costs round trips to two
        coordinators and the flush of every outcome in the transaction (30–50 ms a
        commit, measured on Tansu), time the main loop spends serving instead.
        """
        if self._committing is not None:
            if force:
                self._committing.join()
            elif self._committing.is_alive():
                return
            self._committed()
            if not force:
                return
        if not self._open or not (self._due(force) or self._idle()):
            return
        positions = self.tracker.committable()
        if force:
            self._settled(self._end_transaction(positions), positions)
            return
        self._commit_positions = positions
        self._committing = threading.Thread(
            target=self._commit_in_background, args=(positions,), name="kp-commit", daemon=True
        )
        self._committing.start()

    def _idle(self) -> bool:
        """Nothing consumed is left outside the open transaction: commit it now.

        Under load the interval paces commits; when the work runs dry (the end of a
        backlog, a quiet moment) waiting out the interval would only delay the outcomes.
        """
        gap = max(_IDLE_COMMIT_S, self.commit_interval_s / 10)  # at most 10 per interval
        if self.tracker.in_flight or time.monotonic() - self._last_commit < gap:
            return False
        self._last_commit = time.monotonic()
        return True

    def _end_transaction(self, positions: Positions) -> KafkaError | None:
        offsets = [TopicPartition(t, p, o) for (t, p), o in positions.items()]
        try:
            if offsets:
                self.producer.send_offsets_to_transaction(
                    offsets, self.consumer.consumer_group_metadata(), self.timeout_s
                )
            self.producer.commit_transaction(self.timeout_s)
        except KafkaException as e:
            return cast(KafkaError, e.args[0])
        return None

    def _commit_in_background(self, positions: Positions) -> None:
        self._commit_error = self._end_transaction(positions)

    def _committed(self) -> None:
        """Take note of the background commit's end; release what waited for it."""
        self._committing = None
        self._settled(self._commit_error, self._commit_positions)
        for tp in list(self._held):
            self._release(tp)

    def _settled(self, err: KafkaError | None, positions: Positions) -> None:
        if err is not None:
            self._failed(err)
            return
        self._open = False
        self._watch = False
        self.transactions["committed"] += 1
        committed, self._in_txn = self._in_txn, []
        if committed:
            self.on_acked(committed)
        self.tracker.mark_committed(positions)
        if positions:
            self.on_committed(positions)

    def _failed(self, err: KafkaError) -> None:
        if err.fatal():
            self._stop("transaction failed for good", err)
            return
        if not err.txn_requires_abort():
            log.warning("transaction commit failed (will retry): %s", err.str())
            return
        log.warning("transaction aborted (its outcomes go again): %s", err.str())
        self._abort_and_redo()

    def _stop(self, what: str, err: KafkaError) -> None:
        zombie = err.code() in _FENCED or "fenced" in err.str().lower()
        self.fatal = self.fatal or f"{what}: {err.str()}" + (
            " (a newer producer with this transactional id fenced this one: it replaced "
            "this replica, or two running replicas share one name; give each its own "
            "--replica-id)"
            if zombie
            else ""
        )

    def _abort_and_redo(self, drop: set[Partition] | None = None) -> None:
        """Abort the open transaction and produce its outcomes again in a new one.

        Outcomes the broker refused for good are replaced by their dead letters; those of
        partitions this replica no longer owns (or ``drop``) are left to the new owner.
        """
        try:
            self.producer.abort_transaction(self.timeout_s)
        except KafkaException as e:
            self._stop("cannot abort the transaction", e.args[0])
            return
        self._open = False
        self._watch = True  # the next attempt finds out which outcome is refused
        self.transactions["aborted"] += 1
        redo, self._in_txn = self._in_txn, []
        refused, self._refused = self._refused, {}
        for out in redo:
            env = out.envelope
            tp = partition_of(env)
            if (drop and tp in drop) or self.tracker.generation(tp) != env.generation:
                continue
            err = refused.get(id(out))
            if err is None:
                self._send(out)
                continue
            replacement = self.replacement(out, err)
            if replacement is not None:
                self._send(replacement)

    def settle(self, timeout: float) -> int:
        """Commit the open transaction, retrying until ``timeout``."""
        deadline = time.monotonic() + timeout
        while self._open and self.fatal is None and time.monotonic() < deadline:
            self.commit(force=True)
        return len(self._in_txn)

    def lost(self, partitions: list[Partition]) -> None:
        """Abort what the open transaction holds for them: the new owner serves it again."""
        if self._committing is not None:  # it may still commit; nothing to undo then
            self._committing.join()
            self._committed()
        gone = set(partitions)
        for tp in gone:
            self._held.pop(tp, None)
        owed = any((o.envelope.topic, o.envelope.partition) in gone for o in self._in_txn)
        if self._open and owed:
            self._abort_and_redo(drop=gone)

    def forget(self, partitions: list[Partition]) -> None:
        """Drop outcomes still held for them (their records go to the next owner)."""
        for tp in partitions:
            self._held.pop(tp, None)
