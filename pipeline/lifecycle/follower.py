"""A replica's reader of the control topic: each model's latest split, applied as it lands.

Every replica reads the whole control topic (`pipeline.lifecycle.commands`) with its own
assign-only reader: it joins no group and commits nothing, so all replicas see every
record, in the same order. At start it reads to the end before the replica consumes any
request (`catch_up`), so a replica restarted in the middle of a rollout comes back on the
group's current split, not the topology's; then a thread applies each new record within
about one poll (0.2 s). Applying a split swaps the router's traffic for that model whole,
so each request meets either the old split or the new one, never a mix.

Each model's latest record is its desired state, settled on the replica's loop thread
between batches (``apply``: `Replica.change`): first the versions it serves are loaded or
retired to match the record (`pipeline.lifecycle.hotload`), then its split is applied.
A split naming a version this replica does not serve (still loading, refused, or its
topology lacks it and no load was asked) is not applied: the replica keeps the split it
has, says so in the log, in ``kp_control_unapplied{model}`` and on ``/readyz`` (not ready,
with the reason), and settles again when the load ends or a record it can apply arrives.
The group is then visibly half switched rather than silently so.

Each replica also writes its own state to the topic, keyed ``replica/<name>``: per model,
the versions it serves, the split it applies and why it is behind (loading, refused), so
``kp-pipeline versions status`` shows the whole group, not only what was asked. A record
is written after every change (within a poll) and a tombstone when the replica stops
cleanly, so compaction forgets replicas that are gone; one that crashed stays listed
with its last time until its name comes back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from pipeline.config.topology import Topology
from pipeline.kafka.clients import admin_config, close_producer, producer_config, reader_config
from pipeline.lifecycle.commands import STATUS_PREFIX, ControlRecord, Split, control_topic
from pipeline.lifecycle.hotload import VersionLoader
from pipeline.observability.health import Health
from pipeline.observability.metrics import Metrics
from pipeline.serving.routing import Router

__all__ = ["ControlFollower", "create_control_topic", "follow_splits"]

log = logging.getLogger(__name__)


def create_control_topic(topology: Topology, bootstrap: str, timeout: float = 15) -> None:
    """Create the control topic (compacted, one partition: one order) if it is missing."""
    admin = AdminClient(admin_config(topology.kafka, bootstrap))
    topic = control_topic(topology)
    if topic in admin.list_topics(timeout=timeout).topics:
        return
    wanted = NewTopic(
        topic,
        num_partitions=1,
        replication_factor=topology.topics.replication_factor,
        config={"cleanup.policy": "compact"},
    )
    for fut in admin.create_topics([wanted], operation_timeout=timeout).values():
        try:
            fut.result(timeout)
        except Exception as e:  # another replica made it first: fine
            if "already exists" not in str(e).lower() and "TOPIC_ALREADY_EXISTS" not in str(e):
                raise


def follow_splits(
    topology: Topology, bootstrap: str, router: Router, metrics: Metrics
) -> ControlFollower:
    """A follower for a front door that consumes by itself (the Faust adapter).

    Splits only (promote, canary, shadow share, rollback between the versions the
    topology loads): it applies each on its own thread (a router swaps its split whole),
    loads nothing and writes no state record. Caught up before it returns.
    """
    follower = ControlFollower(topology, bootstrap, router, metrics, Health())
    follower.catch_up(timeout=10)
    return follower.start()


class ControlFollower:
    """Applies the control topic's splits to one replica's router."""

    def __init__(
        self,
        topology: Topology,
        bootstrap: str,
        router: Router,
        metrics: Metrics,
        health: Health,
        apply: Callable[[Callable[[], None]], None] | None = None,
        loader: VersionLoader | None = None,
        replica_name: str | None = None,
    ) -> None:
        """``apply``: runs a change where the router is used (default: here and now).

        ``replica_name``: write this replica's state to the topic under it (none: do not).
        """
        self.topic = control_topic(topology)
        self.router, self.metrics, self.health = router, metrics, health
        self.apply: Callable[[Callable[[], None]], None] = apply or (lambda change: change())
        self.loader = loader
        if loader is not None:
            loader.settled = self.settle
        self.applied: dict[str, ControlRecord] = {}
        self.latest: dict[str, ControlRecord] = {}
        conf = reader_config(
            topology.kafka, bootstrap, group_id=f"{self.topic}.reader", partition_eof=True
        )
        self._consumer = Consumer(conf)
        self.replica_name = replica_name
        self._producer = (
            Producer(producer_config(topology.kafka, bootstrap)) if replica_name else None
        )
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._assigned = False
        for model in router.traffic:
            metrics.control_unapplied.labels(model).set(0)
        for result in ("applied", "unapplied", "invalid"):
            metrics.control_records.labels(result)

    def _assign(self) -> list[int]:
        """Assign the topic's partitions from the beginning; none while it does not exist."""
        try:
            meta = self._consumer.list_topics(self.topic, timeout=5)
        except KafkaException as e:  # no broker yet: the thread looks again
            log.warning("control topic %s: cannot read it yet (%s)", self.topic, e)
            return []
        found = meta.topics.get(self.topic)
        if found is None or found.error is not None or not found.partitions:
            return []
        parts = sorted(found.partitions)
        self._consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in parts])
        self._assigned = True
        return parts

    def catch_up(self, timeout: float = 30.0) -> int:
        """Read and apply every record up to the end of the topic now; how many were read."""
        parts = self._assign()
        if not parts:
            log.warning(
                "no control topic %s yet: serving the topology's versions until it appears",
                self.topic,
            )
            return 0
        ended: set[int] = set()
        read = 0
        deadline = time.monotonic() + timeout
        while len(ended) < len(parts):
            if time.monotonic() > deadline:
                log.warning("control topic %s: not read to its end in %.0f s", self.topic, timeout)
                break
            for msg in self._consumer.consume(500, 0.2):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        ended.add(msg.partition() or 0)
                    continue
                read += 1
                self._apply(msg)
        return read

    def start(self) -> ControlFollower:
        """Follow the topic on a thread from where `catch_up` stopped; say where we are."""
        self._changed.set()
        self._thread = threading.Thread(target=self._run, name="control", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop following, withdraw this replica's state, close the clients."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)  # a list_topics call in flight takes up to 5 s
        self._consumer.close()
        if self._producer is not None:
            if self.replica_name is not None:
                with contextlib.suppress(Exception):  # the broker may be gone: nothing to do
                    self._producer.produce(self.topic, None, _status_key(self.replica_name))
            close_producer(self._producer, 5.0)

    def status(self) -> dict[str, Any]:
        """The replica's state, as its status record holds it."""
        models = {}
        for name, traffic in self.router.traffic.items():
            record = self.applied.get(name)
            loading = refused = None
            if self.loader is not None:
                loading = sorted(v for (n, v) in dict(self.loader.loading) if n == name)
                refused = {v: why for (n, v), (_, why) in dict(self.loader.failed).items()
                           if n == name}  # fmt: skip
            models[name] = {
                "serving": sorted(traffic.keys),
                "split": Split(traffic.default, dict(traffic.canary), traffic.shadow).describe(),
                "record": record.seq if record is not None else 0,
                "behind": self.health.versions_behind.get(name),
                "loading": loading or [],
                "refused": refused or {},
            }
        return {"replica": self.replica_name, "at_ms": int(time.time() * 1000), "models": models}

    def _publish_status(self) -> None:
        if self._producer is None or self.replica_name is None or not self._assigned:
            return
        self._changed.clear()
        try:
            value = json.dumps(self.status(), sort_keys=True).encode()
            self._producer.produce(self.topic, value, _status_key(self.replica_name))
            self._producer.poll(0)
        except Exception as e:  # a full queue or a gone broker: the next change tries again
            log.debug("control topic %s: status not written (%s)", self.topic, e)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._assigned:  # the first command creates the topic: look again
                try:
                    self._assign()
                except Exception as e:
                    log.debug("control topic %s: %s", self.topic, e)
                if not self._assigned:
                    self._stop.wait(2.0)
                    continue
            try:
                msgs = self._consumer.consume(100, 0.2)
            except Exception as e:  # a closed or failing reader must not kill the replica
                log.warning("control topic %s: %s", self.topic, e)
                self._stop.wait(1.0)
                continue
            for msg in msgs:
                if msg.error() is None:
                    self._apply(msg)
            if self._changed.is_set():
                self._publish_status()

    def _apply(self, msg: Any) -> None:
        if (msg.key() or b"").startswith(STATUS_PREFIX):
            return  # a replica's state, for people and `versions status`
        try:
            record = ControlRecord.decode(msg.value() or b"")
        except ValueError as e:
            log.warning("control topic %s offset %d: %s", self.topic, msg.offset(), e)
            self.metrics.control_records.labels("invalid").inc()
            return
        if record.model not in self.router.traffic:
            return  # a model of another topology sharing the group's name: not ours
        self.latest[record.model] = record
        self.apply(lambda: self._arrived(record))

    def _arrived(self, record: ControlRecord) -> None:
        applied = self.settle(record.model)
        self.metrics.control_records.labels("applied" if applied else "unapplied").inc()
        if applied:
            log.info(
                "model %s: %s (control record %d: %s by %s)",
                record.model,
                record.split.describe(),
                record.seq,
                record.command,
                record.by or "?",
            )

    def settle(self, model: str) -> bool:
        """Make the replica serve ``model`` as its latest record says, as far as it can.

        On the loop thread. True when the record's split is applied.
        """
        record = self.latest.get(model)
        if record is None:
            return True
        if self.loader is not None:
            self.loader.reconcile(record)
        traffic = self.router.traffic[model]
        missing = sorted(record.split.versions() - set(traffic.keys))
        applied = not missing
        behind = []
        if missing:
            why = (
                self.loader.why_missing(model, missing)
                if self.loader is not None
                else f"version {', '.join(missing)} is not served here"
            )
            behind.append(
                f"control record {record.seq} ({record.command}) asks for version "
                f"{', '.join(missing)}, which this replica does not serve ({why}); still "
                f"serving {Split(traffic.default, dict(traffic.canary)).describe()}"
            )
            log.error("model %s: %s", model, behind[-1])
        else:
            self.router.set_traffic(model, record.split.traffic(traffic.keys, model))
            self.applied[model] = record
            for version, share in self.router.traffic[model].shares().items():
                self.metrics.version_traffic.labels(model, version).set(share)
        if self.loader is not None:
            self.loader.retire_unused(record)
            refused = self.loader.refused(model)
            if refused and applied:
                behind.append(f"refused to load {refused}")
        if behind:
            self.health.versions_behind[model] = "; ".join(behind)
        else:
            self.health.versions_behind.pop(model, None)
        self.metrics.control_unapplied.labels(model).set(0 if applied else 1)
        self._changed.set()
        return applied


def _status_key(replica: str) -> bytes:
    return STATUS_PREFIX + replica.encode()
