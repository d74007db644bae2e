"""Preprocessing benchmark: images/s per path and batch size, preprocessing alone.

    python -m load.preprocess [--batches 1 8 32] [--seconds 2] [--out load/results/preprocess.md]

Inputs are the demo's requests: scikit-image's sample photos as ~35-72 KB JPEGs
(`pipeline.tools.samples.sample_jpegs`), repeated to fill each batch. Measured, each for
``--seconds`` after one warm-up batch, in one process:

- the full chain, encoded JPEG → FP32[3,224,224]: the CPU stages (Pillow decode and
  resize, NumPy crop, normalize, to_nchw) against ``dali_image`` (one DALI pipeline, on
  the CPU here), and ``dali_image`` on a GPU (nvJPEG) where one exists;
- the last step on uint8 crops [N,224,224,3]: ``normalize`` + ``to_nchw`` against the
  fused ``normalize_nchw`` (NumPy here, a CuPy kernel on a GPU).

Besides wall-clock images/s, each row gives the process's CPU milliseconds per image
(all threads): DALI decodes with two threads, the Pillow chain with one, so on a shared
machine the CPU cost is the fairer comparison. GPU rows say "not run" without a GPU.
Writes the markdown table to load/results/preprocess.md.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from itertools import cycle, islice
from pathlib import Path
from typing import Any

import numpy as np

from load import report
from pipeline.tools.samples import sample_jpegs
from stages.base import Batch, Stage, StageContext
from stages.preprocess.image import (
    CenterCrop,
    CenterCropParams,
    DecodeImage,
    DecodeImageParams,
    Normalize,
    NormalizeParams,
    Resize,
    ResizeParams,
    ToNCHW,
    ToNCHWParams,
)

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
RESIZE, CROP = 256, 224
CHAIN = "Full chain: JPEG bytes → FP32[3,224,224]"
LAST = "Last step on uint8 crops: normalize + HWC→CHW"
NO_GPU = "not run (no GPU)"


@dataclass
class Row(report.Row):
    """One path at one batch size; ``requests`` counts images, ``rate`` is images/s."""

    section: str = ""
    batch: int = 1
    cpu_seconds: float = 0.0

    @property
    def cpu_ms_per_image(self) -> float:
        """Process CPU time (all threads) per image, in milliseconds."""
        return 1e3 * self.cpu_seconds / self.requests if self.requests else 0.0


def measure(
    section: str, variant: str, batch: int, run: Callable[[], Any], seconds: float, note: str = ""
) -> Row:
    """Call ``run`` (one batch of ``batch`` images) for ``seconds`` after one warm-up call."""
    run()
    calls = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    while True:
        run()
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            break
    cpu = time.process_time() - cpu0
    return Row(variant, calls * batch, elapsed, note, section, batch, cpu)


def not_run(section: str, variant: str, batch: int) -> Row:
    """A row for a path that needs a GPU this machine does not have."""
    return Row(variant, 0, 0.0, NO_GPU, section, batch)


def _column(items: list[bytes]) -> np.ndarray[Any, Any]:
    col = np.empty((len(items), 1), dtype=object)
    for i, b in enumerate(items):
        col[i, 0] = b
    return col


def _chain(stages: list[Stage], *cols: Any) -> Callable[[], Any]:
    """One call runs the stages on the next of ``cols`` (taken in turn)."""
    turn = cycle(cols)

    def run() -> Any:
        col = next(turn)
        batch = Batch(list(range(len(col))), {"image": col})
        for stage in stages:
            batch = stage.process(batch)
        return batch.columns["image"]

    return run


def _batches(photos: list[bytes], batch: int) -> list[np.ndarray[Any, Any]]:
    """BYTES columns of ``batch`` photos, one starting at each photo, taken in turn.

    So every batch size sees the same mix of photos (batch 1 is not always the cat).
    """
    return [_column(list(islice(cycle(photos), k, k + batch))) for k in range(len(photos))]


def pillow_chain(photos: list[bytes], batch: int, seconds: float) -> Row:
    """decode_image → resize → center_crop → normalize → to_nchw (one thread)."""
    stages: list[Stage] = [
        DecodeImage(DecodeImageParams()),
        Resize(ResizeParams(size=RESIZE)),
        CenterCrop(CenterCropParams(size=CROP)),
        Normalize(NormalizeParams(mean=MEAN, std=STD)),
        ToNCHW(ToNCHWParams()),
    ]
    run = _chain(stages, *_batches(photos, batch))
    return measure(CHAIN, "Pillow/NumPy stages", batch, run, seconds, "1 thread")


def dali_chain(photos: list[bytes], batch: int, seconds: float, device: str = "cpu") -> Row:
    """``dali_image``, one DALI pipeline, on ``device``."""
    from stages.preprocess.image_dali import DaliImage, DaliImageParams

    stage = DaliImage(DaliImageParams(resize=RESIZE, crop=CROP, mean=MEAN, std=STD))
    stage.setup(StageContext("bench", device=device))
    name = f"dali_image ({'CPU' if device == 'cpu' else 'GPU, nvJPEG'})"
    chain = _chain([stage], *_batches(photos, batch))

    def run() -> None:
        chain()
        if device != "cpu":  # wait for the GPU, so the time is the work's
            import cupy

            cupy.cuda.Device().synchronize()

    try:
        note = f"{stage.p.num_threads} DALI threads" if device == "cpu" else ""
        return measure(CHAIN, name, batch, run, seconds, note)
    finally:
        stage.close()


def crops(photos: list[bytes], batch: int) -> np.ndarray[Any, Any]:
    """The photos decoded, resized and cropped: uint8 [batch, 224, 224, 3]."""
    stages: list[Stage] = [
        DecodeImage(DecodeImageParams()),
        Resize(ResizeParams(size=RESIZE)),
        CenterCrop(CenterCropParams(size=CROP)),
    ]
    return np.asarray(_chain(stages, _batches(photos, batch)[0])())


def separate_normalize(x: np.ndarray[Any, Any], seconds: float) -> Row:
    """``normalize`` then ``to_nchw``: cast, normalise in place, transposed copy."""
    stages: list[Stage] = [Normalize(NormalizeParams(mean=MEAN, std=STD)), ToNCHW(ToNCHWParams())]
    run = _chain(stages, x)
    return measure(LAST, "normalize + to_nchw", len(x), run, seconds)


def fused_normalize(x: np.ndarray[Any, Any], seconds: float, device: str = "cpu") -> Row:
    """``normalize_nchw``: the NumPy twin, or the CuPy kernel on ``cuda:0``."""
    from stages.preprocess.image_fused import NormalizeNCHW, NormalizeNCHWParams

    stage = NormalizeNCHW(NormalizeNCHWParams(mean=MEAN, std=STD))
    stage.setup(StageContext("bench", device=device))
    if device == "cpu":
        return measure(LAST, "normalize_nchw (NumPy)", len(x), _chain([stage], x), seconds)
    import cupy

    on_device = cupy.asarray(x)  # the kernel alone: input already on the GPU

    def run() -> None:
        stage.process(Batch(list(range(len(x))), {"image": on_device}))
        cupy.cuda.Device().synchronize()

    return measure(LAST, "normalize_nchw (CuPy kernel)", len(x), run, seconds, "input on GPU")


def _gpus() -> tuple[bool, bool]:
    """Whether DALI and CuPy each see a CUDA device."""
    dali = cupy_ok = False
    try:
        from nvidia.dali import backend

        dali = backend.GetCUDADeviceCount() > 0  # type: ignore[attr-defined]
    except Exception:  # not installed, or no driver
        dali = False
    try:
        import cupy

        cupy_ok = bool(cupy.cuda.is_available())
    except Exception:
        cupy_ok = False
    return dali and cupy_ok, cupy_ok


def image_rows(batches: list[int], seconds: float) -> list[Row]:
    """Every image path at every batch size, printing each row as it is measured."""
    photos = list(sample_jpegs().values())
    dali_gpu, cupy_gpu = _gpus()
    rows: list[Row] = []

    def add(row: Row) -> None:
        rows.append(row)
        print(f"{row.section[:10]}… {row.variant} @ {row.batch}: {_rate(row)}", flush=True)

    for b in batches:
        add(pillow_chain(photos, b, seconds))
        add(dali_chain(photos, b, seconds))
        gpu = dali_chain(photos, b, seconds, "cuda:0") if dali_gpu else None
        add(gpu or not_run(CHAIN, "dali_image (GPU, nvJPEG)", b))
    for b in batches:
        x = crops(photos, b)
        add(separate_normalize(x, seconds))
        add(fused_normalize(x, seconds))
        gpu = fused_normalize(x, seconds, "cuda:0") if cupy_gpu else None
        add(gpu or not_run(LAST, "normalize_nchw (CuPy kernel)", b))
    return rows


def _rate(row: Row) -> str:
    return f"{row.rate:,.0f}" if row.requests else "—"


def markdown(rows: list[Row], machine: str) -> str:
    """One table per section; ``× first`` is the rate over the section's first path."""
    lines: list[str] = []
    for section in dict.fromkeys(r.section for r in rows):
        mine = [r for r in rows if r.section == section]
        lines += [
            f"### {section}",
            "",
            "| path | batch | images | seconds | images/s | × first | CPU ms/image | note |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in mine:
            base = next(x for x in mine if x.batch == r.batch)
            ratio = f"{r.rate / base.rate:.2f}x" if r.requests and base.rate else "—"
            cpu = f"{r.cpu_ms_per_image:.2f}" if r.requests else "—"
            lines.append(
                f"| {r.variant} | {r.batch} | {r.requests} | {r.seconds:.2f} | {_rate(r)} | "
                f"{ratio} | {cpu} | {r.note} |"
            )
        lines.append("")
    lines += [
        machine,
        "",
        "Preprocessing alone, one process, no broker and no model. Ratios under ~1.2x are "
        "within this machine's noise.",
    ]
    return "\n".join(lines) + "\n"


def machine_line() -> str:
    """`report.machine_line`, with the image packages and without a broker."""
    m = report.machine()
    m["broker"] = "no broker (preprocessing alone)"
    for name in ("nvidia-dali-cuda120", "cupy-cuda12x", "scikit-image"):
        try:
            m["packages"][name] = version(name)
        except PackageNotFoundError:
            m["packages"][name] = "absent"
    return report.machine_line(m)


def main(argv: list[str] | None = None) -> int:
    """Measure, print the tables and write them to ``--out``."""
    ap = argparse.ArgumentParser(
        prog="python -m load.preprocess", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--seconds", type=float, default=2.0, help="per path and batch size")
    ap.add_argument("--out", type=Path, default=ROOT / "load" / "results" / "preprocess.md")
    ap.add_argument(
        "--images-only", action="store_true", help="skip the text and end-to-end sections"
    )
    args = ap.parse_args(argv)
    rows = image_rows(args.batches, args.seconds)
    text = markdown(rows, machine_line())
    if not args.images_only:
        from load import text as text_bench

        extra = text_bench.text_markdown(
            text_bench.tokens_per_second(),
            text_bench.padding_rows(),
            text_bench.image_demo_share(),
        )
        text = extra + "\n" + text
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
