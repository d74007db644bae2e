"""kp-pipeline's engine: config, consumer loop, batcher, offset tracker, producer, CLI."""

from __future__ import annotations

__version__ = "0.1.0"
