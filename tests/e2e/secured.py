"""A broker behind the TLS/SASL proxy, with the topology settings that reach it.

Shared by the security tests and the secret-leak test: see `load.netproxy` for why the
proxy is there (Tansu 0.6.0 serves neither TLS nor SCRAM).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka.admin import AdminClient
from e2e.kit import Topics, write_tiny_topology

from load.certs import Pki
from load.netproxy import KafkaProxy
from pipeline.config.topology import KafkaSettings, SecuritySettings
from pipeline.kafka.broker import EmbeddedBroker, free_port
from pipeline.kafka.clients import admin_config, ensure_topics

PASSWORD = "correct-horse-battery"


@dataclass
class Secured:
    """A broker behind a proxy, and the topology's ``kafka.security`` that reaches it."""

    broker: EmbeddedBroker
    proxy: KafkaProxy
    security: dict[str, str]

    @property
    def bootstrap_servers(self) -> str:  # what kit's helpers connect to
        return self.proxy.address

    @property
    def settings(self) -> KafkaSettings:
        return KafkaSettings(security=SecuritySettings(**self.security))  # type: ignore[arg-type]


@contextlib.contextmanager
def secured(
    pki: Pki,
    security: dict[str, str],
    *,
    tls: bool = True,
    mutual: bool = False,
    sasl: bool = False,
    cert: str = "broker",
    password: str = PASSWORD,
) -> Iterator[Secured]:
    port = free_port()
    broker = EmbeddedBroker(advertised=f"127.0.0.1:{port}").start()
    proxy = KafkaProxy(
        broker.bootstrap_servers,
        port=port,
        cert=(getattr(pki, f"{cert}_pem"), getattr(pki, f"{cert}_key")) if tls else None,
        client_ca=pki.ca_pem if mutual else None,
        users={"alice": password} if sasl else None,
    ).start()
    try:
        yield Secured(broker, proxy, security)
    finally:
        proxy.stop()
        broker.stop()


def sasl_ssl(pki: Pki, password: str = PASSWORD, mutual: bool = True) -> dict[str, str]:
    out = {
        "protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": "alice",
        "sasl_password": password,
        "ssl_ca_location": pki.ca_pem,
    }
    if mutual:
        out |= {"ssl_certificate_location": pki.client_pem, "ssl_key_location": pki.client_key}
    return out


def secured_topology(path: Path, topics: Topics, security: dict[str, str]) -> Path:
    write_tiny_topology(path, topics)
    block = json.dumps(security)
    path.write_text(
        path.read_text().replace(
            "bootstrap_servers: embedded,", f"bootstrap_servers: embedded, security: {block},"
        )
    )
    return path


def create_topics(where: Secured, topics: Topics, *extra: str) -> None:
    admin = AdminClient(admin_config(where.settings, where.bootstrap_servers))
    ensure_topics(admin, [topics.input, topics.output, topics.dead_letter, *extra], 2, 1)
