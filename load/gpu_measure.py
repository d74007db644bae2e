"""The GPU measurements of `load.gpu` (its Kafka ones are in `load.gpu_kafka`).

Each part is one function that returns rows; the harness (budget, errors, report) is
`load.gpu`.

Each builds what it needs at run time (the model from timm or torchvision with random
weights, traced to TorchScript; the tiny MLP as ONNX; topologies as YAML in a temporary
folder), so the GPU machine needs nothing from ``models/``. Stages and backends are named
by import string, because the project is not pip-installed there (no entry points).

Written for the GPU machines (H100/H200, torch 2.11+cu130, torchvision 0.26, timm, CuPy
14, nvidia-ml-py); NOT yet run on one (no GPU was lent to this work). On the CPU, with
``--cpu-dry-run``, the same code runs with a small CNN to check its plumbing.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from stages.base import Batch, StageContext

__all__ = [
    "GPU_STAGE",
    "MEAN",
    "PARTITIONS",
    "STD",
    "GpuSampler",
    "Measured",
    "Setup",
    "build_model",
    "copies",
    "decode_alone_and_with_model",
    "decoder_for",
    "model_alone",
    "normalize_kernel",
    "parity",
    "photos",
    "sampled",
    "summarise",
]

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
PARTITIONS = 4
GPU_STAGE = "stages.preprocess.image_gpu:GpuDecodeImage"


@dataclass
class Measured:
    """One figure: ``requests`` items in ``seconds``, with NVML samples where taken."""

    variant: str
    requests: int
    seconds: float
    note: str = ""
    busy_pct: float | None = None  # mean NVML GPU utilisation during the run
    busy_max_pct: float | None = None
    mem_mib: float | None = None  # peak NVML memory used during the run
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class Setup:
    """What every part shares: device, the traced model, the photos, a temporary folder."""

    device: str
    model_name: str
    artifact: Path
    tmp: Path
    photos: list[bytes]
    bootstrap: str | None = None
    sampler: GpuSampler | None = None


# -- inputs ------------------------------------------------------------------------------


def photos(n_synthetic: int = 8) -> list[bytes]:
    """The demo's sample photos where scikit-image is installed, else synthetic JPEGs.

    Synthetic ones are 640x480 pictures with gradients, discs and noise, saved at
    quality 90 (~60-120 KB, near the demo's ~57 KB photos); the GPU machines have no
    scikit-image.
    """
    try:
        from pipeline.tools.samples import sample_jpegs

        return list(sample_jpegs().values())
    except Exception:  # no scikit-image there
        pass
    out = []
    rng = np.random.default_rng(20261206)
    yy, xx = np.mgrid[0:480, 0:640].astype(np.float32)
    for i in range(n_synthetic):
        r = 127 + 100 * np.sin(xx / (9 + i)) * np.cos(yy / (13 + i))
        g = 255 * (xx + 40 * i) / 900
        b = np.where((xx - 320 - 20 * i) ** 2 + (yy - 240) ** 2 < (90 + 10 * i) ** 2, 210, 40)
        img = np.clip(np.stack([r, g, b], -1) + rng.normal(0, 6, (480, 640, 3)), 0, 255)
        buf = io.BytesIO()
        Image.fromarray(img.astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def build_model(name: str, out_dir: Path) -> Path:
    """``name`` from timm (else torchvision) with random weights, traced to TorchScript.

    ``small-cnn`` is a few layers of the same shape in and out, for dry runs on a CPU.
    """
    import torch

    torch.manual_seed(0)
    module: Any
    if name == "small-cnn":
        module = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, stride=4, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(16, 1000),
        )
    else:
        try:
            import timm

            module = timm.create_model(name, pretrained=False, num_classes=1000)
        except ImportError:
            import torchvision.models

            module = getattr(torchvision.models, name)(weights=None)
    module.eval()
    with torch.inference_mode():
        traced = torch.jit.trace(  # type: ignore[no-untyped-call]
            module, torch.randn(1, 3, 224, 224), check_trace=False
        )
    path = out_dir / f"{name}.pt"
    traced.save(str(path))
    return path


# -- NVML --------------------------------------------------------------------------------


class GpuSampler:
    """GPU utilisation and memory from NVML, sampled on a thread while a run lasts.

    NVML's utilisation is the share of its last sample period (1/6 s to 1 s by GPU) in
    which a kernel ran; sampled every 0.1 s and averaged over the run. The device is
    matched by PCI bus id (NVML ignores CUDA_VISIBLE_DEVICES and orders GPUs its own way).
    """

    def __init__(self, handle: Any, nvml: Any, interval: float = 0.1) -> None:
        self._h, self._nvml, self._interval = handle, nvml, interval
        self._samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def open(cls, torch_index: int = 0) -> tuple[GpuSampler | None, str]:
        """A sampler for torch's device ``torch_index``, or None and why not."""
        try:
            import pynvml  # type: ignore[import-not-found]

            from pipeline.observability.metrics import cuda_bus_ids

            pynvml.nvmlInit()
            bus = cuda_bus_ids()[torch_index]  # the pipeline's own matching, by PCI bus id
            handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus.encode())
            return cls(handle, pynvml), f"NVML device at PCI {bus}"
        except Exception as e:  # no nvidia-ml-py, or NVML refusing
            return None, f"NVML not available: {type(e).__name__}: {e}"

    @contextmanager
    def sampling(self, into: Measured | None = None) -> Iterator[None]:
        """Sample while the body runs; write mean/max busy and peak memory into ``into``."""
        self.start()
        try:
            yield
        finally:
            self.stop(into)

    def start(self) -> None:
        """Start sampling on a thread (forgetting earlier samples and any earlier thread)."""
        self.stop()
        self._samples = []
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
        self._thread.start()

    def stop(self, into: Measured | None = None) -> None:
        """Stop sampling; write the summary into ``into``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if into is not None:
            into.busy_pct, into.busy_max_pct, into.mem_mib = summarise(self._samples)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                util = self._nvml.nvmlDeviceGetUtilizationRates(self._h).gpu
                mem = self._nvml.nvmlDeviceGetMemoryInfo(self._h).used / 2**20
            except Exception:  # a failed read loses one sample, not the run
                continue
            self._samples.append((float(util), float(mem)))


def summarise(
    samples: list[tuple[float, float]],
) -> tuple[float | None, float | None, float | None]:
    """(mean busy %, max busy %, peak memory MiB) of NVML samples; None without samples."""
    if not samples:
        return None, None, None
    busy = [s[0] for s in samples]
    return sum(busy) / len(busy), max(busy), max(s[1] for s in samples)


@contextmanager
def sampled(setup: Setup, row: Measured) -> Iterator[None]:
    if setup.sampler is None:
        yield
    else:
        with setup.sampler.sampling(row):
            yield


# -- the parts ---------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _timed(fn: Callable[[], int], seconds: float, device: str) -> tuple[int, float]:
    """Run ``fn`` (returns items done) once to warm up, then for ``seconds``; (items, s)."""
    fn()
    _sync(device)
    done, start = 0, time.monotonic()
    while time.monotonic() - start < seconds:
        done += fn()
    _sync(device)
    return done, time.monotonic() - start


def _backend(setup: Setup, precision: str) -> Any:
    from backends.base import ModelSpec
    from backends.torch_runtime import TorchBackend

    backend = TorchBackend()
    options = {
        "precision": precision,
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [3, 224, 224]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [1000]}],
    }
    backend.load(ModelSpec("gpu-image", setup.artifact, options), setup.device)
    return backend


def _stage(setup: Setup, stream: Any = None) -> Any:
    """``gpu_decode_image`` as the runtime sets it up: on the backend's stream, if given."""
    from stages.preprocess.image_gpu import GpuDecodeImage, GpuDecodeImageParams

    params = GpuDecodeImageParams(
        resize=256, crop=224, mean=MEAN, std=STD, decoder=decoder_for(setup.device)
    )
    stage = GpuDecodeImage(params)
    stage.setup(StageContext("gpu-image", device=setup.device, stream=stream))
    return stage


