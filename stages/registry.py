"""Finding stage classes: the ``kp_pipeline.stages`` entry-point group, or ``module:Class``."""

from __future__ import annotations

from typing import Any

from schemas.plugins import load_plugin

__all__ = ["ENTRY_POINT_GROUP", "stage_class"]

ENTRY_POINT_GROUP = "kp_pipeline.stages"


def stage_class(name: str) -> Any:
    """The class registered as ``name``, or imported from ``module:Class``."""
    return load_plugin(ENTRY_POINT_GROUP, name, kind="stage")
