"""load.gpu's CPU-side parts: arguments, the budget, failing parts, the report, no-GPU exit.

The measurements themselves need a GPU (make gpu-check); here the harness around them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from load import gpu
from load.gpu import Budget, Figure, PartResult
from load.gpu_measure import Measured, summarise

ROOT = Path(__file__).resolve().parents[2]


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@pytest.mark.skipif(_has_cuda(), reason="this machine has a GPU")
def test_without_a_gpu_the_command_says_so_and_exits_non_zero(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "load.gpu", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert out.returncode == 2
    assert "no GPU found" in out.stderr
    assert not list(tmp_path.iterdir())  # nothing written: no figures to show


def test_arguments_default_to_every_part_and_refuse_unknown_ones() -> None:
    args = gpu.parse_args([])
    assert args.parts == list(gpu.PARTS)
    assert args.model == "resnet50"
    assert gpu.parse_args(["--cpu-dry-run"]).model == "small-cnn"
    assert gpu.parse_args(["--parts", "model", "host"]).parts == ["model", "host"]
    with pytest.raises(SystemExit):
        gpu.parse_args(["--parts", "everything"])
    with pytest.raises(SystemExit):
        gpu.parse_args(["--workers", "0"])


def test_a_part_that_raises_becomes_its_error_and_the_next_one_runs() -> None:
    budget = Budget(100.0)

    def broken() -> list[Measured]:
        raise RuntimeError("CUDA error: out of memory\nmore detail")

    failed = gpu.run_part("model", broken, budget, 1)
    fine = gpu.run_part("copies", lambda: [Measured("H2D copy", 64, 0.5, "x")], budget, 1)
    assert failed.error == "RuntimeError: CUDA error: out of memory"
    assert failed.figures == []
    assert fine.error is None
    assert [(f.part, f.variant, f.rate) for f in fine.figures] == [("copies", "H2D copy", 128.0)]


def test_a_part_is_skipped_when_the_budget_has_less_than_it_needs() -> None:
    now = [0.0]
    budget = Budget(60.0, clock=lambda: now[0])
    now[0] = 50.0
    ran: list[str] = []
    result = gpu.run_part("kafka", lambda: ran.append("x") or [], budget, 30)
    assert ran == []
    assert result.skipped == "time budget: 10 s left, needs 30"
    now[0] = 100.0
    assert budget.left() == 0.0


def _parts() -> list[PartResult]:
    kp = Figure(
        "kafka", "kp-pipeline, 1 instance(s), fp16, batch ≤ 64", 4000, 2.0, "", 93.0, 99.0, 5000.0
    )
    kp2 = Figure("kafka", "kp-pipeline, 2 instance(s), fp16, batch ≤ 64", 4000, 4.0)
    naive = Figure("kafka", "naive consumer (same GPU, fp32, batch 1)", 300, 3.0)
    b2b = Figure("decode", "GPU decode + model fp16 back to back, batch 64", 5000, 2.0)
    alone = Figure("decode", "GPU decode alone, batch 64", 9000, 1.0)
    return [
        PartResult("decode", [alone, b2b]),
        PartResult("kafka", [kp, kp2, naive]),
        PartResult("normalize", error="ImportError: no cupy"),
        PartResult("host", skipped="time budget: 5 s left, needs 40"),
    ]


def test_checks_compare_the_best_rows_and_name_what_was_not_measured() -> None:
    found, missing = gpu.checks(_parts())
    by_name = {c.name: c for c in found}
    e2e = by_name["kp-pipeline ÷ GPU decode + model back to back (best of each)"]
    assert e2e.measured == pytest.approx(2000 / 2500)
    assert e2e.passed  # 0.8 ≥ 0.8
    assert by_name["kp-pipeline ÷ naive consumer on the same GPU"].measured == pytest.approx(20.0)
    assert by_name["GPU busy during the best kp-pipeline run (NVML, %)"].measured == 93.0
    assert missing == ["normalize_nchw CuPy kernel ÷ NumPy twin (64 images): not measured"]


def test_the_table_shows_figures_nvml_errors_and_skips() -> None:
    text = gpu.markdown(_parts(), "NVIDIA H100 80GB HBM3", _machine())
    assert "### GPU figures on NVIDIA H100 80GB HBM3" in text
    assert (
        "| kafka | kp-pipeline, 1 instance(s), fp16, batch ≤ 64 | 4000 | 2.00 | 2,000.0 "
        "| 93 / 99 | 5000 |" in text
    )
    assert (
        "| kafka | naive consumer (same GPU, fp32, batch 1) | 300 | 3.00 | 100.0 | — / — | — |"
        in text
    )
    assert "| normalize | FAILED: ImportError: no cupy |" in text
    assert "| host | skipped (time budget: 5 s left, needs 40) |" in text
    assert "| kp-pipeline ÷ naive consumer on the same GPU | 20.00 | ≥ 10 | PASS |" in text
    assert "| normalize_nchw CuPy kernel ÷ NumPy twin (64 images): not measured |" in text


def test_the_json_holds_every_part_and_the_checks() -> None:
    doc = gpu.document(_parts(), "H100", _machine(), {"budget": "300"})
    again = json.loads(json.dumps(doc))
    assert [p["name"] for p in again["parts"]] == ["decode", "kafka", "normalize", "host"]
    assert again["parts"][1]["figures"][0]["rate"] == 2000.0
    assert again["parts"][1]["figures"][0]["busy_pct"] == 93.0
    assert again["parts"][2]["error"] == "ImportError: no cupy"
    assert {c["name"]: c["passed"] for c in again["checks"]}[
        "GPU busy during the best kp-pipeline run (NVML, %)"
    ]


def test_nvml_samples_summarise_to_mean_max_and_peak_memory() -> None:
    assert summarise([]) == (None, None, None)
    assert summarise([(80.0, 1000.0), (100.0, 1500.0), (90.0, 1200.0)]) == (90.0, 100.0, 1500.0)


def _machine() -> dict[str, object]:
    return {
        "nproc": 16,
        "cpu": "Xeon",
        "memory_gib": 128.0,
        "python": "3.12.3",
        "broker": "Tansu",
        "packages": {"torch": "2.11.0+cu130"},
        "date": "2026-12-06 12:00 UTC",
    }
