"""Opening a topology for use: load and check it, reach the cluster, create topics.

Shared by ``run``, ``validate`` and ``demo``, so each command does the same checks in the
same order, and nothing is consumed before all of them pass.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka.admin import AdminClient

from pipeline.config.loader import load_topology
from pipeline.config.topology import Topology
from pipeline.engine.collector import serving_collector
from pipeline.engine.loop import Replica, RunStats
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.kafka.clients import admin_config, ensure_topics, is_embedded_broker
from pipeline.kafka.clients import replica_id as replica_name
from pipeline.kafka.preflight import check_access
from pipeline.lifecycle.follower import ControlFollower, create_control_topic
from pipeline.lifecycle.hotload import VersionLoader
from pipeline.lifecycle.shadow import Shadows, attach_shadows
from pipeline.observability.health import Health, MetricsServer
from pipeline.observability.metrics import Metrics
from pipeline.observability.tracing import make_tracing
from pipeline.serving.graph import ServedModel, build_graph, close_graph
from schemas import oip_json, oip_protobuf
from schemas.codec import AvroCodec, load_schema
from schemas.messages import Partition
from schemas.registry import SchemaRegistryClient
from schemas.wire import frame, protobuf_header

__all__ = ["OpenTopology", "cluster", "make_codec", "open_topology", "serve"]

log = logging.getLogger(__name__)


@dataclass
class OpenTopology:
    """A loaded topology file."""

    topology: Topology
    source: str
    base_dir: Path


def open_topology(path: str | Path) -> OpenTopology:
    """Load and validate a topology file (raises `ConfigError`)."""
    topology = load_topology(path)
    return OpenTopology(topology, str(path), Path(path).resolve().parent)


def check_graph(opened: OpenTopology) -> list[ServedModel]:
    """Build every model (loads them) and check the graph (raises `GraphError`)."""
    return build_graph(opened.topology, opened.source, opened.base_dir)


@contextlib.contextmanager
def cluster(topology: Topology, bootstrap: str | None = None) -> Iterator[str]:
    """Yield the bootstrap address: ``bootstrap`` if given, an embedded broker, or the config's."""
    if bootstrap:
        yield bootstrap
    elif topology.kafka.embedded:
        with EmbeddedBroker() as broker:
            log.info("embedded Tansu broker at %s", broker.bootstrap_servers)
            yield broker.bootstrap_servers
    else:
        yield topology.kafka.bootstrap_servers


def create_topics(topology: Topology, bootstrap: str) -> None:
    """Create the topology's topics if it asks for that."""
    t = topology.topics
    if t.create:
        admin = AdminClient(admin_config(topology.kafka, bootstrap))
        ensure_topics(
            admin, [*t.input, t.output, t.dead_letter], t.partitions, t.replication_factor
        )


def make_codec(topology: Topology) -> AvroCodec:
    """Plain Avro, or the Schema Registry wire format when a registry is configured.

    With a registry every value the pipeline writes is framed, and its schema registered
    first: requests (as `produce` and the client write them) under each input topic's
    ``<topic>-value``, Avro results and dead letters under ``<topic>-value``; JSON results with the
    v2 response's JSON Schema and protobuf results with schemas/oip_v2.proto
    (`result_subjects` says under which subjects).
    """
    reg = topology.kafka.schema_registry
    if reg is None:
        return AvroCodec()
    client = SchemaRegistryClient(
        reg.url, reg.username, reg.password.get_secret_value() if reg.password else None
    )
    t = topology.topics
    subjects = result_subjects(t.output, t.result_encoding)
    prefixes = {}
    if "json" in subjects:
        json_id = client.register(subjects["json"], oip_json.response_schema(), "JSON")
        prefixes["json"] = frame(json_id, b"")
    if "protobuf" in subjects:
        proto = oip_protobuf.PROTO.read_text(encoding="utf-8")
        proto_id = client.register(subjects["protobuf"], proto, "PROTOBUF")
        prefixes["protobuf"] = protobuf_header(proto_id, oip_protobuf.RESPONSE_INDEXES)
    request = load_schema("request")
    request_ids = {client.register(f"{topic}-value", request) for topic in t.input}
    return AvroCodec(
        registry=client,
        request_schema_id=min(request_ids),  # one schema: one id, under every input's subject
        result_schema_id=(
            client.register(subjects["avro"], load_schema("result")) if "avro" in subjects else None
        ),
        dead_letter_schema_id=client.register(f"{t.dead_letter}-value", load_schema("dead_letter")),
        result_prefixes=prefixes,
    )


