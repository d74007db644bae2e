"""load.tabular's plumbing on a real broker: every variant serves every request.

The figures mean nothing at this size; the benchmark must stay runnable.
"""

from __future__ import annotations

import pytest

from load import tabular

pytestmark = pytest.mark.e2e


def test_every_variant_serves_every_request(capsys: pytest.CaptureFixture[str]) -> None:
    if not tabular.ARTIFACT.exists():
        pytest.fail(f"{tabular.ARTIFACT} missing: run `make models`")
    assert tabular.main(["--requests", "3000", "--batch", "64"]) == 0
    out = capsys.readouterr().out
    for variant in (
        "kp-pipeline, row form",
        "Kafka pass-through of the row form",
        "kp-pipeline, named form",
        "XGBoost alone, predict_proba, batch 64",
    ):
        assert f"| {variant}" in out, out
