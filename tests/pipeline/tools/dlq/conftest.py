"""The dlq commands' unit tests talk to doubles, not a cluster: no preflight connection.

`pipeline.kafka.preflight.check_access` (one metadata request before any work) is tested
on its own and end to end; here it would wait 15 s for the fake ``broker:9092``.
"""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(autouse=True)
def _no_preflight(monkeypatch: pytest.MonkeyPatch) -> None:
    def reachable(*_: Any, **__: Any) -> None:
        return None

    monkeypatch.setattr("pipeline.kafka.preflight.check_access", reachable)
