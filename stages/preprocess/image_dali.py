"""The whole image chain as ONE DALI pipeline: decode → resize → centre crop → normalize.

`DaliImage` (``dali_image``) replaces ``[decode_image, resize, center_crop, normalize,
to_nchw]`` with the same numbers: DALI runs such a chain fused and batched, and on a GPU
decodes JPEG with nvJPEG (``decoders.image(device="mixed")``) and keeps the pixels there.

Geometry is decided on the host exactly as the CPU stages decide it: each image's size
comes from its header (Pillow reads it without decoding), `Resize.target` gives the resized
size, fed to DALI per sample, and the crop is placed with ``rounding="truncate"`` (the CPU
stage's ``(h - crop) // 2``). Images too small for the crop are ``image_too_small``.

Tolerance against the CPU chain, in levels of the 0..255 image (``levels * scale / std``
in the output), tested in tests/stages/test_image_dali.py on the demo photos and random
images; measured figures in brackets:

- decoding is bit-exact: both use libjpeg-turbo, and grey, palette, RGBA and CMYK images
  become the same RGB. ``nearest`` is exact except where a sample falls exactly between
  two source pixels (``(i + 0.5) * in / out`` an integer): Pillow computes that position
  in double, DALI in float, and the tie goes to the neighbouring row or column.
- ``bilinear``: within 1 level, mean ≤ 0.25 (0.15). Not zero because Pillow filters in
  fixed point and rounds to uint8 between its horizontal and vertical passes, DALI keeps
  float. Except the outermost 2 pixels of a downscaled image, seen only when the crop
  reaches the resized edge: Pillow renormalises the filter cut by the edge, DALI repeats
  the edge pixel (up to 11 levels on photos at resize = crop, 12 on noise).
- ``bicubic``, ``lanczos``: max ≤ 24 (14), at most 1 % of values off by more than one
  level (0.23 %), mean ≤ 0.25 (0.17), on photos. These filters overshoot and Pillow clips
  its uint8 intermediate where DALI does not; on random noise they differ by up to ~40.

Bad input never fails the batch. A header that Pillow cannot read, a format DALI does not
decode (GIF, ...) and an empty payload are ``bad_image``; more than ``max_pixels`` (read
from the header) is ``image_too_large``, as in ``decode_image``. A decode error inside
DALI (a truncated file, say) fails the whole run, so the run is split in halves until the
bad images are isolated; DALI declares a pipeline invalid after an error, so it is
rebuilt (a few ms on the CPU) before the next run.

GPU (``cuda:N``): written against DALI's documentation and NOT run: DALI's GPU operators
cannot run on any machine available to the project. The output is a CuPy array over
DALI's device buffer (DLPack, no host copy), ordered on the instance's preprocess stream
(``Pipeline.run`` is given it, and the array is taken inside it): the instance's
inference stream waits on the event recorded there after the batch's stages, never the
host (`backends.streams`).
"""

from __future__ import annotations

import importlib
import io
import re
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
from PIL import Image
from pydantic import Field

from schemas.devices import GPU_EXTRAS, cuda_major, gpu_extra_for, parse_device
from schemas.errors import GraphError, KpError
from stages.base import Batch, StageContext, StageParams
from stages.preprocess.image import ImageChainParams, ImageChainStage, unreadable
from stages.preprocess.image_fused import cupy_stream, stream_handle

__all__ = ["DaliImage", "DaliImageParams"]

_INTERP = {
    "nearest": "INTERP_NN",
    "bilinear": "INTERP_LINEAR",
    "bicubic": "INTERP_CUBIC",
    "lanczos": "INTERP_LANCZOS3",
}
# Pillow's names for the formats nvImageCodec decodes (MPO: camera JPEGs with extra frames).
_DECODABLE = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000"})
_Failures = dict[int, tuple[str, str]]


class DaliImageParams(ImageChainParams):
    """The CPU chain's parameters in one place: decode, resize, crop, normalize, layout."""

    max_batch_size: int = Field(64, ge=1, description="DALI's batch; larger batches are split.")
    num_threads: int = Field(2, ge=1, description="DALI's CPU worker threads.")


