"""Avro schemas for requests, results and dead letters, and the codec that speaks them."""

from __future__ import annotations

from pathlib import Path

SCHEMA_DIR = Path(__file__).parent

__all__ = ["SCHEMA_DIR"]
