"""Changing which version serves, while serving, on every replica: the control topic.

Real broker, real tiny ONNX model in two (or three) versions. A promotion under steady
load on two replicas: nothing lost or repeated, requests sent after both replicas applied
it all meet the new version, and a replica started afterwards comes back on it. Two
commands at once: the one that landed first stays and the other is withdrawn. A replica
that does not serve the version a command asks for keeps its split and says so on
/readyz and in metrics; rollback returns to the split before.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from e2e.kit import PacedProducer, Topics, read_all, start_background, tiny_version, wait_for

from pipeline.app import open_topology
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.lifecycle import admin
from pipeline.lifecycle.admin import ConflictError, ControlLog, canary, promote, rollback, send
from pipeline.lifecycle.commands import ControlRecord, Split
from pipeline.lifecycle.follower import ControlFollower
from pipeline.observability.health import Health
from pipeline.observability.metrics import Metrics
from pipeline.serving.routing import ModelRoute, Router
from pipeline.serving.versions import traffic_of
from pipeline.tools.demo import BackgroundPipeline
from schemas.codec import AvroCodec

TOPOLOGY = """
kafka: {{bootstrap_servers: embedded, group_id: {group}, consumer: {{session.timeout.ms: 6000}}}}
topics: {{input: [{input}], output: {output}, dead_letter: {dlq}}}
flow: {{commit_interval_ms: 100}}
versions:
  tiny-mlp: {{default: "1"}}