class DaliImage(ImageChainStage):
    """Encoded images (BYTES[1]) in, a normalized FP32/FP16 batch out, in one DALI run."""

    Params: ClassVar[type[StageParams]] = DaliImageParams
    p: DaliImageParams
    name = "dali_image"

    def __init__(self, params: DaliImageParams) -> None:
        super().__init__(params)
        self._gpu: int | None = None  # CUDA device index, None on the CPU
        self._stream: int | None = None
        self._pipe: Any = None

    @property
    def leaves_device_arrays(self) -> bool:
        """On CUDA the output is a CuPy array: only stages that take those may follow."""
        return self._gpu is not None

    def setup(self, ctx: StageContext) -> None:
        """Pick the device from the context and build the pipeline once."""
        try:
            kind, index = parse_device(ctx.device)
        except KpError as e:
            raise GraphError(f"{self.name}: {e}") from None
        dali = _dali()
        if kind == "auto":
            kind = "cuda" if dali.backend.GetCUDADeviceCount() > 0 else "cpu"
        self._gpu = None if kind == "cpu" else (index or 0)
        self._stream = None if self._gpu is None else stream_handle(ctx.stream)
        try:
            self._pipe = self._build()
        except RuntimeError as e:  # no CUDA, a device that does not exist, ...
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise GraphError(f"{self.name}: cannot build DALI on {ctx.device}: {first}") from None

    def close(self) -> None:
        """Drop the pipeline (DALI shuts it down when the last reference goes)."""
        self._pipe = None

    def process(self, batch: Batch) -> Batch:
        """Check headers, run DALI in chunks of ``max_batch_size``, reject what fails."""
        if self._pipe is None:  # not set up (or closed): the CPU, or the device set up last
            self._pipe = self._build()
        col = batch.columns[self.p.input]
        failures: _Failures = {}
        data: dict[int, tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]] = {}
        for i in range(len(batch)):
            raw = col[i]
            blob = raw.reshape(-1)[0] if isinstance(raw, np.ndarray) else raw
            try:
                data[i] = (np.frombuffer(blob, np.uint8), self._size_for(blob))
            except _RefusedError as e:
                failures[i] = (e.reason, str(e))
        pieces: list[Any] = []
        rows = list(data)
        for start in range(0, len(rows), self.p.max_batch_size):
            done, bad = self._run_isolating(rows[start : start + self.p.max_batch_size], data)
            pieces += done
            failures.update(bad)
        columns = {k: v for k, v in batch.columns.items() if k != self.p.input}
        out = batch.with_columns(columns).reject(failures)
        out.columns[self.out] = self._concatenate(pieces)
        return out

    def _size_for(self, blob: Any) -> np.ndarray[Any, Any]:
        """The resized (height, width) for DALI, from the header; refuse what cannot go."""
        w, h = _header_size(blob, self.p.max_pixels)
        th, tw = self._geometry.target(h, w)
        ch, cw = self.crop_hw
        if th < ch or tw < cw:
            raise _RefusedError("image_too_small", f"{tw}x{th} is smaller than the {cw}x{ch} crop")
        return np.array([th, tw], np.float32)

    def _run_isolating(
        self, rows: list[int], data: Mapping[int, tuple[Any, Any]]
    ) -> tuple[list[Any], _Failures]:
        """Run ``rows``; on a DALI error, split in halves until the bad rows are found."""
        try:
            return [self._run([data[r] for r in rows])], {}
        except RuntimeError as e:  # what DALI raises for an operator's error
            self._pipe = self._build()  # DALI: "Current pipeline object is no longer valid"
            if "decoders.image" not in str(e):
                raise  # not the images' fault (a CUDA error, say): the batch fails as a whole
            if len(rows) == 1:
                return [], {rows[0]: ("bad_image", f"cannot decode image: DALI: {_reason(e)}")}
        mid = len(rows) // 2
        first, bad_first = self._run_isolating(rows[:mid], data)
        second, bad_second = self._run_isolating(rows[mid:], data)
        return first + second, {**bad_first, **bad_second}

    def _run(self, items: list[tuple[Any, Any]]) -> Any:
        """One pipeline run; a NumPy array on the CPU, a CuPy array on the GPU."""
        encoded, sizes = [blob for blob, _ in items], [size for _, size in items]
        if self._gpu is None:
            (images,) = self._pipe.run(encoded=encoded, size=sizes)
            return images.as_array()
        import cupy

        # NOT RUN (no GPU with DALI here). The outputs are ordered on our stream; the dynamic
        # executor never reuses an output buffer and the DLPack capsule keeps it alive.
        (images,) = self._pipe.run(self._stream, encoded=encoded, size=sizes)
        with cupy.cuda.Device(self._gpu), cupy_stream(cupy, self._stream):
            return cupy.from_dlpack(images.as_tensor())

    def _concatenate(self, pieces: list[Any]) -> Any:
        """One array from the chunks' outputs, on the device they are on."""
        if self._gpu is None:
            dtype = np.float16 if self.p.dtype == "FP16" else np.float32
            if not pieces:
                return np.empty((0, *self.out_shape), dtype)
            return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        import cupy

        if len(pieces) == 1:
            return pieces[0]
        with cupy.cuda.Device(self._gpu), cupy_stream(cupy, self._stream):
            if not pieces:
                dtype = cupy.float16 if self.p.dtype == "FP16" else cupy.float32
                return cupy.empty((0, *self.out_shape), dtype)
            return cupy.concatenate(pieces)

    def _build(self) -> Any:
        """Decode → resize (size fed per image) → crop + normalize + cast + layout."""
        dali = _dali()
        fn, types = dali.fn, dali.types
        pipe = dali.pipeline.Pipeline(
            batch_size=self.p.max_batch_size,
            num_threads=self.p.num_threads,
            device_id=self._gpu,  # None: a CPU-only pipeline
            prefetch_queue_depth=1,  # needed to pass inputs to run(); one batch at a time
            exec_dynamic=True,  # outputs own their memory: safe to hand on through DLPack
        )
        mean = [m / self.p.scale for m in self.p.mean]  # DALI: (x - mean) / std on 0..255
        std = [s / self.p.scale for s in self.p.std]
        with pipe:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
            gpu = {} if self._gpu is None else {"jpeg_fancy_upsampling": True}  # as libjpeg
            images = fn.decoders.image(
                encoded,
                device="cpu" if self._gpu is None else "mixed",
                output_type=types.RGB,
                adjust_orientation=False,  # Pillow (decode_image) ignores EXIF orientation
                **gpu,
            )
            images = fn.resize(
                images, size=size, interp_type=getattr(types, _INTERP[self.p.interpolation])
            )
            images = fn.crop_mirror_normalize(
                images,
                crop=self.crop_hw,
                rounding="truncate",
                mean=mean,
                std=std,
                dtype=types.FLOAT16 if self.p.dtype == "FP16" else types.FLOAT,
                output_layout="CHW" if self.p.layout == "NCHW" else "HWC",
            )
            pipe.set_outputs(images)
        pipe.build()
        return pipe


