"""One connection to the cluster before any work: refuse at once what cannot work.

librdkafka retries a refused login or an untrusted certificate forever, as it retries an
unreachable broker, so a replica with a wrong password would start, report not ready and
never say why. Every command (and the client) first makes one metadata request with the
topology's security settings; the errors librdkafka reports meanwhile say what went
wrong, and a refusal (SASL authentication, TLS verification, a host name the broker's
certificate does not name, a client certificate the broker does not accept) is raised
as `AccessError` (exit 2) naming the setting to check, within seconds. A broker that does
not answer at all is a `BrokerError` (exit 1) after ``timeout``.

Messages name the user and the files, never a password: librdkafka's own error strings
do not carry it either.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from pipeline.config.topology import KafkaSettings
from pipeline.kafka.clients import admin_config
from schemas.errors import AccessError, BrokerError

__all__ = ["check_access", "refusal"]

log = logging.getLogger(__name__)

_HOSTNAME = ("hostname mismatch", "ip address mismatch", "certificate name does not match")
_CLIENT_CERT = ("certificate required", "bad certificate", "unknown ca", "certificate unknown")


def refusal(err: KafkaError, settings: KafkaSettings, detail: str = "") -> str | None:
    """What a librdkafka error says about our credentials, or None if it is not a refusal.

    ``detail``: what a TLS handshake of our own said about the broker's certificate
    (librdkafka reports an untrusted CA and a host name mismatch alike).
    """
    sec, text = settings.security, err.str()
    low = f"{text} {detail}".lower()
    if err.code() == KafkaError._AUTHENTICATION or "sasl authentication" in low:
        return (
            f"kafka.security: the cluster refused the SASL credentials of user "
            f"{sec.sasl_username!r} ({sec.sasl_mechanism}): {text}"
        )
    if err.code() != KafkaError._SSL and "ssl handshake failed" not in low:
        return None
    if any(m in low for m in _HOSTNAME):
        return (
            "kafka.security: the broker's certificate does not name the host connected to "
            f"(ssl_endpoint_identification: https): {detail or text}"
        )
    if "certificate verify failed" in low:
        return (
            "kafka.security: the broker's certificate is not signed by a trusted CA "
            f"(ssl_ca_location: {sec.ssl_ca_location or 'the system store'}): "
            f"{detail or text}"
        )
    if any(m in low for m in _CLIENT_CERT):
        return (
            "kafka.security: the broker refused this client's certificate "
            f"(ssl_certificate_location: {sec.ssl_certificate_location or 'none'}): {text}"
        )
    return f"kafka.security: the TLS handshake failed: {text}"


def check_access(
    settings: KafkaSettings,
    bootstrap: str,
    where: str,
    timeout: float = 15.0,
    unreachable_ok: bool = False,
) -> None:
    """Return once the cluster answers a metadata request; raise what it refused.

    ``unreachable_ok``: a cluster that does not answer within ``timeout`` is logged and
    left to the caller's own retries (a replica starts and waits, not ready, as it does
    when its brokers go away later); a refusal is raised all the same.
    """
    missing = settings.security.missing_files()
    if missing:
        raise AccessError(f"{where}: kafka.security.{missing[0]}")
    errors: list[KafkaError] = []
    conf: dict[str, Any] = {**admin_config(settings, bootstrap), "error_cb": errors.append}
    conf.setdefault("log_level", 2)  # the refusal is raised; librdkafka need not print it too
    admin = AdminClient(conf)
    started = time.monotonic()
    deadline = started + timeout
    last = ""
    while True:
        try:
            admin.list_topics(timeout=min(1.0, max(deadline - time.monotonic(), 0.1)))
            return
        except KafkaException as e:
            last = e.args[0].str() if e.args else str(e)
        admin.poll(0.1)  # serves error_cb
        for err in errors:
            detail = ""
            if err.code() == KafkaError._SSL and "verify failed" in err.str():
                detail = _verify_detail(bootstrap, settings)
            why = refusal(err, settings, detail)
            if why is not None:
                raise AccessError(f"{where}: {why}")
        if errors:
            last = errors[-1].str()
        secured = settings.security.protocol != "PLAINTEXT"
        if secured and time.monotonic() - started > _CLOSED_AFTER_S and _accepts_tcp(bootstrap):
            raise AccessError(
                f"{where}: kafka.security: the broker at {bootstrap} accepts connections but "
                f"closes ours while setting up {settings.security.protocol}: a broker that "
                "requires mutual TLS closes them when ssl_certificate_location and "
                "ssl_key_location are missing or name a certificate its CA did not sign "
                f"({last})"
            )
        if time.monotonic() >= deadline and unreachable_ok:
            log.warning(
                "%s: no broker at %s answered within %g s (%s)", where, bootstrap, timeout, last
            )
            return
        if time.monotonic() >= deadline:
            raise BrokerError(
                f"{where}: no broker at {bootstrap} answered within {timeout:g} s ({last})"
            )


_CLOSED_AFTER_S = 3.0
"""How long a secured handshake may keep failing silently before it counts as refused."""


def _verify_detail(bootstrap: str, settings: KafkaSettings) -> str:
    """Why the broker's certificate fails verification, from a handshake of our own.

    Python's ``ssl`` names the reason (a host name mismatch, an unknown issuer) where
    librdkafka's message does not. "" when the handshake says nothing more.
    """
    host, port = _first(bootstrap)
    sec = settings.security
    context = ssl.create_default_context(cafile=sec.ssl_ca_location)
    context.check_hostname = sec.ssl_endpoint_identification == "https"
    try:
        with (
            socket.create_connection((host, port), timeout=3.0) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            return ""
    except ssl.SSLCertVerificationError as e:
        return f"certificate verify failed: {e.verify_message}"
    except (OSError, ValueError):
        return ""


def _first(bootstrap: str) -> tuple[str, int]:
    host, _, port = bootstrap.split(",", maxsplit=1)[0].strip().rpartition(":")
    return host.strip("[]"), int(port)


def _accepts_tcp(bootstrap: str) -> bool:
    """Whether the first bootstrap address takes a TCP connection."""
    try:
        with socket.create_connection(_first(bootstrap), timeout=1.0):
            return True
    except (OSError, ValueError):
        return False
