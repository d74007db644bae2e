"""load.tls runs each path it compares on a small backlog (the figures come from full runs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from load.certs import make_pki
from load.tls import MODES, measure

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("mode", MODES)
def test_each_path_serves_its_backlog(tmp_path: Path, mode: str) -> None:
    assert measure(mode, 2000, make_pki(tmp_path)) > 0