def _header_size(blob: Any, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the header alone; the same refusals as ``decode_image``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(blob)) as opened:
                w, h = opened.size
                fmt = opened.format
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _RefusedError("image_too_large", str(e)) from None
    except Exception as e:  # Pillow raises many types for unreadable headers
        raise _RefusedError("bad_image", unreadable(e)) from None
    if w * h > max_pixels:
        raise _RefusedError("image_too_large", f"{w}x{h} pixels is over max_pixels={max_pixels}")
    if fmt not in _DECODABLE:
        raise _RefusedError("bad_image", f"cannot decode image: DALI does not decode {fmt}")
    return w, h


def _reason(e: Exception) -> str:
    """The line of a DALI error that names the cause (its message is a long report).

    DALI numbers the sample within the failed run, which means nothing to the caller, so
    the number is dropped; the decoder's own log line (on stderr) says more.
    """
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if "encountered:" in lines[:-1]:
        cause = lines[lines.index("encountered:") + 1]
        return re.sub(r"\s*sample #\d+\s*:?$", "", cause) or cause
    return lines[0] if lines else type(e).__name__


def _dali() -> Any:
    """DALI's modules, imported on first use (about 1 GB; the ``dali`` extra)."""
    try:
        dali = importlib.import_module("nvidia.dali")
        for sub in ("fn", "types", "pipeline", "backend"):
            importlib.import_module(f"nvidia.dali.{sub}")
    except ImportError:
        raise GraphError(f"dali_image needs NVIDIA DALI: {_dali_hint()}") from None
    return dali


def _dali_hint() -> str:
    """The GPU extra (its DALI runs the CPU operators too) where CUDA is found, else ``dali``."""
    major = cuda_major()
    if major is not None and major >= min(GPU_EXTRAS):
        return f"pip install {gpu_extra_for(major)}"
    return f"pip install 'kp-pipeline[dali]' (CPU operators), or {gpu_extra_for(None)} on a GPU"


class _RefusedError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
