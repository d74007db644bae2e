"""Spans exported over OTLP/HTTP by `kp-pipeline run`, received by a real OTLP endpoint.

The endpoint here is a plain HTTP server that decodes what it receives with
OpenTelemetry's own protobuf messages (``ExportTraceServiceRequest``), as a collector
does. Each request produced with a W3C ``traceparent`` must come back as a span in the
producer's trace, a child of the producer's span, with its five phases as children.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from e2e.kit import Topics, read_all, spawn_run

from pipeline.kafka.broker import EmbeddedBroker
from schemas.codec import AvroCodec
from schemas.messages import Request

pytest.importorskip("opentelemetry.proto", reason="the tracing extra is a dev dependency")
N = 40


@pytest.fixture
def otlp() -> Iterator[tuple[str, list[Any]]]:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    received: list[Any] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            message = ExportTraceServiceRequest()
            message.ParseFromString(body)
            received.append(message)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces", received
    server.shutdown()
    server.server_close()


def test_each_request_is_a_span_in_its_producers_trace(
    broker: EmbeddedBroker,
    topics: Topics,
    tiny_topology: Path,
    tmp_path: Path,
    otlp: tuple[str, list[Any]],
) -> None:
    import numpy as np

    endpoint, received = otlp
    text = tiny_topology.read_text() + f"tracing: {{enabled: true, endpoint: '{endpoint}'}}\n"
    tiny_topology.write_text(text)
    log = tmp_path / "run.log"
    run = spawn_run(tiny_topology, broker, log)
    codec = AvroCodec()
    producer = Producer({"bootstrap.servers": broker.bootstrap_servers})
    parents = {}
    for i in range(N):
        trace_id, span_id = f"{i + 1:032x}", f"{i + 7:016x}"
        parents[trace_id] = span_id
        value = codec.encode_request(Request(f"t{i}", "tiny-mlp", {"x": np.ones(64, np.float32)}))
        producer.produce(
            topics.input, value, headers=[("traceparent", f"00-{trace_id}-{span_id}-01".encode())]
        )
    assert producer.flush(30) == 0
    try:
        read_all(broker, topics.output, N, timeout=120)
    finally:
        run.send_signal(signal.SIGTERM)
        code = run.wait(60)
    assert code == 0, log.read_text()[-3000:]

    spans = [
        (resource.resource, span)
        for message in received
        for resource in message.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    requests = {s.trace_id.hex(): s for _, s in spans if s.name == "kp-pipeline tiny-mlp"}
    assert set(requests) == set(parents)
    children: dict[bytes, list[str]] = {}
    for _, s in spans:
        children.setdefault(s.parent_span_id, []).append(s.name)
    for trace_id, span in requests.items():
        assert span.parent_span_id.hex() == parents[trace_id]
        assert sorted(children[span.span_id]) == sorted(
            ["queue", "preprocess", "infer", "postprocess", "publish"]
        )
        attrs = {a.key: a.value for a in span.attributes}
        assert attrs["messaging.destination.name"].string_value == topics.input
    names = {
        a.value.string_value for r, _ in spans for a in r.attributes if a.key == "service.name"
    }
    assert names == {"kp-pipeline"}
