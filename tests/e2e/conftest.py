"""End-to-end fixtures: one real Tansu broker per session, fresh topics per test.

Two more brokers start only for the tests that ask for them: ``noida`` (noida-db, which
hides aborted transactions and fences zombies) and ``tansu_s3`` (Tansu on a moto S3
server, whose data survives a broker restart). See e2e/brokers.py.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient
from e2e.brokers import (
    NOIDA_INSTALL_HINT,
    TANSU_S3_INSTALL_HINT,
    NoidaBroker,
    TansuS3Broker,
)
from e2e.kit import MODELS, Topics, new_topics, write_tiny_topology

from pipeline.kafka.broker import EmbeddedBroker
from pipeline.kafka.clients import ensure_topics


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture(scope="session")
def noida(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NoidaBroker]:
    """noida-db's Kafka service; its clients need ``noida.client_settings``."""
    if importlib.util.find_spec("noida_db") is None:
        pytest.fail(NOIDA_INSTALL_HINT, pytrace=False)
    with NoidaBroker(tmp_path_factory.mktemp("noida") / "data") as b:
        yield b


@pytest.fixture(scope="session")
def tansu_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuS3Broker]:
    """Tansu on a moto S3 server: ``stop_broker``/``start_broker`` keep the data."""
    if importlib.util.find_spec("moto") is None:
        pytest.fail(TANSU_S3_INSTALL_HINT, pytrace=False)
    with TansuS3Broker(tmp_path_factory.mktemp("tansu-s3")) as b:
        yield b


@pytest.fixture
def topics(broker: EmbeddedBroker) -> Topics:
    t = new_topics()
    admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})
    ensure_topics(admin, [t.input, t.output, t.dead_letter], partitions=4, replication=1)
    return t


@pytest.fixture
def tiny_topology(tmp_path: Path, topics: Topics) -> Path:
    if not (MODELS / "tiny_mlp.onnx").exists():
        pytest.fail("models/tiny_mlp.onnx missing: run `make models` (kp-pipeline models export)")
    return write_tiny_topology(tmp_path / "tiny.yaml", topics)
