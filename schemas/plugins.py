"""Plugin lookup shared by stages and backends: entry points first, then import strings."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from schemas.errors import GraphError

__all__ = ["available", "import_object", "load_plugin"]


def available(group: str) -> dict[str, str]:
    """Installed plugins of ``group``: name → ``module:attr``."""
    return {ep.name: ep.value for ep in entry_points(group=group)}


def load_plugin(group: str, name: str, kind: str) -> Any:
    """Resolve ``name`` in ``group``, or import it when it looks like ``module:attr``."""
    for ep in entry_points(group=group, name=name):
        return ep.load()
    if ":" not in name:
        known = ", ".join(sorted(available(group))) or "none installed"
        raise GraphError(f"unknown {kind} {name!r} (known: {known}; or give 'module:Class')")
    return import_object(name, kind)


def import_object(target: str, kind: str) -> Any:
    """The object an import string ``module:attr`` names; `GraphError` saying what failed."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise GraphError(f"{kind} {target!r}: expected 'module:attr'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise GraphError(f"{kind} {target!r}: cannot import {module_name}: {e}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise GraphError(f"{kind} {target!r}: {module_name} has no {attr!r}") from None
