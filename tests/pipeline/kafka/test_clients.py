"""librdkafka settings: what delivery depends on is set, the user's settings win, and
every client (group consumer, reader, producer, admin) carries the cluster's security."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import pytest
from confluent_kafka import Producer

from pipeline.config.topology import KafkaSettings, SecuritySettings
from pipeline.kafka.clients import (
    admin_config,
    close_producer,
    consumer_config,
    producer_config,
    reader_config,
    replica_id,
    sender_config,
    transactional_id,
)

SECURE = KafkaSettings(
    security=SecuritySettings(
        protocol="SASL_SSL",
        sasl_mechanism="PLAIN",
        sasl_username="u",
        sasl_password="p",
        ssl_ca_location=__file__,  # a file that exists: the settings check it
    ),
    consumer={"isolation.level": "read_uncommitted", "enable.auto.commit": True},
    producer={"compression.type": "lz4"},
)


def test_consumers_rebalance_cooperatively_and_read_only_committed_requests() -> None:
    conf = consumer_config(KafkaSettings(), "b:9092", embedded=False)
    assert conf["partition.assignment.strategy"] == "cooperative-sticky"
    assert conf["isolation.level"] == "read_committed"
    assert conf["enable.auto.commit"] is False
    assert "group.instance.id" not in conf
    assert conf["fetch.queue.backoff.ms"] == 10  # not librdkafka's 1 s: the loop starved


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
    assert txn["socket.timeout.ms"] == 5000  # librdkafka: at most the transaction's timeout
    assert plain["socket.timeout.ms"] == 15000  # not 60 s: a black hole is noticed in 15


def test_every_client_carries_the_clusters_security() -> None:
    for conf in (
        consumer_config(SECURE, "b:9093", embedded=False),
        reader_config(SECURE, "b:9093", group_id="kp-reader", partition_eof=False),
        producer_config(SECURE, "b:9093"),
        sender_config(SECURE, "b:9093"),
        admin_config(SECURE, "b:9093"),
    ):
        assert conf["bootstrap.servers"] == "b:9093"
        assert conf["security.protocol"] == "SASL_SSL"
        assert (conf["sasl.mechanism"], conf["sasl.username"], conf["sasl.password"]) == (
            "PLAIN",
            "u",
            "p",
        )
        assert conf["ssl.ca.location"] == __file__
        assert conf["ssl.endpoint.identification.algorithm"] == "https"


def test_a_reader_takes_the_users_consumer_settings_but_never_commits() -> None:
    conf = reader_config(SECURE, "b:9093", group_id="kp-dlq", partition_eof=True)
    assert conf["isolation.level"] == "read_uncommitted"  # the user's, applied
    assert conf["enable.auto.commit"] is False  # the user's True would commit: not applied
    assert (conf["group.id"], conf["enable.partition.eof"]) == ("kp-dlq", True)
    assert (conf["auto.offset.reset"], conf["fetch.wait.max.ms"]) == ("earliest", 10)
    assert "compression.type" not in conf
    plain = reader_config(KafkaSettings(), "b:9092", group_id="kp-reader", partition_eof=False)
    assert plain["enable.partition.eof"] is False
    assert plain["security.protocol"] == "PLAINTEXT"
    assert "sasl.username" not in plain


def test_the_producers_take_the_users_producer_settings() -> None:
    for conf in (producer_config(SECURE, "b:9093"), sender_config(SECURE, "b:9093")):
        assert conf["compression.type"] == "lz4"
        assert "isolation.level" not in conf


def test_the_tools_request_producer_skips_the_serving_producers_idempotence() -> None:
    assert "enable.idempotence" not in sender_config(KafkaSettings(), "b:9092")


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


def test_mutual_tls_and_the_hostname_check_reach_librdkafka(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "c.key"
    cert.write_text("-")
    key.write_text("-")
    security = SecuritySettings(
        protocol="SSL",
        ssl_ca_location=str(cert),
        ssl_certificate_location=str(cert),
        ssl_key_location=str(key),
        ssl_key_password="k3y-pw",
        ssl_endpoint_identification="none",
    )
    conf = admin_config(KafkaSettings(security=security), "b:9093")
    assert (conf["ssl.certificate.location"], conf["ssl.key.location"]) == (str(cert), str(key))
    assert conf["ssl.key.password"] == "k3y-pw"
    assert conf["ssl.endpoint.identification.algorithm"] == "none"
    assert "sasl.mechanism" not in conf
    assert "ssl.endpoint.identification.algorithm" not in admin_config(KafkaSettings(), "b")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"protocol": "SASL_SSL"}, "protocol SASL_SSL needs sasl_mechanism"),
        ({"protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "u"},
         "SCRAM-SHA-512 needs sasl_password"),
        ({"sasl_username": "u"}, "sasl_* settings need a SASL protocol, not PLAINTEXT"),
        ({"protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_username": "u",
          "sasl_password": "p", "ssl_ca_location": __file__},
         "ssl_ca_location needs protocol SSL or SASL_SSL, not SASL_PLAINTEXT"),
        ({"protocol": "SSL", "ssl_certificate_location": __file__},
         "ssl_certificate_location and ssl_key_location go together"),
    ],
)  # fmt: skip
def test_incomplete_security_is_refused_naming_the_setting(
    fields: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        SecuritySettings(**fields)  # type: ignore[arg-type]


def test_missing_tls_files_are_named_when_a_client_starts_not_when_a_topology_is_read() -> None:
    security = SecuritySettings(protocol="SSL", ssl_ca_location="/no/such/ca.pem")
    assert security.missing_files() == ["ssl_ca_location: no file '/no/such/ca.pem'"]
    assert SecuritySettings(protocol="SSL", ssl_ca_location=__file__).missing_files() == []


def test_close_producer_gives_up_what_no_broker_takes_and_destroys_the_producer() -> None:
    """``Producer.close()`` alone would flush for as long as ``message.timeout.ms``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens there once the socket is closed
    producer = Producer({"bootstrap.servers": f"127.0.0.1:{port}", "message.timeout.ms": 600000})
    producer.produce("t", b"x")
    producer.produce("t", b"y")
    started = time.monotonic()
    assert close_producer(producer, 0.2) == 2
    assert time.monotonic() - started < 60  # not message.timeout.ms (10 minutes)
    with pytest.raises(RuntimeError, match="closed"):
        producer.produce("t", b"z")