models:{models}
"""


def _topology(tmp_path: Path, topics: Topics, versions: tuple[str, ...], name: str) -> Path:
    path = tmp_path / name
    models = "".join(tiny_version(v) for v in versions)
    path.write_text(
        topics.fill(
            TOPOLOGY,
            models=models,
        )
    )
    return path


def _default(served: BackgroundPipeline) -> str:
    return served.pipeline.intake.router.traffic["tiny-mlp"].default  # type: ignore[union-attr]


def _sample(served: BackgroundPipeline, name: str, labels: dict[str, str]) -> Any:
    return served.pipeline.metrics.registry.get_sample_value(name, labels)  # type: ignore[union-attr]


def test_a_promotion_under_load_moves_every_replica_and_loses_nothing(
    broker: EmbeddedBroker, topics: Topics, tmp_path: Path
) -> None:
    path = _topology(tmp_path, topics, ("1", "2"), "two.yaml")
    topology = open_topology(path).topology
    replicas = [start_background(path, broker), start_background(path, broker)]
    late = None
    try:
        wait_for(
            lambda: (
                all(r.pipeline.health.assignment for r in replicas)  # type: ignore[union-attr]
                and sum(r.pipeline.health.assignment for r in replicas) == 4
            ),  # type: ignore[union-attr, misc]
            30,
            "both replicas assigned",
        )
        producer = PacedProducer(broker, topics.input, n=2000, chunk=50, every_s=0.02)
        wait_for(lambda: producer.produced >= 600, 60, "600 requests sent before the promotion")
        record = send(topology, broker.bootstrap_servers, "tiny-mlp", promote("2"), "promote 2")
        assert record.seq == 1
        wait_for(lambda: all(_default(r) == "2" for r in replicas), 10, "both replicas on v2")
        after = producer.produced
        wait_for(lambda: producer.produced >= after + 600, 60, "600 more after the promotion")
        produced = producer.finish()
        codec = AvroCodec()
        results = [
            codec.decode_result(m.value()) for m in read_all(broker, topics.output, produced)
        ]
        ratios = [
            _sample(r, "kp_model_version_traffic_ratio", {"model": "tiny-mlp", "version": "2"})
            for r in replicas
        ]
        time.sleep(1.0)  # anything beyond one outcome per request would have arrived by now
        extra = list(read_all(broker, topics.output, produced + 1, timeout=2))
        late = start_background(path, broker)  # a replica started after the promotion
        assert _default(late) == "2"
    finally:
        for r in [*replicas, *([late] if late else [])]:
            r.stop()

    versions = {r.id: r.model_version for r in results}
    assert len(results) == len(versions) == produced  # nothing lost, nothing repeated
    assert len(extra) == produced
    assert ratios == [1.0, 1.0]
    assert {versions[f"r-{i}"] for i in range(300)} == {"1"}  # sent well before: v1
    assert {versions[f"r-{i}"] for i in range(after, produced)} == {"2"}


def test_two_commands_at_once_end_on_the_first_and_the_second_is_told(
    broker: EmbeddedBroker, topics: Topics, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    topology = open_topology(_topology(tmp_path, topics, ("1", "2", "3"), "three.yaml")).topology
    address = broker.bootstrap_servers
    write = admin._write
    raced: list[int] = []

    def racing(topology_: Any, bootstrap: str, record: ControlRecord) -> int:
        if not raced:  # another command lands between this one's read and its write
            other = ControlRecord("tiny-mlp", Split("3"), 1, "promote 3", Split("1"), "other")
            raced.append(write(topology_, bootstrap, other))
        return write(topology_, bootstrap, record)

    monkeypatch.setattr(admin, "_write", racing)
    with pytest.raises(ConflictError, match=r"another command \('promote 3' by other\)"):
        send(topology, address, "tiny-mlp", promote("2"), "promote 2")
    now = ControlLog.read(topology, address).current(topology, "tiny-mlp")
    assert now.split == Split("3")
    assert now.command == "restore 'promote 3'"
    # A replica starting now reads the topic to its end before it serves: on v3 at once.
    served = [(m.name, m.version) for m in topology.models]
    traffic = traffic_of(served, topology.versions)
    routes = {k: ModelRoute("tiny-mlp", v, {}, key=k) for v, k in traffic["tiny-mlp"].keys.items()}
    router = Router(routes, traffic)
    follower = ControlFollower(topology, address, router, Metrics(), Health())
    try:
        assert follower.catch_up(10) == 3  # the other command, this one, the restore
        assert router.traffic["tiny-mlp"].default == "3"
    finally:
        follower.stop()


def test_a_replica_without_the_version_keeps_its_split_and_says_so(
    broker: EmbeddedBroker, topics: Topics, tmp_path: Path
) -> None:
    three = open_topology(_topology(tmp_path, topics, ("1", "2", "3"), "three.yaml")).topology
    two = _topology(tmp_path, topics, ("1", "2"), "two.yaml")
    address = broker.bootstrap_servers

    served = start_background(two, broker)
    try:
        send(three, address, "tiny-mlp", canary("3", 0.2), "canary 3 0.2")
        labels = {"model": "tiny-mlp"}
        wait_for(lambda: _sample(served, "kp_control_unapplied", labels) == 1, 10, "unapplied")
        ready, detail = served.pipeline.health.ready()  # type: ignore[union-attr]
        assert not ready
        assert "asks for version 3, which this replica does not serve" in str(
            detail["versions_behind"]["tiny-mlp"]
        )
        assert served.pipeline.intake.router.traffic["tiny-mlp"].canary == ()  # type: ignore[union-attr]
        send(three, address, "tiny-mlp", canary("3", 0), "canary 3 0")
        wait_for(lambda: served.pipeline.health.ready()[0], 10, "ready again")  # type: ignore[union-attr]
        assert _sample(served, "kp_control_unapplied", labels) == 0
        send(three, address, "tiny-mlp", promote("2"), "promote 2")
        wait_for(lambda: _default(served) == "2", 10, "the promotion applied")
        back = send(three, address, "tiny-mlp", rollback, "rollback")
        assert back.split == Split("1")  # the split before the promotion
        wait_for(lambda: _default(served) == "1", 10, "the rollback applied")
    finally:
        served.stop()


def test_the_faust_adapter_follows_the_groups_splits(
    broker: EmbeddedBroker, topics: Topics, tmp_path: Path
) -> None:
    from e2e.kit import produce_tiny, tiny_vectors

    from load.faust_app import FaustWorkerThread, make_app
    from pipeline.integrations.faust import KpFaustModel, attach

    path = _topology(tmp_path, topics, ("1", "2"), "two.yaml")
    topology = open_topology(path).topology
    address = broker.bootstrap_servers
    with KpFaustModel.from_topology(path) as model:
        model.follow_control(address)  # no control topic yet: it looks for one
        router = model.intake.router
        assert router.traffic["tiny-mlp"].default == "1"
        send(topology, address, "tiny-mlp", promote("2"), "promote 2")
        wait_for(lambda: router.traffic["tiny-mlp"].default == "2", 15, "the adapter promoted")
        app = make_app(topics.group, address, tmp_path, commit_interval_s=0.2)
        attach(app, model)
        worker = FaustWorkerThread(app).start()
        try:
            produce_tiny(broker, topics.input, tiny_vectors(60), prefix="f")
            results = [
                AvroCodec().decode_result(m.value()) for m in read_all(broker, topics.output, 60)
            ]
        finally:
            worker.stop()
    assert {r.model_version for r in results} == {"2"}