def decoder_for(device: str) -> Literal["nvjpeg", "pillow"]:
    """NvJPEG on a GPU; Pillow in a CPU dry run (torchvision does not load with CPU torch)."""
    return "pillow" if device == "cpu" else "nvjpeg"


def _column(items: list[bytes]) -> np.ndarray[Any, Any]:
    col = np.empty((len(items), 1), dtype=object)
    for i, b in enumerate(items):
        col[i, 0] = b
    return col


def _cycle(items: list[bytes], n: int) -> list[bytes]:
    return [items[i % len(items)] for i in range(n)]


def parity(setup: Setup) -> list[Measured]:
    """The model on the device (fp32, fp16) against the same model on the CPU (fp32).

    Inputs: the photos through ``gpu_decode_image`` (for the device) and through the
    Pillow chain (for the CPU), so the row also says how often the whole GPU path agrees
    with the CPU path on top-1.
    """
    import torch

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

    col = _column(setup.photos)
    cpu_batch = Batch(list(range(len(setup.photos))), {"image": col})
    for s in (
        DecodeImage(DecodeImageParams()),
        Resize(ResizeParams(size=256)),
        CenterCrop(CenterCropParams(size=224)),
        Normalize(NormalizeParams(mean=MEAN, std=STD)),
        ToNCHW(ToNCHWParams()),
    ):
        cpu_batch = s.process(cpu_batch)
    x_cpu = np.asarray(cpu_batch.columns["image"])
    x_dev = _stage(setup).process(Batch(list(range(len(setup.photos))), {"image": col}))
    x_dev = x_dev.columns["image"]
    cpu_model = torch.jit.load(  # type: ignore[no-untyped-call]
        str(setup.artifact), map_location="cpu"
    ).eval()
    with torch.inference_mode():
        ref = cpu_model(torch.from_numpy(x_cpu)).numpy()
        ref_same_input = cpu_model(torch.as_tensor(x_dev).cpu()).numpy()
    rows = []
    for precision in ("fp32", "fp16"):
        backend = _backend(setup, precision)
        try:
            same = backend.infer({"input": x_cpu})["logits"]  # same pixels: the model alone
            whole = backend.infer({"input": x_dev})["logits"]  # GPU decode → model
        finally:
            backend.unload()
        rows.append(
            Measured(
                f"{setup.model_name} {precision} on {setup.device} vs fp32 on CPU",
                len(ref),
                0.0,
                f"same input: max abs Δlogit {np.abs(same - ref).max():.2e}, top-1 "
                f"{int((same.argmax(1) == ref.argmax(1)).sum())}/{len(ref)}; GPU decode chain "
                f"vs Pillow chain: top-1 {int((whole.argmax(1) == ref.argmax(1)).sum())}/"
                f"{len(ref)}, decode-only Δ (CPU model) "
                f"{np.abs(ref_same_input - ref).max():.2e}",
                extra={"max_abs_logit": float(np.abs(same - ref).max())},
            )
        )
    return rows


