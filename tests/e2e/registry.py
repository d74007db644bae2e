"""A Schema Registry for e2e tests: the REST calls the pipeline makes, in memory, on loopback.

No Schema Registry installs from the registries this project may reach (Confluent's is
Java; Karapace is not on PyPI), so the e2e tests serve its two calls themselves:
register under a subject (POST ``/subjects/<s>/versions``, with ``schemaType``) and look
up by id (GET ``/schemas/ids/<id>``). It keeps the one rule of a real registry that the
pipeline's subject choice must respect: a subject holds schemas of one type only (a
second type is refused with 409, as a compatibility check refuses it).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any


@dataclass
class Registered:
    subject: str
    schema_type: str
    schema: str


@dataclass
class RegistryStub:
    url: str = ""
    by_id: dict[int, Registered] = field(default_factory=dict)

    def subjects(self) -> dict[str, str]:
        """Each subject and the type of its schemas."""
        return {r.subject: r.schema_type for r in self.by_id.values()}


@contextmanager
def registry_stub() -> Iterator[RegistryStub]:
    state = RegistryStub()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            subject = self.path.split("/")[2]
            kind = body.get("schemaType", "AVRO")
            with lock:
                if state.subjects().get(subject, kind) != kind:
                    self._reply(409, {"error_code": 409, "message": f"{subject} is not {kind}"})
                    return
                found = next(
                    (
                        i
                        for i, r in state.by_id.items()
                        if (r.schema, r.schema_type) == (body["schema"], kind)
                    ),
                    None,
                )
                if found is None:
                    found = len(state.by_id) + 1
                    state.by_id[found] = Registered(subject, kind, body["schema"])
            self._reply(200, {"id": found})

        def do_GET(self) -> None:
            r = state.by_id.get(int(self.path.rsplit("/", 1)[1]))
            if r is None:
                self._reply(404, {"error_code": 40403, "message": "Schema not found"})
                return
            out = {"schema": r.schema}
            if r.schema_type != "AVRO":
                out["schemaType"] = r.schema_type
            self._reply(200, out)

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
