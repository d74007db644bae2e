"""load.gpu's whole plumbing, on the CPU: ``--cpu-dry-run`` through a real Tansu broker.

No GPU exists on the project's machines, so this is what keeps the GPU script runnable
between the times it is run on one: every part must run without an error row, and
kp-pipeline (gpu_decode_image with Pillow, the torch backend) must serve every request.
The figures themselves mean nothing here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from load import gpu

pytestmark = pytest.mark.e2e


def test_the_cpu_dry_run_runs_every_part_without_an_error(tmp_path: Path) -> None:
    rc = gpu.main(
        [
            "--cpu-dry-run",
            "--seconds", "0.2",
            "--requests", "40",
            "--naive-requests", "5",
            "--tiny-requests", "2000",
            "--workers", "1",
            "--batches", "1", "4",
            "--kp-batch", "8",
            "--scheduling-seconds", "1",
            "--out", str(tmp_path),
        ]
    )  # fmt: skip
    assert rc == 0
    doc = json.loads((tmp_path / "gpu-dry-run.json").read_text())
    assert [(p["name"], p["error"], p["skipped"]) for p in doc["parts"]] == [
        (name, None, None) for name in gpu.PARTS
    ]
    kafka = {f["variant"]: f for p in doc["parts"] if p["name"] == "kafka" for f in p["figures"]}
    kp = [f for v, f in kafka.items() if v.startswith("kp-pipeline")]
    assert len(kp) == 4
    assert all(f["requests"] == 40 and f["rate"] > 0 and not f["note"] for f in kp)
    assert kafka["naive consumer (same GPU, fp32, batch 1)"]["requests"] == 5
    host = next(p for p in doc["parts"] if p["name"] == "host")["figures"]
    assert [f["requests"] for f in host] == [2000]
    scheduling = next(p for p in doc["parts"] if p["name"] == "scheduling")["figures"]
    assert [f["variant"] for f in scheduling] == ["10x low flood, scheduler"]
    assert all(f["requests"] == 20 for f in scheduling)
    assert all(f["extra"]["e2e_p99"] > 0 for f in scheduling)
    assert "### GPU figures on no GPU (CPU dry run)" in (tmp_path / "gpu-dry-run.md").read_text()
