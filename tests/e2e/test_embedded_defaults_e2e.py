"""The embedded broker's client defaults reach only brokers kp-pipeline started.

Tansu joins a group in half the session timeout, so replicas on a broker started here get
a 3 s session (`EMBEDDED_CLIENT_DEFAULTS`); a Kafka cluster refuses sessions under 6 s
by default, so a topology that says ``embedded`` but is pointed at another cluster with
``--bootstrap`` must not carry them there. The cluster says which it is (its id).
"""

from __future__ import annotations

from e2e.brokers import NoidaBroker

from pipeline.config.topology import KafkaSettings
from pipeline.kafka.broker import EMBEDDED_CLIENT_DEFAULTS, EmbeddedBroker
from pipeline.kafka.clients import consumer_config, is_embedded_broker


def test_a_broker_started_here_is_known_by_its_cluster_id(broker: EmbeddedBroker) -> None:
    assert is_embedded_broker(KafkaSettings(), broker.bootstrap_servers)
    conf = consumer_config(KafkaSettings(), broker.bootstrap_servers, embedded=True)
    assert {k: conf[k] for k in EMBEDDED_CLIENT_DEFAULTS} == EMBEDDED_CLIENT_DEFAULTS


def test_another_cluster_or_none_gets_librdkafkas_defaults(noida: NoidaBroker) -> None:
    settings = KafkaSettings(consumer=noida.client_settings)
    assert not is_embedded_broker(settings, noida.bootstrap_servers)
    assert not is_embedded_broker(KafkaSettings(), "127.0.0.1:1", timeout=1.0)  # nobody there
    conf = consumer_config(KafkaSettings(), noida.bootstrap_servers, embedded=False)
    assert "session.timeout.ms" not in conf
    assert "heartbeat.interval.ms" not in conf
