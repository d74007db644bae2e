"""Finding backends: the ``kp_pipeline.backends`` entry-point group, or ``module:Class``."""

from __future__ import annotations

from typing import Any

from schemas.plugins import load_plugin

__all__ = ["ENTRY_POINT_GROUP", "backend_class"]

ENTRY_POINT_GROUP = "kp_pipeline.backends"


def backend_class(name: str) -> Any:
    """The backend class registered as ``name``, or imported from ``module:Class``."""
    return load_plugin(ENTRY_POINT_GROUP, name, kind="backend")
