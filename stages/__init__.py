"""Preprocess and postprocess stages, grouped by phase; the contract is in `stages.base`."""

from __future__ import annotations

from stages.base import Batch, Stage, StageContext

__all__ = ["Batch", "Stage", "StageContext"]