def model_alone(setup: Setup, batches: list[int], seconds: float) -> list[Measured]:
    """backend.infer on a preloaded device tensor (no host input copy), fp32 and fp16."""
    import torch

    rows = []
    for precision in ("fp32", "fp16"):
        backend = _backend(setup, precision)
        try:
            for b in batches:
                x = torch.randn((b, 3, 224, 224), device=setup.device)
                _sync(setup.device)  # made on the default stream; the backend reads on its own

                def infer(x: Any = x, b: int = b, backend: Any = backend) -> int:
                    backend.infer({"input": x})
                    return b

                row = Measured(f"model alone, {precision}, batch {b}", 0, 0.0, "device tensors")
                with sampled(setup, row):
                    row.requests, row.seconds = _timed(infer, seconds, setup.device)
                rows.append(row)
        finally:
            backend.unload()
    return rows


def decode_alone_and_with_model(setup: Setup, batches: list[int], seconds: float) -> list[Measured]:
    """gpu_decode_image alone, then decode + model back to back in one thread (fp16)."""
    backend = _backend(setup, "fp16")
    stage = _stage(setup, backend.stream)  # one stream for both, as in kp-pipeline
    rows = []
    try:
        for b in batches:
            col = _column(_cycle(setup.photos, b))

            def decode(col: Any = col, b: int = b) -> int:
                stage.process(Batch(list(range(b)), {"image": col}))
                return b

            def both(col: Any = col, b: int = b) -> int:
                out = stage.process(Batch(list(range(b)), {"image": col}))
                backend.infer({"input": out.columns["image"]})
                return b

            pair = (
                (f"GPU decode alone, batch {b}", decode),
                (f"GPU decode + model fp16 back to back, batch {b}", both),
            )
            for label, fn in pair:
                row = Measured(label, 0, 0.0)
                with sampled(setup, row):
                    row.requests, row.seconds = _timed(fn, seconds, setup.device)
                rows.append(row)
    finally:
        backend.unload()
    return rows


