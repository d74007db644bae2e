"""Reading topology.yaml: YAML, ``${VAR}`` interpolation, validation, errors that point.

Interpolation happens on string values after YAML parsing, so a secret can never break
the YAML's structure. ``${VAR}`` must be set; ``${VAR:-default}`` falls back; ``$${`` is
a literal ``${``. A value that is exactly one reference keeps the referenced text as a
string; pydantic converts it where the field wants a number.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.config.topology import Topology
from schemas.errors import ConfigError, error_message, format_path

__all__ = ["interpolate", "load_topology", "parse_topology"]

_REF = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(value: Any, env: Mapping[str, str], path: tuple[Any, ...] = ()) -> Any:
    """Replace ``${VAR}`` references in every string of a parsed YAML document."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, (*path, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, (*path, i)) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$${":
            return "${"
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise ConfigError(f"{format_path(path)}: environment variable {name} is not set")

    return _REF.sub(sub, value)


def parse_topology(text: str, source: str, env: Mapping[str, str] | None = None) -> Topology:
    """Validate topology YAML text; ``source`` names it in errors."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        doc = interpolate(doc, os.environ if env is None else env)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    try:
        return Topology.model_validate(doc)
    except ValidationError as e:
        lines = [f"{source}: {format_path(err['loc'])}: {error_message(err)}" for err in e.errors()]
        raise ConfigError("\n".join(lines)) from None


def load_topology(path: str | Path, env: Mapping[str, str] | None = None) -> Topology:
    """Load a topology file; relative artifact paths become relative to the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    topology = parse_topology(text, str(path), env)
    base = path.resolve().parent
    models = [
        m if m.artifact.is_absolute() else m.model_copy(update={"artifact": base / m.artifact})
        for m in topology.models
    ]
    return topology.model_copy(update={"models": models})
