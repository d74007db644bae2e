"""librdkafka settings for our clients, and creating the topology's topics.

Every Kafka client kp-pipeline makes takes its settings from here: a topology's
`KafkaSettings` plus the bootstrap address it is run against. So the cluster's security
(SASL, TLS) and the user's extra ``kafka.consumer``/``kafka.producer`` properties reach the
serving loop and every command alike (``produce``, ``results``, ``replay``, ``dlq``), and
a command cannot talk to a secured cluster differently from the pipeline it inspects.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Iterable
from typing import Any

from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from pipeline.config.topology import KafkaSettings
from pipeline.kafka.broker import EMBEDDED_CLIENT_DEFAULTS, EMBEDDED_CLUSTER_ID
from schemas.errors import BrokerError

__all__ = [
    "admin_config",
    "close_producer",
    "consumer_config",
    "ensure_topics",
    "is_embedded_broker",
    "producer_config",
    "reader_config",
    "replica_id",
    "sender_config",
    "transactional_id",
]

log = logging.getLogger(__name__)


def _common(settings: KafkaSettings, bootstrap: str) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "client.id": settings.client_id,
        "security.protocol": settings.security.protocol,
        # A request unanswered this long ends its connection. librdkafka's 60 s default
        # keeps a replica "connected" (and ready) for a minute behind a network that
        # drops everything; 15 s is far above any healthy request's time (fetches wait
        # 10 ms here), and a new connection's setup gets as long. Measured with a
        # black-holed proxy: load/faults.py.
        "socket.timeout.ms": 15000,
        "socket.connection.setup.timeout.ms": 15000,
    }
    sec = settings.security
    if sec.sasl_mechanism:
        conf["sasl.mechanism"] = sec.sasl_mechanism
    if sec.sasl_username is not None:
        conf["sasl.username"] = sec.sasl_username
    if sec.sasl_password is not None:
        conf["sasl.password"] = sec.sasl_password.get_secret_value()
    if sec.ssl_ca_location:
        conf["ssl.ca.location"] = sec.ssl_ca_location
    if sec.ssl_certificate_location:
        conf["ssl.certificate.location"] = sec.ssl_certificate_location
    if sec.ssl_key_location:
        conf["ssl.key.location"] = sec.ssl_key_location
    if sec.ssl_key_password is not None:
        conf["ssl.key.password"] = sec.ssl_key_password.get_secret_value()
    if sec.protocol.endswith("SSL"):
        conf["ssl.endpoint.identification.algorithm"] = sec.ssl_endpoint_identification
    return conf


def consumer_config(
    settings: KafkaSettings, bootstrap: str, embedded: bool, instance: str | None = None
) -> dict[str, Any]:
    """Consumer settings: manual commits of tracked offsets only.

    ``instance`` makes the consumer a static group member (``group.instance.id``, KIP-345):
    a replica restarted under the same name takes its partitions back at once, without a
    rebalance, instead of waiting for its old self to time out. A static member does not
    leave the group when it stops, so its partitions move only after
    ``session.timeout.ms``: the price of a restart without rebalances.
    """
    conf = _common(settings, bootstrap)
    conf.update(
        {
            "group.id": settings.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
            # How long the broker may hold a fetch when there is nothing new. Kafka answers
            # as soon as data arrives, so this is only idle fetches (~100/s at 10 ms); but
            # a broker that holds every fetch for the whole wait (Tansu) adds up to this to
            # each request's latency: at 100 ms the image demo's p50 at 100 requests/s was
            # 90 ms, and librdkafka's default 500 ms is also the floor after each resume().
            "fetch.wait.max.ms": 10,
            # librdkafka prefetches up to 64 MiB by default, outside the in-flight marks:
            # with a backlog that much sits in memory whatever max_in_flight says. 16 MiB
            # still holds ~50k small requests or ~280 images of 57 KB ahead of the models.
            "queued.max.messages.kbytes": 16384,
            # Once that much is queued, librdkafka postpones the partition's next fetch by
            # this long (1 s by default), however soon the queue drains: with a backlog
            # the tiny model emptied 16 MiB in ~0.5 s and then waited for data. Measured
            # (load/topologies/tiny-mlp.yaml, 2 cores): ~65k → ~100k requests/s at 10 ms.
            "fetch.queue.backoff.ms": 10,
            # Incremental rebalances: a replica joining or leaving moves only the
            # partitions that must move; the rest are served without a pause.
            "partition.assignment.strategy": "cooperative-sticky",
            # Requests produced in aborted transactions are never served (librdkafka's
            # default too; stated because exactly-once depends on it).
            "isolation.level": "read_committed",
        }
    )
    if embedded:
        conf.update(EMBEDDED_CLIENT_DEFAULTS)
    if instance is not None:
        conf["group.instance.id"] = _safe(instance)
    conf.update(settings.consumer)
    return conf


def reader_config(
    settings: KafkaSettings, bootstrap: str, *, group_id: str, partition_eof: bool = False
) -> dict[str, Any]:
    """Settings of an assign-only reader: the tools' reads, which join no group.

    A reader (``results``, ``dlq``, replay's probe) is assigned its partitions and commits
    nothing, so it can read a live pipeline's topics without moving its group's offsets.
    ``group_id`` is only there because librdkafka requires one. ``partition_eof`` reports
    each partition's end as the broker sees it in fetch responses, for readers that stop
    there.

    The user's ``kafka.consumer`` properties apply (isolation level, timeouts, what the
    cluster needs), but not over the settings that make this a reader.
    """
    conf = _common(settings, bootstrap)
    conf.update(settings.consumer)
    conf.update(
        {
            "group.id": group_id,
            "enable.auto.commit": False,
            "enable.partition.eof": partition_eof,
            "auto.offset.reset": "earliest",  # a removed offset reads on from the log start
            "fetch.wait.max.ms": 10,  # see consumer_config: an idle fetch is not held long
        }
    )
    return conf


def producer_config(
    settings: KafkaSettings, bootstrap: str, transactional: str | None = None
) -> dict[str, Any]:
    """Producer settings: idempotent, acks from all replicas, small linger for batching.

    Idempotence is what lets the producer retry through a broker restart without writing
    an outcome twice or out of order. ``transactional`` is the transactional id for
    exactly-once delivery.
    """
    conf = _common(settings, bootstrap)
    conf.update(
        {
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "batch.num.messages": 10000,
            "queue.buffering.max.messages": 1_000_000,
        }
    )
    if transactional is not None:
        conf["transactional.id"] = transactional
        conf["transaction.timeout.ms"] = settings.transaction_timeout_ms
        # librdkafka refuses a request timeout longer than the transaction's.
        conf["socket.timeout.ms"] = min(conf["socket.timeout.ms"], settings.transaction_timeout_ms)
    conf.update(settings.producer)
    return conf


def close_producer(producer: Producer, timeout: float) -> int:
    """Deliver what is queued within ``timeout``, give up the rest, destroy the producer.

    A producer left to the garbage collector keeps its threads and connections until it
    is collected, and once the broker has gone they log a failed connect every few ms
    (seen at the end of the tabular demo, from three producers that outlived its
    embedded broker). ``Producer.close()`` alone flushes without a time limit
    (confluent-kafka 2.16), so with the broker gone it would wait out
    ``message.timeout.ms``: what is still queued after ``timeout`` is purged first (a
    `pipeline.kafka.batch_producer.BatchProducer` has no purge: its ``close`` gives up
    what is left itself). Returns how many records were given up.
    """
    left = int(producer.flush(timeout))
    purge = getattr(producer, "purge", None)
    if left and purge is not None:
        purge()
    producer.close()
    return left


def sender_config(settings: KafkaSettings, bootstrap: str) -> dict[str, Any]:
    """Settings of the tools' request producer (``produce``, the demo, load generators).

    The cluster's security and the user's ``kafka.producer`` properties, like every
    client; but not the serving producer's idempotence. An idempotent producer first
    asks the cluster for a producer id: its first acknowledgement came after ~520 ms on
    Tansu against 12 ms without (301 images, measured here), a cost that a one-shot
    command pays every time, and a request produced twice is served twice at worst, which
    at-least-once serving allows anyway.
    """
    conf = _common(settings, bootstrap)
    conf["linger.ms"] = 5
    conf.update(settings.producer)
    return conf


def replica_id(given: str | None = None) -> str:
    """The replica's stable name: ``given`` (--replica-id), $KP_REPLICA_ID, or the host name.

    In Kubernetes the host name is the pod's name: a container restarted after a crash
    keeps it (a StatefulSet's pods keep it even when rescheduled; a Deployment's get new
    names, and so new transactional ids).
    """
    return given or os.environ.get("KP_REPLICA_ID") or socket.gethostname()


def transactional_id(settings: KafkaSettings, replica: str | None = None) -> str:
    """The transactional id of this replica: configured, or ``<group_id>-<replica id>``."""
    if settings.transactional_id:
        return settings.transactional_id
    return f"{settings.group_id}-{_safe(replica_id(replica))}"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def admin_config(settings: KafkaSettings, bootstrap: str) -> dict[str, Any]:
    """Settings for the admin client."""
    return _common(settings, bootstrap)


def is_embedded_broker(settings: KafkaSettings, bootstrap: str, timeout: float = 5.0) -> bool:
    """Whether the cluster at ``bootstrap`` is a broker kp-pipeline started (`EmbeddedBroker`).

    Decides whether `consumer_config` adds `EMBEDDED_CLIENT_DEFAULTS`: by what the cluster
    says it is, not by the topology, since ``--bootstrap`` may point an embedded topology
    at a Kafka cluster. Unreachable or unsure: no (librdkafka's defaults suit any broker).
    """
    try:
        metadata = AdminClient(admin_config(settings, bootstrap)).list_topics(timeout=timeout)
    except KafkaException as e:
        log.debug("cluster id of %s unknown: %s", bootstrap, e)
        return False
    return metadata.cluster_id == EMBEDDED_CLUSTER_ID


def ensure_topics(
    admin: AdminClient,
    topics: Iterable[str],
    partitions: int,
    replication: int,
    timeout: float = 15,
) -> list[str]:
    """Create the topics that do not exist yet; returns the ones created."""
    try:
        existing = set(admin.list_topics(timeout=timeout).topics)
    except KafkaException as e:
        raise BrokerError(f"cannot list topics: {e}") from None
    wanted = [t for t in dict.fromkeys(topics) if t not in existing]
    if not wanted:
        return []
    futures = admin.create_topics(
        [NewTopic(t, num_partitions=partitions, replication_factor=replication) for t in wanted],
        operation_timeout=timeout,
    )
    created = []
    for topic, fut in futures.items():
        try:
            fut.result(timeout)
            created.append(topic)
        except KafkaException as e:
            if e.args and getattr(e.args[0], "code", lambda: None)() == 36:  # TOPIC_ALREADY_EXISTS
                continue
            raise BrokerError(f"cannot create topic {topic!r}: {e}") from None
    log.info("created topics %s", ", ".join(created))
    return created
