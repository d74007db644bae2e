"""The GPU figures in one command: ``python -m load.gpu`` (``make gpu-check`` runs it).

    python -m load.gpu [--parts parity model decode kafka normalize copies host scheduling]
                       [--seconds 2] [--requests 4000] [--budget 300] [--model resnet50]

On one GPU machine, each part time-boxed so that the whole fits ``--budget`` seconds
(about 5 minutes), printing one table and writing load/results/gpu.md and gpu.json:

- ``parity``: the model (a real architecture from timm, else torchvision, random weights,
  traced to TorchScript here) in fp32 and fp16 on the GPU against fp32 on the CPU, and the
  whole GPU path (``gpu_decode_image`` → model) against the Pillow chain on top-1;
- ``model``: the model alone on preloaded device tensors, per batch size, fp32 and fp16;
- ``decode``: ``gpu_decode_image`` alone and GPU decode + model back to back (fp16);
- ``kafka``: on an embedded Tansu broker (``KP_TANSU``), kp-pipeline with GPU decode and
  the torch CUDA backend, 1 vs 2 instances, fp32 vs fp16, then the naive consumer on the
  same GPU;
- ``normalize``: the CuPy ``normalize_nchw`` kernel against its NumPy twin, 64 images;
- ``copies``: host→device copies pageable vs pinned, and copy/compute overlap;
- ``host``: the tiny model through ``kp-pipeline run`` on the machine's cores, with
  ``--workers`` 1, 2, 4, 8 where this tree's CLI has it (else one process);
- ``scheduling``: `load.scheduling`'s two-model runs on the GPU (a model calibrated to
  ~25 ms a batch there): the high-priority model's p50/p99 alone and under a 10x
  low-priority flood, without and with the device scheduler.

NVML samples GPU utilisation and memory during each timed run. A part that fails prints
its error in the table and the script goes on. Without a GPU it exits 2 saying "no GPU
found"; ``--cpu-dry-run`` runs the same code on the CPU with a small CNN to check the
plumbing (its figures mean nothing). Written for the GPU machines and NOT yet run on
one: no GPU was lent to this work.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from load import report
from load.report import Check

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("parity", "model", "decode", "kafka", "normalize", "copies", "host", "scheduling")
# Seconds each part needs at least to start; a part with less left is skipped, saying so.
NEEDS = {
    "parity": 20,
    "model": 20,
    "decode": 15,
    "kafka": 60,
    "normalize": 8,
    "copies": 10,
    "host": 40,
    "scheduling": 60,
}


@dataclass
class Figure:
    """One row of the table: what was measured, items/s, NVML busy and memory."""

    part: str
    variant: str
    requests: int
    seconds: float
    note: str = ""
    busy_pct: float | None = None
    busy_max_pct: float | None = None
    mem_mib: float | None = None
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Items per second (0 for rows that are not timed)."""
        return self.requests / self.seconds if self.seconds > 0 else 0.0


@dataclass
class PartResult:
    """A part's figures, or the error that stopped it, or why it was skipped."""

    name: str
    figures: list[Figure] = field(default_factory=list)
    error: str | None = None
    skipped: str | None = None
    seconds: float = 0.0


