"""End-to-end fixtures: one real Tansu broker per session, fresh topics per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient
from e2e.kit import MODELS, Topics, new_topics, write_tiny_topology

from pipeline.broker import EmbeddedBroker
from pipeline.kafka import ensure_topics


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as b:
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
