"""librdkafka's statistics and errors, as the replica's readiness sees them."""

from __future__ import annotations

import json

from confluent_kafka import KafkaError

from pipeline.kafka.watch import ClientWatch
from pipeline.observability.health import Health


def _stats(*states: tuple[str, int]) -> str:
    brokers = {f"b{i}": {"state": s, "nodeid": n} for i, (s, n) in enumerate(states)}
    return json.dumps({"brokers": brokers})


def test_a_broker_with_a_node_id_up_means_connected() -> None:
    watch = ClientWatch(Health())
    watch.on_stats(_stats(("UP", -1), ("DOWN", 1)))  # the bootstrap entry does not count
    assert not watch.health.broker_up
    watch.on_stats(_stats(("UP", -1), ("UP", 1)))
    assert watch.health.broker_up
    watch.on_stats("not json")  # ignored, not fatal
    assert watch.health.broker_up


def test_all_brokers_down_is_not_ready_and_other_errors_change_nothing() -> None:
    watch = ClientWatch(Health())
    watch.health.broker_up = True
    watch.on_error(KafkaError(KafkaError._TRANSPORT, "reconnecting"))
    assert watch.health.broker_up
    watch.on_error(KafkaError(KafkaError._ALL_BROKERS_DOWN, "gone"))
    assert not watch.health.broker_up
    assert watch.health.ready()[0] is False