class Budget:
    """Seconds left for the whole script; parts ask before they start."""

    def __init__(self, total: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._end = clock() + total

    def left(self) -> float:
        """Seconds left (never negative)."""
        return max(0.0, self._end - self._clock())


def run_part(name: str, fn: Callable[[], Sequence[Any]], budget: Budget, need: float) -> PartResult:
    """Run one part if the budget allows; an exception becomes the part's error, not ours."""
    if budget.left() < need:
        return PartResult(name, skipped=f"time budget: {budget.left():.0f} s left, needs {need}")
    start = time.monotonic()
    print(f"-- {name} ({budget.left():.0f} s left)", flush=True)
    try:
        rows = list(fn())
    except Exception as e:
        traceback.print_exc()
        text = str(e).strip().splitlines()
        return PartResult(
            name,
            error=f"{type(e).__name__}: {text[0] if text else ''}"[:300],
            seconds=time.monotonic() - start,
        )
    figures = [_figure(name, r) for r in rows]
    for f in figures:
        print(f"   {f.variant:<58} {f.rate:>10,.1f}/s  {f.note}", flush=True)
    return PartResult(name, figures, seconds=time.monotonic() - start)


def _figure(part: str, m: Any) -> Figure:
    return Figure(
        part, m.variant, m.requests, m.seconds, m.note, m.busy_pct, m.busy_max_pct, m.mem_mib,
        dict(m.extra),
    )  # fmt: skip


def no_gpu_reason() -> str | None:
    """Why this machine cannot run the GPU figures, or None when torch sees a CUDA GPU."""
    try:
        import torch
    except ImportError as e:
        return f"torch does not import ({e})"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    return None


# -- the report --------------------------------------------------------------------------


def _best(parts: list[PartResult], part: str, prefix: str) -> Figure | None:
    rows = [f for p in parts if p.name == part for f in p.figures if f.variant.startswith(prefix)]
    return max(rows, key=lambda f: f.rate) if rows and max(f.rate for f in rows) > 0 else None


def checks(parts: list[PartResult]) -> tuple[list[Check], list[str]]:
    """The issue's targets from the figures, and a line for each that was not measured."""
    out: list[Check] = []
    missing: list[str] = []
    kp = _best(parts, "kafka", "kp-pipeline")
    b2b = _best(parts, "decode", "GPU decode + model")
    naive = _best(parts, "kafka", "naive consumer")
    cupy = _best(parts, "normalize", "normalize_nchw (CuPy")
    numpy = _best(parts, "normalize", "normalize_nchw (NumPy")

    def ratio(name: str, a: Figure | None, b: Figure | None, wanted: float) -> None:
        if a is None or b is None or b.rate == 0:
            missing.append(f"{name}: not measured")
        else:
            out.append(Check(name, a.rate / b.rate, wanted))

    ratio("kp-pipeline ÷ GPU decode + model back to back (best of each)", kp, b2b, 0.8)
    ratio("kp-pipeline ÷ naive consumer on the same GPU", kp, naive, 10.0)
    ratio("normalize_nchw CuPy kernel ÷ NumPy twin (64 images)", cupy, numpy, 10.0)
    if kp is None or kp.busy_pct is None:
        missing.append("GPU busy at saturation (NVML): not measured")
    else:
        out.append(Check("GPU busy during the best kp-pipeline run (NVML, %)", kp.busy_pct, 90.0))
    return out, missing


def _cell(v: float | None, fmt: str = "{:.0f}") -> str:
    return "—" if v is None else fmt.format(v)


def table(parts: list[PartResult]) -> list[str]:
    """The markdown table: every figure, and each failed or skipped part as a row."""
    lines = [
        "| part | variant | items | seconds | items/s | GPU busy % mean / max | GPU MiB peak "
        "| note |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for p in parts:
        if p.error is not None or p.skipped is not None:
            what = f"FAILED: {p.error}" if p.error is not None else f"skipped ({p.skipped})"
            lines.append(f"| {p.name} | {what} | | | | | | |")
            continue
        for f in p.figures:
            rate = f"{f.rate:,.1f}" if f.seconds > 0 else "—"
            busy = f"{_cell(f.busy_pct)} / {_cell(f.busy_max_pct)}"
            lines.append(
                f"| {p.name} | {f.variant} | {f.requests} | {f.seconds:.2f} | {rate} | {busy} "
                f"| {_cell(f.mem_mib)} | {f.note} |"
            )
    return lines


def markdown(parts: list[PartResult], gpu: str, m: dict[str, Any]) -> str:
    """The whole report: the table, the targets, the machine."""
    found, missing = checks(parts)
    lines = [f"### GPU figures on {gpu}", "", *table(parts), ""]
    lines += ["| target | measured | wanted | |", "|---|---:|---:|---|"]
    for c in found:
        lines.append(
            f"| {c.name} | {c.measured:.2f} | ≥ {c.wanted:g} | {'PASS' if c.passed else 'MISS'} |"
        )
    lines += [f"| {line} | | | |" for line in missing]
    lines += ["", report.machine_line(m), ""]
    return "\n".join(lines) + "\n"


def document(
    parts: list[PartResult], gpu: str, m: dict[str, Any], args: dict[str, Any]
) -> dict[str, Any]:
    """The JSON twin of the markdown."""
    found, missing = checks(parts)
    return {
        "gpu": gpu,
        "machine": m,
        "args": args,
        "parts": [
            {
                "name": p.name,
                "error": p.error,
                "skipped": p.skipped,
                "seconds": p.seconds,
                "figures": [{**asdict(f), "rate": f.rate} for f in p.figures],
            }
            for p in parts
        ],
        "checks": [{**asdict(c), "passed": c.passed} for c in found],
        "not_measured": missing,
    }


# -- the command -------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m load.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--seconds", type=float, default=2.0, help="per timed loop")
    p.add_argument("--requests", type=int, default=6000, help="images per kp-pipeline run")
    p.add_argument("--naive-requests", type=int, default=300)
    p.add_argument("--tiny-requests", type=int, default=100_000, help="host path, per run")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 128])
    p.add_argument("--kp-batch", type=int, default=64, help="kp-pipeline's max_batch_size")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--budget", type=float, default=300.0, help="seconds for the whole script")
    p.add_argument(
        "--scheduling-seconds", type=float, default=8.0, help="traffic per scheduling run"
    )
    p.add_argument("--model", default="resnet50", help="timm (or torchvision) model name")
    p.add_argument("--out", type=Path, default=ROOT / "load" / "results")
    p.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="run the same code on the CPU with a small CNN, to check the plumbing",
    )
    args = p.parse_args(argv)
    if args.cpu_dry_run and args.model == "resnet50":
        args.model = "small-cnn"
    if min(args.batches) < 1 or args.kp_batch < 1 or min(args.workers) < 1:
        p.error("batch sizes and worker counts must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Check for a GPU, run the parts within the budget, print and write the report."""
    args = parse_args(argv)
    device = "cpu" if args.cpu_dry_run else "cuda:0"
    if not args.cpu_dry_run:
        why = no_gpu_reason()
        if why is not None:
            print(f"load.gpu: no GPU found: {why}; nothing was measured", file=sys.stderr)
            return 2
    budget = Budget(args.budget)
    with tempfile.TemporaryDirectory(prefix="kp-gpu-") as tmp:
        parts, gpu = _run_all(args, device, Path(tmp), budget)
    m = report.machine()
    text = markdown(parts, gpu, m)
    doc = document(parts, gpu, m, {k: str(v) for k, v in vars(args).items()})
    stem = "gpu-dry-run" if args.cpu_dry_run else "gpu"
    report.save(args.out, stem, text, doc)
    print("\n" + text, end="")
    print(f"wrote {args.out / f'{stem}.md'} and {args.out / f'{stem}.json'}")
    return 0


def _run_all(
    args: argparse.Namespace, device: str, tmp: Path, budget: Budget
) -> tuple[list[PartResult], str]:
    """Set up (model, photos, broker, NVML) and run every asked part in order."""
    import torch

    from load import gpu_kafka as gk
    from load import gpu_measure as gm
    from pipeline.kafka.broker import EmbeddedBroker

    gpu = torch.cuda.get_device_name(0) if device != "cpu" else "no GPU (CPU dry run)"
    sampler, sampler_note = (None, "CPU dry run") if device == "cpu" else gm.GpuSampler.open(0)
    print(f"load.gpu on {gpu}; {sampler_note}; model {args.model}", flush=True)
    setup = gm.Setup(device, args.model, gm.build_model(args.model, tmp), tmp, gm.photos())
    setup.sampler = sampler
    s = args.seconds
    parts: list[PartResult] = []

    def part(name: str, fn: Callable[[], Sequence[Any]]) -> None:
        if name in args.parts:
            parts.append(run_part(name, fn, budget, NEEDS[name]))

    part("parity", lambda: gm.parity(setup))
    part("model", lambda: gm.model_alone(setup, args.batches, s))
    part("decode", lambda: gm.decode_alone_and_with_model(setup, args.batches[1:] or [1], s))
    broker_parts = {"kafka", "host", "scheduling"} & set(args.parts)
    broker = EmbeddedBroker().start() if broker_parts else None
    try:
        if broker is not None:
            setup.bootstrap = broker.bootstrap_servers
        part("kafka", lambda: _kafka(setup, args, budget))
        part("normalize", lambda: gm.normalize_kernel(setup, s))
        part("copies", lambda: gm.copies(setup, s))
        part(
            "host",
            lambda: gk.host_path(
                setup.bootstrap or "", tmp, args.tiny_requests, args.workers,
                min(90.0, budget.left() / (len(args.workers) + 1)),
            ),
        )  # fmt: skip
        part("scheduling", lambda: _scheduling(broker, device, tmp, args.scheduling_seconds))
    finally:
        if broker is not None:
            broker.stop()
    return parts, gpu


def _scheduling(broker: Any, device: str, tmp: Path, seconds: float) -> list[Any]:
    """`load.scheduling`'s four runs on ``device``; rows carry the watched p50/p99."""
    from load import gpu_measure as gm
    from load import scheduling

    rows = []
    # On the CPU (the dry run checks plumbing) the scheduled flood alone: every code path
    # of the part in a quarter of the time; its figures mean nothing there anyway.
    runs = scheduling.runs() if device != "cpu" else scheduling.runs()[2:3]
    for name, senders, scheduler in runs:
        f = scheduling.measure(broker, senders, scheduler, seconds, device, tmp)
        note = (
            f"watched p50/p99 {f['e2e_p50']:.1f}/{f['e2e_p99']:.1f} ms end to end, "
            f"{f['inside_p50']:.1f}/{f['inside_p99']:.1f} inside; {f['others']:.0f} others"
        )
        rows.append(gm.Measured(name, int(f["watched"]), 0.0, note, extra=f))
    return rows


def _kafka(setup: Any, args: argparse.Namespace, budget: Budget) -> list[Any]:
    """kp-pipeline in four settings, then the naive consumer, on one produced topic.

    Each run has its own time limit (a share of what is left), and a run that fails
    becomes a row saying so: the runs after it still happen.
    """
    from load import gpu_kafka as gk
    from load.gpu_measure import Measured

    topic = "gpu.requests"
    gk.produce_images(setup, topic, args.requests)

    def kp(instances: int, precision: str) -> Callable[[float], Any]:
        return lambda t: gk.kp_end_to_end(
            setup, topic, args.requests, instances, precision, args.kp_batch, t
        )

    runs: list[tuple[str, Callable[[float], Any]]] = [
        (f"kp-pipeline, {i} instance(s), {p}, batch ≤ {args.kp_batch}", kp(i, p))
        for i, p in ((1, "fp32"), (2, "fp32"), (1, "fp16"), (2, "fp16"))
    ]
    runs.append(
        ("naive consumer", lambda t: gk.naive_consumer(setup, topic, args.naive_requests, t))
    )
    rows = []
    for n, (label, run) in enumerate(runs):
        timeout = max(15.0, min(60.0, budget.left() / (len(runs) - n + 1)))
        try:
            rows.append(run(timeout))
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            rows.append(Measured(label, 0, 0.0, f"FAILED: {type(e).__name__}: {first}"))
    return rows


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
