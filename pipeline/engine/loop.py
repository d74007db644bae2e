"""The main loop: consume, decode, batch, dispatch, publish, commit, apply backpressure.

All Kafka I/O happens on the thread that calls `Replica.run`; models run on their own
threads (`pipeline.serving.runtime`) and hand back encoded outcomes. A record's offset is
committed only with or after its outcome (result or dead letter), and only once every
earlier record of its partition has one too (`pipeline.engine.offsets`); how outcomes and
offsets reach Kafka, at least once or exactly once, is `pipeline.engine.delivery`'s.

Rebalances are cooperative: only moving partitions are revoked, their in-flight work
finished and committed (within ``flow.revoke_timeout_s``) first; the others keep serving.
A replica stopping during a rebalance commits again once the group has settled.

Long because the loop, the rebalance callbacks and the shutdown share the replica's state
and one ordering (finish, deliver, commit, then let go); apart, that order would be
spread over modules that each hold half of it.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from pipeline.config.topology import Topology
from pipeline.engine.accounting import Accounting, RunStats
from pipeline.engine.backpressure import Backpressure, wake_fetcher, warn_if_narrow
from pipeline.engine.batch_control import LagBatchControl, steer
from pipeline.engine.batcher import Flushed, MicroBatcher
from pipeline.engine.consumed import Consumed
from pipeline.engine.delivery import AtLeastOnce, Delivery, ExactlyOnce
from pipeline.engine.lag import LagMonitor
from pipeline.engine.offsets import OffsetTracker
from pipeline.engine.ordering import Sequencer
from pipeline.engine.ranges import BoundedRanges, names
from pipeline.kafka.batch_producer import serving_producer
from pipeline.kafka.clients import (
    close_producer,
    consumer_config,
    producer_config,
    reader_config,
    transactional_id,
)
from pipeline.kafka.clients import replica_id as kafka_replica_id
from pipeline.kafka.consume import consume_available
from pipeline.kafka.watch import ClientWatch
from pipeline.kafka.watch import weak_callback as _weak
from pipeline.observability.health import Health
from pipeline.observability.metrics import GpuSampler, Metrics
from pipeline.observability.tracing import Tracing
from pipeline.serving.graph import ServedModel
from pipeline.serving.intake import Intake
from pipeline.serving.outcomes import Outcome, OutcomeEncoder
from pipeline.serving.runtime import ModelRuntime
from pipeline.serving.scheduler import Classed, DeviceScheduler
from schemas.codec import AvroCodec
from schemas.errors import BrokerError
from schemas.messages import Envelope, Partition, partition_of

__all__ = ["Replica", "RunStats"]

log = logging.getLogger(__name__)


class Replica:
    """One replica: a consumer, the models' runtimes and a producer, wired to a topology."""

    batchers: dict[str, MicroBatcher[Any, Envelope]]  # per served model key
    runtimes: dict[str, ModelRuntime]
    controls: dict[str, LagBatchControl]  # of the models whose batching follows lag

    def __init__(
        self,
        topology: Topology,
        graph: list[ServedModel],
        bootstrap: str,
        codec: AvroCodec | None = None,
        embedded: bool = False,
        consumer: Consumer | None = None,
        producer: Producer | None = None,
        metrics: Metrics | None = None,
        health: Health | None = None,
        ranges: Mapping[Partition, tuple[int, int]] | None = None,
        replica_id: str | None = None,
        share_ranges: bool = False,
        tracing: Tracing | None = None,
    ) -> None:
        self.topology = topology
        self.tracing = tracing  # spans per request, when the topology asks (see tracing.py)
        self.flow = topology.flow
        self.codec = codec or AvroCodec()
        # A bounded run (a replay) serves [start, end) of each listed partition, assigned
        # directly (no group membership) or shared through its group (``share_ranges``),
        # and stops by itself once all of it is delivered.
        self.bounded = BoundedRanges(ranges, share_ranges) if ranges is not None else None
        self._group_offsets = (  # reads the shared replay group's commits (see ranges.py)
            Consumer(reader_config(topology.kafka, bootstrap, group_id=topology.kafka.group_id))
            if self.bounded is not None and self.bounded.shared
            else None
        )
        self.encoder = OutcomeEncoder(
            self.codec,
            topology.topics.output,
            topology.topics.dead_letter,
            reply_topics=ranges is None,
            propagate_headers=topology.topics.propagate_headers,
            result_encoding=topology.topics.result_encoding,
            tracing=tracing is not None,
        )
        self.metrics = metrics or Metrics()
        self.health = health or Health(topology.metrics.stale_after_s)
        self.accounting = Accounting(self.metrics, (m.name for m in graph))
        self.stats: RunStats = self.accounting.stats
        self._cooperative = False
        if consumer is None:
            consumer = self._consumer(bootstrap, embedded, replica_id)
        else:
            self.health.broker_up = True  # a test double: nothing to watch
        self.consumer = consumer
        self.exactly_once = topology.delivery == "exactly_once"
        self.transactional_id = (
            transactional_id(topology.kafka, replica_id) if self.exactly_once else None
        )
        own_producer = producer is None
        self.producer = self._producer(bootstrap) if producer is None else producer
        self.tracker = OffsetTracker()
        self.backpressure = Backpressure.of(self.flow)
        self.lag = LagMonitor(self.consumer)
        self.gpus = GpuSampler(self.metrics)
        self._completed: queue.SimpleQueue[list[Outcome]] = queue.SimpleQueue()
        self._pending: list[Outcome] = []
        self._fatal: str | None = None
        kind = ExactlyOnce if self.exactly_once else AtLeastOnce
        self.delivery: Delivery = kind(
            self.producer,
            self.consumer,
            self.tracker,
            self.encoder,
            self.accounting.acknowledged,
            self.accounting.committed,
            self.flow.commit_interval_ms,
            confirm_every=max(1, self.flow.max_in_flight // 4),
            default_reports=own_producer and not self.exactly_once,
        )
        self.intake = Intake.for_topology(graph, self.codec, self.encoder, topology, self.metrics)
        self.sequencer = Sequencer(  # exactly-once publishes in offset order already
            {} if self.exactly_once else {g.name: g.settings.ordering for g in graph}, self.metrics
        )
        self.consumed = Consumed(self.consumer, self.tracker, self.accounting, self.bounded)
        self.scheduler = DeviceScheduler.for_graph(topology.scheduling, graph, self.metrics)
        self.batchers, self.runtimes, self.controls = {}, {}, {}
        for m in graph:
            self.serve_model(m)
        self.running, self._changes = False, queue.SimpleQueue[Callable[[], None]]()
        warn_if_narrow(self.flow.max_in_flight, (m.settings.batching for m in graph))
        self.assigned = threading.Event()
        self.metrics_url: str | None = None  # where /metrics is served, when it is
        self._next_lag = 0.0
        bp = self.backpressure
        self.accounting.declare(graph, topology.topics, self.tracker, lambda: bp.paused)

    def serve_model(self, m: ServedModel) -> ModelRuntime:
        """A model's batcher, runtime and batch control.

        At start, and for a version loaded while serving (`pipeline.lifecycle.hotload`,
        on the loop thread, between batches).
        """
        b = m.settings.batching
        self.batchers[m.name] = MicroBatcher(b.max_batch_size, b.max_delay_ms / 1000.0)
        runtime = ModelRuntime(m, self.encoder, self._completed.put, self.metrics, self.scheduler)
        self.runtimes[m.name] = runtime
        if b.lag_control.enabled:
            self.controls[m.name] = LagBatchControl.from_settings(b, m.info.max_batch_size)
        return runtime

    def change(self, apply: Callable[[], None]) -> None:
        """Have the loop thread run ``apply`` between two batches (a version swapped)."""
        self._changes.put(apply)

    def apply_changes(self) -> None:
        """Run the changes queued so far: every turn of the loop, and by `serve` before it."""
        for _ in range(self._changes.qsize()):
            self._changes.get_nowait()()

    def _producer(self, bootstrap: str) -> Producer:
        conf = producer_config(self.topology.kafka, bootstrap, self.transactional_id)
        return serving_producer(conf, self.exactly_once, _weak(self._on_report))

    def _consumer(self, bootstrap: str, embedded: bool, replica_id: str | None) -> Consumer:
        kafka = self.topology.kafka
        static = kafka.static_membership and self.bounded is None  # a replay joins no group
        conf = consumer_config(
            kafka, bootstrap, embedded, kafka_replica_id(replica_id) if static else None
        )
        conf.setdefault("statistics.interval.ms", 1000)
        watch = ClientWatch(self.health)
        conf["stats_cb"] = watch.on_stats
        conf["error_cb"] = watch.on_error
        conf["on_commit"] = _weak(self._on_commit)
        self._cooperative = "cooperative" in str(conf.get("partition.assignment.strategy"))
        return Consumer(conf)

    # -- the loop -------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> RunStats:
        """Serve until ``stop`` is set, then drain and commit.

        Raises `BrokerError` on a fatal Kafka or delivery error, or a model runtime's fatal stop.
        """
        self.delivery.start()
        for runtime in self.runtimes.values():
            runtime.start()
        self.running = True
        self.health.models_loaded = True
        self.lag.start()
        if self.bounded is None or self.bounded.shared:
            self.consumer.subscribe(
                self.topology.topics.input,
                on_assign=_weak(self._on_assign),
                on_revoke=_weak(self._on_revoke),
                on_lost=_weak(self._on_lost),
            )
        else:
            self.health.assignment = self.bounded.assign(self.consumer, self.tracker)
            self.assigned.set()
        try:
            while not stop.is_set() and self._failure() is None and not self._range_served():
                self._pull()
                now = time.monotonic()
                self._dispatch(now)
                self._publish()
                self.producer.poll(0)
                self.delivery.confirm(force=False)
                self.delivery.commit(force=False)
                self._apply_backpressure()
                self._observe(now)
                self.apply_changes()
                self.health.beat()
        finally:
            self._shutdown()
        failure = self._failure()
        if failure is not None:
            raise BrokerError(failure)
        return self.stats

    def _failure(self) -> str | None:
        """Why the pipeline must stop, if it must.

        A model runtime that left requests without an outcome is one reason: their offsets
        would never commit, and the replica would wait for them forever.
        """
        runtimes = (r.fatal for r in self.runtimes.values() if r.fatal is not None)
        return self._fatal or self.delivery.fatal or next(runtimes, None)

    def _pull(self) -> None:
        # Paused partitions return nothing; consuming anyway keeps the group protocol served.
        n = max(1, min(self.flow.consume_batch, self.backpressure.capacity(self.tracker.in_flight)))
        wait, batch_open = self._wait()
        # An open batch waits for its deadline anyway: gather records until then, many in
        # one call. With none open, a record is taken the moment it comes.
        if batch_open:
            msgs = self.consumer.consume(n, wait)
        else:
            msgs = consume_available(self.consumer, n, wait)
        if not msgs:
            return
        now = time.monotonic()
        self.health.broker_up = True
        if self.stats.first_consumed is None:
            self.stats.first_consumed = now
        self._accept(msgs, now)

    def _accept(self, msgs: list[Message], now: float) -> None:
        """Track a consumed batch per partition, admit it in one call, batch it per group."""
        batch = self.consumed.take(msgs, now)
        for msg in batch.errors:
            self._on_consume_error(msg)
        if not batch.rows:
            return
        groups, letters = self.intake.admit_batch(batch.rows, batch.tombstones)
        self._pending.extend(letters)
        if self.sequencer:
            self.sequencer.admit_groups(groups)
        for (model, key), members in groups.items():
            for flushed in self.batchers[model].add_many(key, members, now):
                self.submit(model, flushed)

    def _dispatch(self, now: float) -> None:
        for name, batcher in self.batchers.items():
            for flushed in batcher.due(now):
                self.submit(name, flushed)

    def submit(self, model: str, flushed: Flushed[Any, Envelope]) -> None:
        """Hand a flushed batch of ``model`` to its runtime, counted."""
        self.metrics.batches.labels(model, flushed.reason).inc()
        self.metrics.batch_size.labels(model).observe(len(flushed.items))
        key = flushed.key
        self.runtimes[model].submit(flushed.items, None, key.cls if type(key) is Classed else None)

    def _publish(self) -> None:
        outcomes = self._pending + self.delivery.pending
        self._pending, self.delivery.pending = [], []
        while True:
            try:
                outcomes.extend(self._completed.get_nowait())
            except queue.Empty:
                break
        if self.sequencer:
            outcomes = self.sequencer.release(outcomes)
        if outcomes:
            self.delivery.publish(outcomes)
            if self.tracing is not None:
                self.tracing.published(outcomes)

    def _apply_backpressure(self) -> None:
        decision = self.backpressure.update(self.tracker.in_flight, self.tracker.in_flight_bytes)
        if decision is None:
            return
        parts = [
            TopicPartition(t, p)
            for t, p in self.tracker.partitions()
            if self.bounded is None or (t, p) not in self.bounded.finished
        ]
        if decision:
            self.consumer.pause(parts)
            self.metrics.pauses.inc()
        else:
            self.consumer.resume(parts)
            wake_fetcher(self.consumer, parts)
            self.metrics.resumes.inc()
        self.stats.pauses += decision
        log.debug("%s at %d in flight", "paused" if decision else "resumed", self.tracker.in_flight)

    # -- measuring --------------------------------------------------------------------------

    def _observe(self, now: float) -> None:
        """Move gathered counts into the metrics; each lag interval, measure lag and steer."""
        self.accounting.flush(self.delivery.transactions)
        if now < self._next_lag:
            return
        self._next_lag = now + self.flow.lag_interval_ms / 1000.0
        m = self.metrics
        lags = self.lag.measure(self.tracker, self.tracker.partitions(), self.backpressure.paused)
        for (topic, partition), lag in lags.items():
            m.lag.labels(topic, str(partition)).set(lag.messages)
            m.lag_seconds.labels(topic, str(partition)).set(lag.seconds)
        if self.sequencer:
            self.sequencer.held_by_model()  # onto its gauge
        worst = max((lag.seconds for lag in lags.values()), default=0.0)
        steer(self.controls, self.batchers, worst, m)
        self.gpus.sample()

    def _wait(self) -> tuple[float, bool]:
        """How long the next consume may wait, and whether a batch is open meanwhile."""
        wait = self.flow.poll_timeout_ms / 1000.0
        now = time.monotonic()
        batch_open = False
        for batcher in self.batchers.values():
            deadline = batcher.next_deadline()
            if deadline is not None:
                wait, batch_open = min(wait, max(0.0, deadline - now)), True
        if self._pending or not self._completed.empty():
            wait = 0.0
        elif any(r.busy for r in self.runtimes.values()):
            wait = min(wait, 0.002)
        return wait, batch_open

    # -- bounded runs (replays) -----------------------------------------------------------

    @property
    def range_begin(self) -> dict[Partition, int]:
        """Where a bounded run started each partition (empty for an unbounded one)."""
        return {} if self.bounded is None else self.bounded.begin

    def _range_served(self) -> bool:
        """A bounded run is over once every partition is read to its end and delivered."""
        return self.bounded is not None and self.bounded.served(
            self.tracker.in_flight, self._group_offsets
        )

    # -- rebalance ------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self.bounded is not None:  # a shared replay: start each where its group left it
            partitions = self.bounded.placed(self._group_offsets or consumer, partitions)
        for p in partitions:
            self.tracker.assign(partition_of(p))
            self.metrics.consumed.labels(p.topic, str(p.partition))  # at zero from now on
        if self._cooperative:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)
        if self.backpressure.paused:
            consumer.pause(partitions)
        if self.bounded is not None:
            self.bounded.pause_finished(consumer, partitions)
        self.health.assignment = len(self.tracker.partitions())
        self.assigned.set()
        if partitions:
            log.info("assigned %s", names(partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Finish the revoked partitions' in-flight work, commit it, then let them go.

        Bounded by ``flow.revoke_timeout_s``: the group waits for this callback, so a
        slow model must not stall everyone's rebalance. What is left unfinished is served
        again by the new owner, from the commit made here.
        """
        started = time.monotonic()
        revoked = [partition_of(p) for p in partitions]
        owed = sum(self.tracker.outstanding(tp) for tp in revoked)
        left = self._finish_work(started + self.flow.revoke_timeout_s, revoked)
        self._let_go(partitions)
        if self._cooperative:
            consumer.incremental_unassign(partitions)
        else:
            consumer.unassign()
        log.info(
            "revoked %s after finishing %d in-flight requests in %.0f ms%s",
            names(partitions),
            owed - left,
            (time.monotonic() - started) * 1000.0,
            f"; {left} requests left to the next owner" if left else "",
        )

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.delivery.lost([partition_of(p) for p in partitions])
        self._let_go(partitions)
        if not self.tracker.partitions():
            # Dropped by the group (a broker outage longer than the session): not ready
            # until it assigns again, unlike a replica legitimately assigned nothing.
            self.health.assignment = None
        if self._cooperative:
            consumer.incremental_unassign(partitions)
        log.warning("lost %s", names(partitions))

    def _finish_work(self, deadline: float, partitions: list[Partition] | None) -> int:
        """Run open batches, deliver and commit until ``partitions`` (None: all) owe nothing.

        Returns how many of their records are still without a committed outcome.
        """

        def owed() -> int:
            parts = self.tracker.partitions() if partitions is None else partitions
            return sum(self.tracker.outstanding(tp) for tp in parts)

        for name, batcher in self.batchers.items():
            for flushed in batcher.drain():
                self.submit(name, flushed)
        while self._failure() is None and time.monotonic() < deadline and owed():
            self._publish()
            self.producer.poll(0.005)
            self.delivery.confirm(force=False)
        self._publish()
        remaining = self.delivery.settle(max(0.0, deadline - time.monotonic()))
        if remaining:
            log.warning("%d outcomes undelivered; they will be served again", remaining)
        return owed()

    def _commit_through_rebalance(self, deadline: float) -> None:
        """Commit again what the last commit could not, if the group moved on meanwhile.

        A member stopping while a rebalance runs (another joined or left) still holds the
        old generation: its commit is refused (ILLEGAL_GENERATION), and one made while the
        consumer closes is refused too, so the next owner would serve all of it again.
        Before closing, serve the group protocol with every partition paused (nothing is
        consumed) until the rebalance has run, and commit with the new generation.
        """
        if self.tracker.committable():
            log.info("the last commit was refused: serving the group until it takes one")
        while self.tracker.committable() and self._failure() is None:
            if time.monotonic() >= deadline:
                log.warning("stopping with uncommitted offsets: %s", self.tracker.committable())
                return
            self.consumer.pause(self.consumer.assignment())
            self.consumer.consume(1, 0.1)  # rebalance callbacks run here; a record is left
            self.delivery.commit(force=True)

    def _let_go(self, partitions: list[TopicPartition]) -> None:
        for p in partitions:
            tp = partition_of(p)
            self.tracker.revoke(tp)
            self.lag.forget(tp)
            if self.bounded is not None:
                self.bounded.release(tp)
            for gauge in (self.metrics.lag, self.metrics.lag_seconds):
                with contextlib.suppress(KeyError):  # never measured
                    gauge.remove(p.topic, str(p.partition))
        self.delivery.forget([partition_of(p) for p in partitions])
        self.sequencer.forget(partition_of(p) for p in partitions)
        self.health.assignment = len(self.tracker.partitions())

    def _on_report(self, err: KafkaError | None, msg: Message) -> None:
        self.delivery.on_report(err, msg)

    def _on_commit(self, err: KafkaError | None, offsets: list[TopicPartition]) -> None:
        if err is not None and err.code() == KafkaError._NO_OFFSET:
            return  # nothing was left to commit
        self.delivery.commit_done(err, offsets)

    def _on_consume_error(self, msg: Message) -> None:
        err = cast(KafkaError, msg.error())
        if err.code() == KafkaError._PARTITION_EOF and self.bounded is not None:
            self.bounded.finish(self.consumer, (cast(str, msg.topic()), cast(int, msg.partition())))
            return
        if err.fatal():
            self._fatal = f"consumer: {err}"
        else:
            log.warning("consumer: %s", err)

    # -- shutdown -------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Stop pulling, finish in-flight work, deliver, commit, close."""
        self.health.stopping = True
        deadline = time.monotonic() + self.flow.drain_timeout_s
        if self._failure() is None:
            self._finish_work(deadline, None)
            if not self.exactly_once:
                self._commit_through_rebalance(deadline)
        for runtime in self.runtimes.values():
            runtime.stop(timeout=max(0.1, deadline - time.monotonic()))
        self.accounting.flush(self.delivery.transactions)
        self.lag.stop()
        self.consumer.close()
        if self._group_offsets is not None:
            self._group_offsets.close()
        # Delivered above, or given up with the run (their offsets were not committed):
        # the handle goes now, not when a collection finds the replica (cycles hold it).
        given_up = close_producer(self.producer, 0.0)
        if given_up:
            log.warning(
                "%d outcomes were not delivered; their requests will be served again", given_up
            )
        log.info(
            "stopped: %d consumed, %d results, %d dead letters",
            self.stats.consumed,
            self.stats.results,
            self.stats.dead_letters,
        )
