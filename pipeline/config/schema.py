"""topology.yaml as a JSON Schema: ``kp-pipeline schema``, for editors and checks.

Made from the same pydantic models that load a topology (`pipeline.config.topology`),
so it cannot drift from them, with each installed stage's parameters and each installed
backend's ``options`` filled in: a ``preprocess``/``postprocess`` item must be one of the
stages (``stage`` names it; a ``module:Class`` stage is checked only for its name), and a
model whose ``backend`` names an installed backend has its ``options`` checked against
that backend's. Every key is closed (``additionalProperties: false``), so a misspelt key
is an error at its path, as the loader's own message would say.

A topology may write ``${VAR}`` or ``${VAR:-default}`` wherever a value goes (the loader
substitutes the environment before validating), so every non-string value also accepts
such a string here.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from pydantic import BaseModel

from backends.registry import ENTRY_POINT_GROUP as BACKENDS
from pipeline.config.topology import Topology
from schemas.plugins import available, load_plugin
from stages.registry import ENTRY_POINT_GROUP as STAGES

__all__ = ["ENV_REFERENCE", "add_parser", "topology_schema"]

ENV_REFERENCE = r"^.*\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}.*$"
_REF = "#/$defs/{model}"


def topology_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a topology file, with the installed plugins'."""
    schema = Topology.model_json_schema(ref_template=_REF)
    defs = schema.setdefault("$defs", {})
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "kp-pipeline topology"
    stages = _plugin_items(STAGES, "Params", "stage", defs)
    if stages:
        generic = {
            "type": "object",
            "properties": {"stage": {"type": "string", "pattern": "^[^:]+:[^:]+$"}},
            "required": ["stage"],
            "description": "A stage given as module:Class: its parameters are its own.",
        }
        defs["StageSettings"] = {"anyOf": [*stages, generic]}
    backends = _plugin_items(BACKENDS, "Options", "backend", defs)
    model = defs["ModelSettings"]
    model["allOf"] = [_when_backend(b) for b in backends]
    _allow_env(schema)
    return schema


def _when_backend(item: dict[str, Any]) -> dict[str, Any]:
    """``options`` checked against a backend's own, where ``backend`` names it."""
    name = item["properties"]["backend"]["const"]
    when = {"properties": {"backend": {"const": name}}, "required": ["backend"]}
    return {"if": when, "then": {"properties": {"options": item["properties"]["options"]}}}


def _plugin_items(group: str, attr: str, key: str, defs: dict[str, Any]) -> list[dict[str, Any]]:
    """One object schema per installed plugin of ``group`` with a ``attr`` model."""
    out = []
    for name in sorted(available(group)):
        try:
            params = getattr(load_plugin(group, name, kind=key), attr, None)
        except Exception:  # a plugin that does not import: left out, as `backends` says
            continue
        if not (isinstance(params, type) and issubclass(params, BaseModel)):
            continue
        sub = params.model_json_schema(ref_template=_REF)
        defs.update(sub.pop("$defs", {}))
        if key == "stage":
            sub.setdefault("properties", {})["stage"] = {"const": name}
            sub["required"] = ["stage", *sub.get("required", [])]
            sub["additionalProperties"] = False
            out.append(sub)
        else:
            out.append({"properties": {"backend": {"const": name}, "options": sub}})
    return out


def _allow_env(node: Any) -> None:
    """Let every non-string leaf also be a ``${VAR}`` string (substituted at load)."""
    if isinstance(node, list):
        for item in node:
            _allow_env(item)
        return
    if not isinstance(node, dict):
        return
    for value in node.values():
        _allow_env(value)
    if node.get("type") in ("integer", "number", "boolean") or "enum" in node:
        kept = ("description", "title", "default")
        original = {k: node.pop(k) for k in list(node) if k not in kept}
        node["anyOf"] = [original, {"type": "string", "pattern": ENV_REFERENCE}]


def dumps() -> str:
    """The schema as the command prints it."""
    return json.dumps(topology_schema(), indent=2, sort_keys=True)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``kp-pipeline schema``."""
    p = subparsers.add_parser(
        "schema", help="print topology.yaml's JSON Schema (for editors' YAML support)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the schema."""
    print(dumps())
    return 0
