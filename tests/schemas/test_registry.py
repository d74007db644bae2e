from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest

from pipeline.errors import BrokerError
from schemas.codec import load_schema
from schemas.registry import SchemaRegistryClient


class _Registry(BaseHTTPRequestHandler):
    """A minimal Schema Registry speaking the two calls the client uses."""

    schemas: dict[int, str] = {}  # noqa: RUF012 - shared by the test's handler instances
    calls: list[tuple[str, str, str | None]] = []  # noqa: RUF012

    def _reply(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.calls.append(("POST", self.path, self.headers.get("Authorization")))
        schema_id = next((i for i, s in self.schemas.items() if s == body["schema"]), None)
        if schema_id is None:
            schema_id = len(self.schemas) + 1
            self.schemas[schema_id] = body["schema"]
        self._reply(200, {"id": schema_id})

    def do_GET(self) -> None:
        self.calls.append(("GET", self.path, self.headers.get("Authorization")))
        schema_id = int(self.path.rsplit("/", 1)[1])
        if schema_id not in self.schemas:
            self._reply(404, {"error_code": 40403, "message": "Schema not found"})
            return
        self._reply(200, {"schema": self.schemas[schema_id]})

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def registry_url() -> Iterator[str]:
    _Registry.schemas, _Registry.calls = {}, []
    server = HTTPServer(("127.0.0.1", 0), _Registry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_register_is_idempotent_and_lookups_are_cached(registry_url: str) -> None:
    client = SchemaRegistryClient(registry_url, "user", "secret")
    result = load_schema("result")
    first = client.register("kp.results-value", result)
    assert client.register("kp.results-value", result) == first
    assert client.register("kp.dead-letters-value", load_schema("dead_letter")) != first
    other = SchemaRegistryClient(registry_url)
    assert other.schema_by_id(first) == result
    assert other.schema_by_id(first) == result
    gets = [c for c in _Registry.calls if c[0] == "GET"]
    assert len(gets) == 1  # ids never change: fetched once
    assert _Registry.calls[0] == (
        "POST",
        "/subjects/kp.results-value/versions",
        "Basic " + base64.b64encode(b"user:secret").decode(),
    )


def test_unknown_id_and_unreachable_registry_are_clear_errors(registry_url: str) -> None:
    with pytest.raises(BrokerError, match="/schemas/ids/42"):
        SchemaRegistryClient(registry_url).schema_by_id(42)
    with pytest.raises(BrokerError, match="schema registry POST"):
        SchemaRegistryClient("http://127.0.0.1:1", timeout_s=1).register("s", {"type": "string"})
