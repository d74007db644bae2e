"""SchemaRegistryClient against a tiny Schema Registry served by http.server on loopback."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest

from schemas.codec import load_schema
from schemas.errors import BrokerError
from schemas.registry import SchemaRegistryClient

SR_JSON = "application/vnd.schemaregistry.v1+json"


@dataclass
class Call:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: Any = None


@dataclass
class FakeRegistry:
    url: str
    schemas: dict[int, str] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)


def _handler(state: FakeRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", SR_JSON)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state.calls.append(
                Call("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            )
            schema_id = next((i for i, s in state.schemas.items() if s == body["schema"]), None)
            if schema_id is None:
                schema_id = 100 + len(state.schemas)
                state.schemas[schema_id] = body["schema"]
            self._reply(200, {"id": schema_id})

        def do_GET(self) -> None:
            state.calls.append(
                Call("GET", self.path, {k.lower(): v for k, v in self.headers.items()})
            )
            schema_id = int(self.path.rsplit("/", 1)[1])
            if schema_id not in state.schemas:
                self._reply(404, {"error_code": 40403, "message": "Schema not found"})
                return
            self._reply(200, {"schema": state.schemas[schema_id]})

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def registry() -> Iterator[FakeRegistry]:
    state = FakeRegistry("")
    server = HTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join(5)


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_register_posts_the_schema_as_json_text_and_returns_its_id(
    registry: FakeRegistry,
) -> None:
    client = SchemaRegistryClient(registry.url + "/")  # a trailing slash is tolerated
    result = load_schema("result")
    assert client.register("kp.results-value", result) == 100
    [call] = registry.calls
    assert (call.method, call.path) == ("POST", "/subjects/kp.results-value/versions")
    assert json.loads(call.body["schema"]) == result
    assert call.headers["content-type"] == SR_JSON
    assert "authorization" not in call.headers


def test_register_names_json_and_protobuf_schema_types_and_avro_stays_implicit(
    registry: FakeRegistry,
) -> None:
    client = SchemaRegistryClient(registry.url)
    client.register("t-value", load_schema("result"))
    client.register("t-json", {"title": "x", "type": "object"}, "JSON")
    client.register("t-proto", 'syntax = "proto3";', "PROTOBUF")
    avro, as_json, proto = (call.body for call in registry.calls)
    assert "schemaType" not in avro
    assert (as_json["schemaType"], json.loads(as_json["schema"])["title"]) == ("JSON", "x")
    assert proto == {"schema": 'syntax = "proto3";', "schemaType": "PROTOBUF"}


def test_register_is_idempotent_and_ids_differ_per_schema(registry: FakeRegistry) -> None:
    client = SchemaRegistryClient(registry.url)
    first = client.register("a-value", load_schema("result"))
    assert client.register("a-value", load_schema("result")) == first
    assert client.register("b-value", load_schema("dead_letter")) == first + 1


def test_schema_by_id_fetches_once_then_caches(registry: FakeRegistry) -> None:
    schema = load_schema("request")
    registry.schemas[7] = json.dumps(schema)
    client = SchemaRegistryClient(registry.url)
    assert client.schema_by_id(7) == schema
    assert client.schema_by_id(7) == schema
    assert [(c.method, c.path) for c in registry.calls] == [("GET", "/schemas/ids/7")]


def test_a_registered_schema_needs_no_fetch(registry: FakeRegistry) -> None:
    client = SchemaRegistryClient(registry.url)
    schema_id = client.register("s", load_schema("dead_letter"))
    assert client.schema_by_id(schema_id) == load_schema("dead_letter")
    assert [c.method for c in registry.calls] == ["POST"]


def test_basic_auth_header_is_sent_on_every_call(registry: FakeRegistry) -> None:
    client = SchemaRegistryClient(registry.url, "user", "s3cr:t")
    schema_id = client.register("s", {"type": "string"})
    SchemaRegistryClient(registry.url, "user", "s3cr:t").schema_by_id(schema_id)
    SchemaRegistryClient(registry.url, "only-user").schema_by_id(schema_id)
    auth = [c.headers.get("authorization") for c in registry.calls]
    assert auth == [_basic("user", "s3cr:t"), _basic("user", "s3cr:t"), _basic("only-user", "")]


def test_unknown_id_is_a_broker_error_naming_the_call(registry: FakeRegistry) -> None:
    with pytest.raises(BrokerError, match=r"schema registry GET .*/schemas/ids/42: .*404"):
        SchemaRegistryClient(registry.url).schema_by_id(42)


def test_unreachable_registry_is_a_broker_error() -> None:
    client = SchemaRegistryClient("http://127.0.0.1:1", timeout_s=1)
    with pytest.raises(BrokerError, match=r"schema registry POST http://127\.0\.0\.1:1/subjects/s"):
        client.register("s", {"type": "string"})
