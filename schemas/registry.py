"""A small Confluent Schema Registry client: register our schemas, look writers up by id.

Only the two REST calls the pipeline needs, over the standard library, so no extra
dependency is pulled in. Responses are cached: ids are immutable in a registry.
"""

from __future__ import annotations

import base64
import json
import urllib.request
from typing import Any

from schemas.errors import BrokerError

__all__ = ["SchemaRegistryClient"]

_CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


class SchemaRegistryClient:
    """Registers schemas under subjects and fetches schemas by id."""

    def __init__(
        self,
        url: str,
        username: str | None = None,
        password: str | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self._url = url.rstrip("/")
        self._timeout = timeout_s
        self._headers = {"Content-Type": _CONTENT_TYPE, "Accept": _CONTENT_TYPE}
        if username is not None:
            token = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
            self._headers["Authorization"] = f"Basic {token}"
        self._by_id: dict[int, dict[str, Any]] = {}

    def register(
        self, subject: str, schema: dict[str, Any] | str, schema_type: str = "AVRO"
    ) -> int:
        """Register ``schema`` under ``subject`` (idempotent) and return its id.

        ``schema_type``: AVRO (a schema as JSON), JSON (a JSON Schema) or PROTOBUF (the
        text of a .proto file), as the registry's REST API names them; Avro is the
        registry's default and is not sent.
        """
        text = schema if isinstance(schema, str) else json.dumps(schema)
        payload: dict[str, str] = {"schema": text}
        if schema_type != "AVRO":
            payload["schemaType"] = schema_type
        reply = self._call("POST", f"/subjects/{subject}/versions", json.dumps(payload).encode())
        schema_id = int(reply["id"])
        if isinstance(schema, dict):
            self._by_id[schema_id] = schema
        return schema_id

    def schema_by_id(self, schema_id: int) -> dict[str, Any]:
        """The schema registered under ``schema_id``."""
        cached = self._by_id.get(schema_id)
        if cached is None:
            reply = self._call("GET", f"/schemas/ids/{schema_id}", None)
            cached = json.loads(reply["schema"])
            assert isinstance(cached, dict)
            self._by_id[schema_id] = cached
        return cached

    def _call(self, method: str, path: str, body: bytes | None) -> dict[str, Any]:
        req = urllib.request.Request(
            self._url + path, data=body, method=method, headers=self._headers
        )
        try:
            with urllib.request.urlopen(req, timeout=self._timeout) as resp:
                out: dict[str, Any] = json.loads(resp.read())
                return out
        except Exception as e:
            raise BrokerError(f"schema registry {method} {self._url}{path}: {e}") from e
