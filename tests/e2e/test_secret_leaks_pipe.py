"""No secret leaks: sentinel secrets run through every command and path, then searched for.

The topology takes a SASL password from the environment, a TLS key password and a Schema
Registry password from the file itself; each is a sentinel string. Every command runs at
debug level (``-v``) against a broker behind the TLS/SASL proxy: ``validate``, ``run``
(with ``/metrics``, ``/healthz`` and ``/readyz`` scraped while it serves), ``produce``
(plain and through the client with ``--wait``), ``results``, ``dlq inspect``, a refused
login with a wrong (sentinel) password, and a topology refused for its security block.
Everything they print, every record they write to the output and dead-letter topics and
the run's log are searched for the sentinels; none may appear.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from e2e.kit import ROOT, new_topics, wait_for
from e2e.registry import registry_stub
from e2e.secured import Secured, create_topics, sasl_ssl, secured, secured_topology

from load.certs import Pki, make_pki
from pipeline.kafka.broker import free_port
from pipeline.kafka.clients import reader_config

SASL = "kp-sentinel-sasl-5d1e8a"
KEY = "kp-sentinel-key-91c2f0"
REGISTRY = "kp-sentinel-registry-0b7a44"
WRONG = "kp-sentinel-wrong-3f6d19"
SENTINELS = (SASL, KEY, REGISTRY, WRONG)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "-v", *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env, check=False,
    )  # fmt: skip


def _records(where: Secured, *topics: str) -> bytes:
    """Every record's key, value and headers on these topics, as one blob."""
    conf = reader_config(where.settings, where.bootstrap_servers, group_id="leak-check")
    consumer = Consumer(conf)
    try:
        parts = [
            TopicPartition(t, p, OFFSET_BEGINNING)
            for t in topics
            for p in consumer.list_topics(t, timeout=10).topics[t].partitions
        ]
        consumer.assign(parts)
        blob = bytearray()
        idle = time.monotonic() + 3
        while time.monotonic() < idle:
            for m in consumer.consume(500, 0.5):
                if m.error() is None:
                    idle = time.monotonic() + 3
                    blob += (m.key() or b"") + (m.value() or b"")
                    blob += b"".join(k.encode() + (v or b"") for k, v in m.headers() or [])
        return bytes(blob)
    finally:
        consumer.close()


def _get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return str(r.read().decode())
    except urllib.error.HTTPError as e:  # /readyz answers 503 with its JSON too
        return str(e.read().decode())
    except OSError:  # not listening yet
        return ""


def test_sentinel_secrets_appear_nowhere(pki: Pki, tmp_path: Path) -> None:
    topics = new_topics()
    env = {**os.environ, "KP_TEST_SASL_PASSWORD": SASL}
    security = sasl_ssl(pki, password="${KP_TEST_SASL_PASSWORD}", mutual=True)
    security["ssl_key_password"] = KEY
    seen: list[str] = []
    with (
        registry_stub() as registry,
        secured(pki, security, mutual=True, sasl=True, password=SASL) as where,
    ):
        topology = secured_topology(tmp_path / "t.yaml", topics, security)
        text = topology.read_text().replace(
            "bootstrap_servers: embedded,",
            "bootstrap_servers: embedded, schema_registry: "
            f"{{url: '{registry.url}', username: reg, password: {REGISTRY}}},",
        )
        topology.write_text(text)
        # What the topology's ${KP_TEST_SASL_PASSWORD} resolves to, for the test's own clients.
        resolved = Secured(where.broker, where.proxy, {**security, "sasl_password": SASL})
        create_topics(resolved, topics)
        boot = ("--bootstrap", where.bootstrap_servers)
        np.save(tmp_path / "x.npy", np.ones(64, np.float32))
        tensor = ("--tensor", f"x={tmp_path}/x.npy")

        done = [_cli(env, "validate", str(topology))]
        port = free_port()
        log = tmp_path / "run.log"
        with log.open("wb") as out:
            run = subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", "-v", "run", str(topology), *boot,
                 "--metrics-port", str(port)],
                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
            )  # fmt: skip
            try:
                base = f"http://127.0.0.1:{port}"
                wait_for(lambda: '"ok": true' in _get(f"{base}/readyz"), 60, "ready")
                done.append(_cli(env, "produce", str(topology), *boot, *tensor, "--count", "5"))
                done.append(_cli(env, "produce", str(topology), *boot, *tensor, "--model", "nope"))
                done.append(_cli(env, "produce", str(topology), *boot, *tensor, "--wait", "60"))
                done.append(_cli(env, "results", str(topology), *boot, "--count", "6"))
                done.append(_cli(env, "dlq", "inspect", str(topology), *boot, "--json"))
                seen += [_get(f"{base}/metrics"), _get(f"{base}/readyz"), _get(f"{base}/healthz")]
            finally:
                run.terminate()
                run.wait(30)
        blob = _records(resolved, topics.output, topics.dead_letter)
        wrong = _cli({**env, "KP_TEST_SASL_PASSWORD": WRONG}, "run", str(topology), *boot)
        bad = tmp_path / "bad.yaml"
        bad.write_text(text.replace('"protocol": "SASL_SSL"', '"protocol": "PLAINTEXT"', 1))
        refused = _cli(env, "validate", str(bad))
    assert [d.returncode for d in done] == [0] * len(done), [d.stderr[-800:] for d in done]
    assert (wrong.returncode, refused.returncode) == (2, 2)
    assert "refused the SASL credentials" in wrong.stderr
    assert "kafka.security" in refused.stderr
    assert b"unknown_model" in blob
    assert json.loads(seen[1])["ok"] is True
    printed = [d.stdout + d.stderr for d in [*done, wrong, refused]]
    everything = "\n".join([*printed, *seen, log.read_text(errors="replace")])
    assert "DEBUG" in everything  # the commands did log at debug level
    for sentinel in SENTINELS:
        assert sentinel not in everything, sentinel
        assert sentinel.encode() not in blob, sentinel
