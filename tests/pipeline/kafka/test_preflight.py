"""What librdkafka's errors say about our credentials: each refusal names its setting.

The texts are librdkafka's own (seen against the TLS and SASL proxy of tests/e2e); the
end-to-end tests (test_security_pipe.py) run `check_access` against real refusals.
"""

from __future__ import annotations

import time

import pytest
from confluent_kafka import KafkaError

from pipeline.config.topology import KafkaSettings, SecuritySettings
from pipeline.kafka.broker import free_port
from pipeline.kafka.preflight import check_access, refusal
from schemas.errors import AccessError, BrokerError

SASL = KafkaSettings(
    security=SecuritySettings(
        protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="alice",
        sasl_password="hunter2",
        ssl_ca_location=__file__,
    )
)
B = "sasl_ssl://127.0.0.1:9093/bootstrap"


@pytest.mark.parametrize(
    ("code", "text", "says"),
    [
        (KafkaError._AUTHENTICATION,
         f"{B}: SASL authentication error: Authentication failed: invalid credentials",
         "refused the SASL credentials of user 'alice' (SCRAM-SHA-512)"),
        (KafkaError._SSL,
         f"{B}: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed: "
         "broker certificate could not be verified",
         f"not signed by a trusted CA (ssl_ca_location: {__file__})"),
        (KafkaError._SSL,
         f"{B}: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed: "
         "broker certificate could not be verified (Hostname mismatch)",
         "does not name the host connected to"),
        (KafkaError._SSL, f"{B}: SSL handshake failed: tlsv13 alert certificate required",
         "refused this client's certificate (ssl_certificate_location: none)"),
        (KafkaError._SSL, f"{B}: SSL handshake failed: unexpected eof",
         "the TLS handshake failed"),
    ],
)  # fmt: skip
def test_refusals_name_what_to_check(code: int, text: str, says: str) -> None:
    why = refusal(KafkaError(code, text), SASL)
    assert why is not None
    assert says in why
    assert text in why
    assert "hunter2" not in why


@pytest.mark.parametrize(
    "code", [KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE]
)
def test_an_unreachable_broker_is_not_a_refusal(code: int) -> None:
    assert refusal(KafkaError(code, "Connect to ipv4#127.0.0.1:1 failed"), SASL) is None


def test_no_broker_is_a_broker_error_in_time_or_a_warning_when_a_replica_may_wait(
    caplog: pytest.LogCaptureFixture,
) -> None:
    address = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(BrokerError, match=f"t.yaml: no broker at {address} answered within 1 s"):
        check_access(KafkaSettings(), address, "t.yaml", timeout=1.0)
    assert time.monotonic() - t0 < 5
    check_access(KafkaSettings(), address, "t.yaml", timeout=1.0, unreachable_ok=True)
    assert f"no broker at {address} answered" in caplog.text


def test_a_tls_file_that_is_not_there_is_refused_before_connecting() -> None:
    settings = KafkaSettings(security=SecuritySettings(protocol="SSL", ssl_ca_location="/no/ca"))
    with pytest.raises(AccessError, match=r"t.yaml: kafka\.security\.ssl_ca_location: no file"):
        check_access(settings, "127.0.0.1:1", "t.yaml")