def normalize_kernel(setup: Setup, seconds: float) -> list[Measured]:
    """``normalize_nchw``: the CuPy kernel (input on the GPU) against its NumPy twin, 64 images."""
    from load.preprocess import crops, fused_normalize

    x = crops(setup.photos, 64)
    rows = []
    for device in ["cpu"] + ([setup.device] if setup.device != "cpu" else []):
        r = fused_normalize(x, seconds, device)
        rows.append(Measured(f"{r.variant}, batch 64", r.requests, r.seconds, r.note))
    return rows


def copies(setup: Setup, seconds: float) -> list[Measured]:
    """Host→device copies of a batch of 64 FP32 images, pageable vs pinned; then overlap.

    Overlap: the same copies on one stream while the model (fp16, batch 64) computes on
    another, against the two one after the other; ``overlap`` is the share of the shorter
    one hidden (1 = fully hidden).
    """
    import torch

    dev = torch.device(setup.device)
    shape = (64, 3, 224, 224)
    pageable = torch.randn(shape)
    pinned = pageable.pin_memory() if dev.type == "cuda" else pageable
    target = torch.empty(shape, device=dev)
    mib = pageable.numel() * 4 / 2**20
    rows = []
    for label, src in (("pageable", pageable), ("pinned", pinned)):

        def copy(src: Any = src) -> int:
            target.copy_(src, non_blocking=True)
            return 64

        n, s = _timed(copy, seconds, setup.device)
        rows.append(
            Measured(f"H2D copy, {label}, 64 images", n, s, f"{mib * n / 64 / s / 1024:.1f} GiB/s")
        )
    backend = _backend(setup, "fp16")
    try:
        x = torch.randn(shape, device=dev)
        _sync(setup.device)
        copy_stream: Any = None
        if dev.type == "cuda":
            copy_stream = torch.cuda.Stream(dev)  # type: ignore[no-untyped-call]

        def compute() -> int:
            backend.infer({"input": x})
            return 64

        def copy_only() -> int:
            target.copy_(pinned, non_blocking=True)
            return 64

        def overlapped() -> int:
            if copy_stream is not None:
                with torch.cuda.stream(copy_stream):
                    target.copy_(pinned, non_blocking=True)
            else:
                target.copy_(pinned)
            backend.infer({"input": x})
            if copy_stream is not None:
                copy_stream.synchronize()
            return 64

        nc, sc = _timed(compute, seconds, setup.device)
        nx, sx = _timed(copy_only, seconds, setup.device)
        no, so = _timed(overlapped, seconds, setup.device)
        per_c, per_x, per_o = sc / nc * 64, sx / nx * 64, so / no * 64
        hidden = (per_c + per_x - per_o) / min(per_c, per_x)
        rows.append(
            Measured(
                "copy (pinned, own stream) + model fp16, batch 64",
                no,
                so,
                f"per batch: model {per_c * 1e3:.2f} ms, copy {per_x * 1e3:.2f} ms, together "
                f"{per_o * 1e3:.2f} ms: overlap {hidden:.2f}",
                extra={"overlap": hidden},
            )
        )
    finally:
        backend.unload()
    return rows
