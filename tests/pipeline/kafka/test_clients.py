"""librdkafka settings: what delivery depends on is set, and the user's settings win."""

from __future__ import annotations

import socket

import pytest

from pipeline.config.topology import KafkaSettings
from pipeline.kafka.clients import consumer_config, producer_config, replica_id, transactional_id


def test_consumers_rebalance_cooperatively_and_read_only_committed_requests() -> None:
    conf = consumer_config(KafkaSettings(), "b:9092", embedded=False)
    assert conf["partition.assignment.strategy"] == "cooperative-sticky"
    assert conf["isolation.level"] == "read_committed"
    assert conf["enable.auto.commit"] is False
    assert "group.instance.id" not in conf


def test_a_static_member_is_named_by_its_replica_and_the_users_settings_win() -> None:
    conf = consumer_config(KafkaSettings(), "b:9092", False, instance="pod/7")
    assert conf["group.instance.id"] == "pod_7"
    mine = KafkaSettings(consumer={"partition.assignment.strategy": "range"})
    assert consumer_config(mine, "b:9092", False)["partition.assignment.strategy"] == "range"


def test_only_exactly_once_producers_are_transactional() -> None:
    plain = producer_config(KafkaSettings(), "b:9092")
    assert plain["enable.idempotence"] is True
    assert "transactional.id" not in plain
    txn = producer_config(KafkaSettings(transaction_timeout_ms=5000), "b:9092", "g-r1")
    assert (txn["transactional.id"], txn["transaction.timeout.ms"]) == ("g-r1", 5000)


def test_the_replica_id_comes_from_the_flag_then_the_environment_then_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KP_REPLICA_ID", raising=False)
    assert replica_id() == socket.gethostname()
    monkeypatch.setenv("KP_REPLICA_ID", "from-env")
    assert replica_id() == "from-env"
    assert replica_id("from-flag") == "from-flag"


def test_the_transactional_id_is_the_groups_and_the_replicas_unless_configured() -> None:
    settings = KafkaSettings(group_id="kp")
    assert transactional_id(settings, "kp-pipeline-0") == "kp-kp-pipeline-0"
    assert transactional_id(settings, "host name:1") == "kp-host_name_1"
    assert transactional_id(KafkaSettings(transactional_id="fixed"), "x") == "fixed"
