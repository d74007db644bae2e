"""What librdkafka's callbacks say about the cluster, turned into the replica's health.

``stats_cb`` reports each broker connection's state once per statistics interval: the
replica counts as connected while any broker with a node id is ``UP``. ``error_cb``
reports client-wide errors: all brokers down makes the replica not ready (it is alive:
restarting it would not bring the broker back); a transport error is said at debug level
because every reconnect attempt says it again.
"""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError

from pipeline.observability.health import Health

__all__ = ["ClientWatch", "weak_callback"]

log = logging.getLogger(__name__)


class ClientWatch:
    """librdkafka's ``stats_cb`` and ``error_cb`` for one replica's `Health`."""

    def __init__(self, health: Health) -> None:
        self.health = health

    def on_stats(self, stats_json: str) -> None:
        """Note from librdkafka's statistics whether any broker connection is up."""
        try:
            brokers = json.loads(stats_json).get("brokers", {})
        except ValueError:
            return
        self.health.broker_up = any(
            b.get("state") == "UP" and b.get("nodeid", -1) >= 0 for b in brokers.values()
        )

    def on_error(self, err: KafkaError) -> None:
        """A client-wide error: not ready while no broker is reachable; log the rest."""
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            if self.health.broker_up:
                log.warning("kafka: no broker reachable (%s); retrying", err.str())
            self.health.broker_up = False
        elif err.code() == KafkaError._TRANSPORT:  # each reconnect attempt says this
            log.debug("kafka: %s", err)
        else:
            log.warning("kafka: %s", err)


def weak_callback(method: Callable[..., None]) -> Callable[..., None]:
    """A callback that does not keep its object alive.

    The consumer keeps its rebalance callbacks; bound methods would make the pipeline and
    its consumer a reference cycle, so its Kafka clients would close only at some later
    garbage collection instead of when the pipeline is dropped.
    """
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> None:
        bound = ref()
        if bound is not None:
            bound(*args)

    return call
