"""The tabular demo on the real broker: XGBoost and scikit-learn answer as their libraries.

``kp-pipeline demo topology-tabular.yaml`` as the README runs it: its own broker, no
``backend:`` nor ``inputs:`` in the topology (chosen from each artifact, taken from each
model), every row of the breast-cancer data sent to both versions with its 30 features
by name, and one request with a misspelt feature. The demo itself compares every answer
with the library's own ``predict_proba``/``predict`` on the same rows and fails if any
differs; the dead letter names the feature that is missing and the one that is not known.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from e2e.kit import MODELS, ROOT


def test_the_tabular_demo_answers_every_row_as_the_libraries_do() -> None:
    for file in ("breast_cancer_xgb.ubj", "breast_cancer_hgb.skops"):
        if not (MODELS / file).exists():
            pytest.fail(f"models/{file} missing: run `make models`")
    command = [sys.executable, "-m", "pipeline.cli", "demo", str(ROOT / "topology-tabular.yaml")]
    done = subprocess.run(
        [*command, "--requests", "569"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "produced 1138 row requests (569 rows × each version)" in out
    lines = {
        line.split()[0]: line for line in out.splitlines() if line[:8] in ("xgboost ", "sklearn ")
    }
    for version in ("xgboost", "sklearn"):
        assert " 569 " in lines[version], lines
        assert "the library's own predict" in lines[version]
    assert (
        "dead letter: demo-misspelt → kp.tabular-dead-letters: bad_tensor: model "
        "'breast-cancer': missing ['mean radius']; unexpected ['mean radios'] (it takes 30 "
        "inputs" in out
    )
    assert "1138 results, 1 dead letter" in out
    assert "committed every offset it consumed: True" in out
    # Every client closed before the embedded broker stopped: none left retrying it.
    assert "Connection refused" not in done.stderr, done.stderr[-2000:]
