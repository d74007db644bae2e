"""TLS, mutual TLS and SASL end to end, and refusals that fail fast with their reason.

Tansu 0.6.0 cannot serve TLS nor keep SCRAM users (see `pipeline.kafka.broker`), so each
test runs a broker of its own behind `load.netproxy.KafkaProxy`, which terminates TLS
(requiring a client certificate for mutual TLS) and answers the SASL exchange as a broker
does (PLAIN, SCRAM-SHA-256/512); the broker advertises the proxy, so every connection of
every client goes through it. Certificates come from a test CA (`e2e.certs`).

The richest setup (SASL_SSL with SCRAM-SHA-512 over mutual TLS) carries every command:
``run``, ``produce``, ``results``, ``dlq inspect``, ``replay``, the client and the load
generator. TLS alone and SASL_PLAINTEXT with PLAIN carry a pipeline and the client. A
wrong password, an untrusted CA, a broker certificate for another host and a missing
client certificate each stop ``kp-pipeline run`` within seconds with exit 2 and a
message naming the setting, as does the client.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from e2e.kit import ROOT, new_topics, spawn_run
from e2e.secured import (
    PASSWORD,
    Secured,
    create_topics,
    sasl_ssl,
    secured,
    secured_topology,
)

from load.certs import Pki, make_pki
from pipeline.client import Client
from schemas.errors import AccessError


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False,
    )  # fmt: skip


def _stop(run: subprocess.Popen[bytes]) -> None:
    run.terminate()
    run.wait(30)


def _round_trip(where: Secured, topology: Path, tmp_path: Path) -> None:
    """A pipeline over the secured path answers the client."""
    run = spawn_run(topology, where, tmp_path / "run.log")  # type: ignore[arg-type]
    try:
        with Client.from_topology(topology, bootstrap=where.bootstrap_servers) as client:
            result = client.infer("tiny-mlp", {"x": np.ones(64, np.float32)}, timeout=60)
    finally:
        _stop(run)
    assert result.outputs["scores"].shape == (3,), (tmp_path / "run.log").read_text()[-2000:]


def test_every_command_works_over_sasl_scram_and_mutual_tls(pki: Pki, tmp_path: Path) -> None:
    topics = new_topics()
    replay_out = f"{topics.output}-replay"
    with secured(pki, sasl_ssl(pki), mutual=True, sasl=True) as where:
        create_topics(where, topics, replay_out)
        topology = secured_topology(tmp_path / "t.yaml", topics, where.security)
        boot = ("--bootstrap", where.bootstrap_servers)
        np.save(tmp_path / "x.npy", np.linspace(-1, 1, 64, dtype=np.float32))
        log = tmp_path / "run.log"
        run = spawn_run(topology, where, log)  # type: ignore[arg-type]
        try:
            sent = _cli("produce", str(topology), *boot, "--tensor", f"x={tmp_path}/x.npy",
                        "--count", "20", "--id-prefix", "tls-")  # fmt: skip
            bad = _cli("produce", str(topology), *boot, "--model", "nope",
                       "--tensor", f"x={tmp_path}/x.npy", "--id-prefix", "bad-")  # fmt: skip
            results = _cli("results", str(topology), *boot, "--count", "20", "--idle", "10")
            letters = _cli("dlq", "inspect", str(topology), *boot, "--json")
            with Client.from_topology(topology, bootstrap=where.bootstrap_servers) as client:
                answer = client.infer("tiny-mlp", {"x": np.ones(64, np.float32)}, timeout=60)
            load = subprocess.run(
                [sys.executable, "-m", "load.generator", str(topology), *boot, "--rate", "100",
                 "--duration", "2", "--warmup", "2", "--out", str(tmp_path / "load")],
                capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
            )  # fmt: skip
        finally:
            _stop(run)
        replay = _cli("replay", str(topology), *boot, "--from-offset", "0", "--to-offset",
                      "0:5,1:5", "--output", replay_out, "--no-progress")  # fmt: skip
        logins = list(where.proxy.logins)
    for done in (sent, bad, results, letters, load, replay):
        assert done.returncode == 0, (done.args, done.stdout[-1500:], done.stderr[-1500:])
    assert "produced 20 requests" in sent.stdout
    assert results.stdout.count(" tiny-mlp ") == 20
    assert results.stdout.rstrip().endswith(f"20 records from {topics.output}")
    [letter] = [json.loads(line) for line in letters.stdout.splitlines()]
    assert (letter["reason"], letter["model"]) == ("unknown_model", "nope")
    assert answer.status.value == "OK"
    report = json.loads((tmp_path / "load" / "report.json").read_text())
    assert report["counts"]["missing"] == 0
    assert report["counts"]["ok"] == report["counts"]["sent"] > 0
    assert "replayed" in replay.stdout + replay.stderr
    assert {(m, u) for m, u, ok in logins if ok} == {("SCRAM-SHA-512", "alice")}
    assert all(ok for _, _, ok in logins)
    assert PASSWORD not in log.read_text()


def test_tls_alone_and_sasl_plain_carry_a_pipeline_and_the_client(pki: Pki, tmp_path: Path) -> None:
    tls = {"protocol": "SSL", "ssl_ca_location": pki.ca_pem}
    plain = {
        "protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN",
        "sasl_username": "alice", "sasl_password": PASSWORD,
    }  # fmt: skip
    for name, security, options in (
        ("tls", tls, {"tls": True}),
        ("plain", plain, {"tls": False, "sasl": True}),
    ):
        topics = new_topics()
        with secured(pki, security, **options) as where:  # type: ignore[arg-type]
            create_topics(where, topics)
            topology = secured_topology(tmp_path / f"{name}.yaml", topics, security)
            _round_trip(where, topology, tmp_path)
            if name == "plain":
                assert where.proxy.logins[-1] == ("PLAIN", "alice", True)


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("wrong_password", "refused the SASL credentials of user 'alice' (SCRAM-SHA-512)"),
        ("untrusted_ca", "not signed by a trusted CA"),
        ("wrong_host", "does not name the host connected to"),
        ("no_client_certificate", "requires mutual TLS"),
        ("rogue_client_certificate", "requires mutual TLS"),
    ],
)
def test_a_refused_login_stops_run_fast_with_exit_2_naming_the_setting(
    pki: Pki, tmp_path: Path, case: str, says: str
) -> None:
    security = sasl_ssl(pki, mutual=True)
    options: dict[str, Any] = {"mutual": True, "sasl": True}
    if case == "wrong_password":
        security["sasl_password"] = "not-the-password"
    elif case == "untrusted_ca":
        security["ssl_ca_location"] = pki.rogue_ca_pem
    elif case == "wrong_host":
        options["cert"] = "wrong_host"
    elif case == "no_client_certificate":
        del security["ssl_certificate_location"], security["ssl_key_location"]
    else:
        security |= {
            "ssl_certificate_location": pki.rogue_client_pem,
            "ssl_key_location": pki.rogue_client_key,
        }
    topics = new_topics()
    with secured(pki, security, **options) as where:
        topology = secured_topology(tmp_path / "t.yaml", topics, security)
        t0 = time.monotonic()
        done = _cli("run", str(topology), "--bootstrap", where.bootstrap_servers,
                    "--metrics-port", "0", timeout=60)  # fmt: skip
        took = time.monotonic() - t0
        with pytest.raises(AccessError, match=r"kafka\.security"):
            Client.from_topology(topology, bootstrap=where.bootstrap_servers)
    assert done.returncode == 2, (done.stdout[-1500:], done.stderr[-1500:])
    assert says in done.stderr
    assert f"{topology}: kafka.security:" in done.stderr
    assert took < 20, took
    assert "not-the-password" not in done.stdout + done.stderr
