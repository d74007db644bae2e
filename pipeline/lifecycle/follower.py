"""A replica's reader of the control topic: each model's latest split, applied as it lands.

Every replica reads the whole control topic (`pipeline.lifecycle.commands`) with its own
assign-only reader: it joins no group and commits nothing, so all replicas see every
record, in the same order. At start it reads to the end before the replica consumes any
request (`catch_up`), so a replica restarted in the middle of a rollout comes back on the
group's current split, not the topology's; then a thread applies each new record within
about one poll (0.2 s). Applying a split swaps the router's traffic for that model whole,
so each request meets either the old split or the new one, never a mix.

A split naming a version this replica does not serve (its topology lacks it: a rollout
of the new version has not reached it) is not applied: the replica keeps the split it
has, says so in the log, in ``kp_control_unapplied{model}`` and on ``/readyz`` (not ready,
with the reason), until a record it can apply arrives. The group is then visibly half
switched rather than silently so.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from pipeline.config.topology import Topology
from pipeline.kafka.clients import admin_config, reader_config
from pipeline.lifecycle.commands import ControlRecord, Split, control_topic
from pipeline.observability.health import Health
from pipeline.observability.metrics import Metrics
from pipeline.serving.routing import Router

__all__ = ["ControlFollower", "create_control_topic"]

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


class ControlFollower:
    """Applies the control topic's splits to one replica's router."""

    def __init__(
        self,
        topology: Topology,
        bootstrap: str,
        router: Router,
        metrics: Metrics,
        health: Health,
    ) -> None:
        self.topic = control_topic(topology)
        self.router, self.metrics, self.health = router, metrics, health
        self.applied: dict[str, ControlRecord] = {}
        conf = reader_config(
            topology.kafka, bootstrap, group_id=f"{self.topic}.reader", partition_eof=True
        )
        self._consumer = Consumer(conf)
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
        """Follow the topic on a thread from where `catch_up` stopped."""
        self._thread = threading.Thread(target=self._run, name="control", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop following and close the reader."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)  # a list_topics call in flight takes up to 5 s
        self._consumer.close()

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

    def _apply(self, msg: Any) -> None:
        try:
            record = ControlRecord.decode(msg.value() or b"")
        except ValueError as e:
            log.warning("control topic %s offset %d: %s", self.topic, msg.offset(), e)
            self.metrics.control_records.labels("invalid").inc()
            return
        traffic = self.router.traffic.get(record.model)
        if traffic is None:
            return  # a model of another topology sharing the group's name: not ours
        missing = sorted(record.split.versions() - set(traffic.keys))
        if missing:
            why = (
                f"control record {record.seq} ({record.command}) asks for version "
                f"{', '.join(missing)}, which this replica does not serve; still serving "
                f"{Split(traffic.default, dict(traffic.canary)).describe()}"
            )
            log.error("model %s: %s", record.model, why)
            self.health.versions_behind[record.model] = why
            self.metrics.control_records.labels("unapplied").inc()
            self.metrics.control_unapplied.labels(record.model).set(1)
            return
        self.router.set_traffic(record.model, record.split.traffic(traffic.keys, record.model))
        self.applied[record.model] = record
        self.health.versions_behind.pop(record.model, None)
        self.metrics.control_records.labels("applied").inc()
        self.metrics.control_unapplied.labels(record.model).set(0)
        for version, share in self.router.traffic[record.model].shares().items():
            self.metrics.version_traffic.labels(record.model, version).set(share)
        log.info(
            "model %s: %s (control record %d: %s by %s)",
            record.model,
            record.split.describe(),
            record.seq,
            record.command,
            record.by or "?",
        )