def result_subjects(output: str, result_encoding: str) -> dict[str, str]:
    """The registry subject of each encoding the results may be written in.

    One encoding for every result (``topics.result_encoding`` avro, json or protobuf):
    ``<topic>-value``, the registry's default (TopicNameStrategy). Results in their
    requests' encodings (``request``), so one topic may carry all three: Avro keeps
    ``<topic>-value`` and the others take ``<topic>-<record name>`` (TopicRecordNameStrategy),
    so no subject ever holds two schema types (a registry refuses that).
    """
    if result_encoding != "request":
        return {result_encoding: f"{output}-value"}
    return {
        "avro": f"{output}-value",
        "json": f"{output}-{oip_json.response_schema()['title']}",
        "protobuf": f"{output}-{oip_protobuf.RESPONSE_NAME}",
    }


def follow_control(
    opened: OpenTopology,
    address: str,
    pipeline: Replica,
    graph: list[ServedModel],
    replica: str | None = None,
    load_timeout: float = 600.0,
) -> tuple[ControlFollower, VersionLoader, Shadows]:
    """The live replica's control follower, caught up before it consumes a request.

    Caught up means the group's current state applied: versions the control topic asks
    for loaded (up to ``load_timeout`` seconds) and its splits applied, so a replica
    restarted in the middle of a swap comes back on the group's current version. A
    replay does not follow: it serves recorded traffic with the topology's split. With the
    broker unreachable at start, the replica starts on the topology's split and the
    follower applies the topic once it can read it.
    """
    topology = opened.topology
    if topology.topics.create:
        try:
            create_control_topic(topology, address, timeout=5)
        except Exception as e:  # an unreachable broker: the follower keeps looking for it
            log.warning("control topic not created (%s): the follower will look for it", e)
    shadows = attach_shadows(topology, address, pipeline)
    loader = VersionLoader(topology, opened.base_dir, pipeline, graph, shadows)
    worker = os.environ.get("KP_WORKER")  # `run --workers N`: one name per worker
    name = replica_name(replica) + (f"/w{worker}" if worker is not None else "")
    follower = ControlFollower(
        topology,
        address,
        pipeline.intake.router,
        pipeline.metrics,
        pipeline.health,
        apply=pipeline.change,
        loader=loader,
        replica_name=name,
    )
    follower.catch_up()
    pipeline.apply_changes()  # settles each model: starts the loads it asks for
    loader.wait(load_timeout)
    pipeline.apply_changes()  # attaches them, and applies the splits that needed them
    return follower.start(), loader, shadows


def serve(
    opened: OpenTopology,
    stop: threading.Event,
    bootstrap: str | None = None,
    on_ready: Callable[[str, Replica], None] | None = None,
    metrics_port: int | None = None,
    ranges: Mapping[Partition, tuple[int, int]] | None = None,
    replica_id: str | None = None,
    share_ranges: bool = False,
) -> RunStats:
    """Check everything, then run one replica until ``stop`` is set.

    The metrics port is bound first, so a port in use is refused before minutes of
    model loading, and ``/healthz`` answers while models load. ``metrics_port``
    overrides the topology's (0: any free port). ``share_ranges``: the replay's replicas
    split the ``ranges`` through their group (`pipeline.engine.ranges`).
    """
    topology = opened.topology
    settings, where = topology.metrics, f"{opened.source}: metrics.port"
    if metrics_port is not None:
        settings, where = settings.model_copy(update={"port": metrics_port}), "--metrics-port"
    metrics, health = Metrics(), Health(settings.stale_after_s)
    server = MetricsServer(settings, metrics, health, where).start() if settings.enabled else None
    try:
        tracing = make_tracing(topology.tracing, opened.source)
        graph = check_graph(opened)
        health.models_loaded = True  # they are: /readyz says so while the broker is reached
        try:
            with cluster(topology, bootstrap) as address:
                if topology.kafka.security.protocol != "PLAINTEXT":  # nothing to refuse else
                    check_access(topology.kafka, address, opened.source, 5.0, unreachable_ok=True)
                create_topics(topology, address)
                pipeline = Replica(
                    topology,
                    graph,
                    address,
                    codec=make_codec(topology),
                    embedded=is_embedded_broker(topology.kafka, address),
                    metrics=metrics,
                    health=health,
                    ranges=ranges,
                    replica_id=replica_id,
                    share_ranges=share_ranges,
                    tracing=tracing,
                )
                pipeline.metrics_url = None if server is None else server.url
                live = ranges is None  # a replay serves recorded traffic as the topology says
                control = (
                    follow_control(opened, address, pipeline, graph, replica_id) if live else None
                )
                try:
                    with serving_collector():  # from ready on: callers see the policy applied
                        if on_ready is not None:
                            on_ready(address, pipeline)
                        return pipeline.run(stop)
                finally:
                    if control is not None:
                        follower, loader, shadows = control
                        follower.stop()
                        loader.close()
                        shadows.close()
        finally:
            close_graph(graph)
            if tracing is not None:
                tracing.close()
    finally:
        if server is not None:
            server.close()
