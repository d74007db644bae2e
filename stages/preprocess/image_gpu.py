"""The image chain on the GPU with torchvision's nvJPEG decoder and torch ops.

`GpuDecodeImage` (``gpu_decode_image``) replaces ``[decode_image, resize, center_crop,
normalize, to_nchw]`` with the same parameters and the same rejects, for GPU machines
where DALI cannot be installed but torchvision can: the JPEGs of a batch are decoded in
one ``torchvision.io.decode_jpeg(list_of_tensors, device="cuda")`` call (nvJPEG, batched),
then resized (images of one size together, ``interpolate`` with ``antialias=True``),
rounded to uint8 as Pillow's resize does, centre-cropped, normalised and laid out NCHW,
all with torch ops on the instance's stream. The output column is a CUDA torch tensor;
the torch backend takes it through DLPack without a host round trip.

Rejects, decided on the host from the header (Pillow reads it without decoding), as in
``decode_image`` and ``dali_image``: an unreadable header or empty payload is
``bad_image``; more than ``max_pixels`` is ``image_too_large``; resized smaller than the
crop is ``image_too_small``. A JPEG that nvJPEG refuses is ``bad_image``: torchvision
returns nothing when one image of a list fails, so the list is split in halves until the
bad ones are isolated. Formats other than baseline/progressive RGB or grey JPEG (PNG,
WebP, CMYK JPEG, ...) follow ``non_jpeg``: ``cpu`` (default) decodes those rows with
Pillow, exactly as ``decode_image`` does, and uploads the pixels; ``reject`` makes them
``bad_image`` saying the stage decodes JPEG only.

Tolerance against the Pillow chain, in levels of the 0..255 image (``levels * scale /
std`` in the output). Torch's antialiased bilinear/bicubic resize is a port of Pillow's,
but computes in float where Pillow uses fixed point with a uint8 rounding between its
horizontal and vertical passes. Measured on CPU with Pillow decoding (the decoder is
injectable; tests/stages/test_image_gpu.py) on the three sample photos: bilinear max 1
level, mean 0.15 (tested bound: max ≤ 2, mean ≤ 0.25); bicubic max 6 levels, 0.015 % of
values off by more than one, mean 0.16 (bound: max ≤ 8, mean ≤ 0.25). Through
EfficientNet-Lite0 the logits differ by at most 0.15 and the top-5 sets are the same, but
top-1 agrees on 2 of the 3 photos: the cat's two best classes (Egyptian cat 9.231, tiger
cat 9.224 in the Pillow chain) are a near tie that this difference flips. ``nearest`` is
exact on them (torch's ``nearest-exact`` samples at pixel centres as Pillow does).
``lanczos`` is refused (torch has no Lanczos). nvJPEG's IDCT and chroma upsampling may
differ from libjpeg-turbo's by a few levels: the gpu-marked parity test bounds the whole
chain on a GPU at max ≤ 24, mean ≤ 1.5 levels, a guess until it has run there.

Streams: the stage works on the instance's stream (``StageContext.stream``, the one its
backend infers on, so the model's kernels are queued after the stage's). torchvision
decodes on a stream of its own and makes the current stream wait for it with an event
(torchvision/csrc/io/image/cuda/decode_jpegs_cuda.cpp); it also holds a process-wide
lock around decoding with one decoder per process, so two instances in one process do
not decode at the same time (their resizing and inference still overlap). Without an
instance stream on CUDA the stage synchronises once per batch before returning.

GPU: written against torchvision 0.26's and PyTorch's documented API and source, and NOT
yet run on a GPU (none lent to this work); ``make gpu-check`` runs the nvJPEG and parity
tests there. torchvision is imported only when the stage is set up with ``nvjpeg``.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
from PIL import Image
from pydantic import Field

from schemas.devices import parse_device
from schemas.errors import GraphError, KpError, describe
from stages.base import Batch, StageContext, StageParams
from stages.preprocess.image import (
    DecodeImage,
    DecodeImageParams,
    ImageChainParams,
    ImageChainStage,
    unreadable,
)
from stages.preprocess.image import _RefusedError as _PillowRefusedError
from stages.preprocess.image_fused import stream_handle

__all__ = [
    "GpuDecodeImage",
    "GpuDecodeImageParams",
    "JpegDecoder",
    "pillow_decoder",
    "torchvision_decoder",
]

# Decodes encoded JPEGs (1-D uint8 CPU tensors) into [3,H,W] uint8 tensors on ``device``;
# raises when any of them fails (torchvision's contract: no partial results).
JpegDecoder = Callable[[list[Any], str], list[Any]]
_Failures = dict[int, tuple[str, str]]
_TORCH_MODE = {"nearest": "nearest", "bilinear": "bilinear", "bicubic": "bicubic"}
# Pillow's names for JPEG files; MPO is a camera JPEG with extra frames (the first decodes).
_JPEG = frozenset({"JPEG", "MPO"})
_GPU_MODES = frozenset({"RGB", "L"})  # JPEG colour modes nvJPEG turns into RGB like Pillow


class GpuDecodeImageParams(ImageChainParams):
    """The CPU chain's parameters in one place, as in ``dali_image``."""

    non_jpeg: Literal["cpu", "reject"] = Field(
        "cpu", description="Other formats: Pillow-decode the row on the CPU, or reject it."
    )
    decoder: Literal["nvjpeg", "pillow"] = Field(
        "nvjpeg",
        description="nvjpeg: torchvision's decode_jpeg on the stage's device (nvJPEG on "
        "CUDA); pillow: Pillow on the CPU, then uploaded (machines without torchvision, "
        "parity checks). The torch code after decoding is the same.",
    )


class GpuDecodeImage(ImageChainStage):
    """Encoded images (BYTES[1]) in; a normalised FP32/FP16 torch tensor out, on the device."""

    Params: ClassVar[type[StageParams]] = GpuDecodeImageParams
    p: GpuDecodeImageParams
    name = "gpu_decode_image"

    def __init__(self, params: GpuDecodeImageParams, decoder: JpegDecoder | None = None) -> None:
        super().__init__(params)
        self._pillow = DecodeImage(DecodeImageParams(max_pixels=params.max_pixels))
        self._decoder = decoder
        self._device = "cpu"
        self._stream: Any = None
        self._consts: Any = None  # (mul, sub) as [1,3,1,1] float32 tensors on the device

    @property
    def leaves_device_arrays(self) -> bool:
        """On CUDA the output is a torch CUDA tensor: only stages that take those may follow."""
        return self._device.startswith("cuda")

    def check_params(self) -> None:
        """Torch has no Lanczos filter: refuse it when the graph is checked."""
        if self.p.interpolation not in _TORCH_MODE:
            raise GraphError(
                f"{self.name}: interpolation {self.p.interpolation!r} has no torch "
                f"equivalent; use one of {sorted(_TORCH_MODE)} (or dali_image / the CPU chain)"
            )

    def setup(self, ctx: StageContext) -> None:
        """Pick the device and stream; without an injected decoder, load torchvision's."""
        try:
            kind, index = parse_device(ctx.device)
        except KpError as e:
            raise GraphError(f"{self.name}: {e}") from None
        torch = _torch()
        if kind == "auto":
            kind = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = "cpu" if kind == "cpu" else f"cuda:{index or 0}"
        self._stream = None if kind == "cpu" else _torch_stream(torch, ctx.stream, self._device)
        if self._decoder is None:
            self._decoder = (
                torchvision_decoder() if self.p.decoder == "nvjpeg" else pillow_decoder()
            )
        std = torch.tensor(self.p.std, dtype=torch.float32)
        mul = (torch.tensor(self.p.scale, dtype=torch.float32) / std).view(1, 3, 1, 1)
        sub = (torch.tensor(self.p.mean, dtype=torch.float32) / std).view(1, 3, 1, 1)
        with _on_stream(torch, self._stream):  # copied in the order of the kernels using them
            self._consts = (mul.to(self._device), sub.to(self._device))

    def close(self) -> None:
        """Drop the device constants (the decoder keeps no per-instance state)."""
        self._consts = None

    def process(self, batch: Batch) -> Batch:
        """Check headers, decode the JPEGs in one call, the rest per row; reject what fails."""
        if self._consts is None:
            self.setup(StageContext(self.name, device=self._device))
        torch = _torch()
        col = batch.columns[self.p.input]
        failures: _Failures = {}
        jpegs: dict[int, bytes] = {}
        others: dict[int, bytes] = {}
        for i in range(len(batch)):
            raw = col[i]
            blob = raw.reshape(-1)[0] if isinstance(raw, np.ndarray) else raw
            try:
                fmt, mode = self._check_header(blob)
            except _RefusedError as e:
                failures[i] = (e.reason, str(e))
                continue
            if fmt in _JPEG and mode in _GPU_MODES:
                jpegs[i] = bytes(blob)
            elif self.p.non_jpeg == "cpu":
                others[i] = bytes(blob)
            else:
                failures[i] = ("bad_image", f"{self.name} decodes JPEG only; got {fmt} {mode}")
        # no_grad, not inference_mode: inference tensors refuse some uses outside that mode,
        # and the batch is cut (reject) and handed on outside it.
        with torch.no_grad(), _on_stream(torch, self._stream):
            images = self._decode_jpegs(torch, jpegs, failures)
            images.update(self._decode_on_cpu(torch, others, failures))
            keep = [i for i in range(len(batch)) if i not in failures]
            y = self.transform(torch, [images[i] for i in keep])
            if self._stream is None and self._device != "cpu":
                # No instance stream: the work is on torch's current stream, which a
                # consumer on its own stream would not wait for. One host sync makes the
                # output safe for any consumer (the runtime always passes a stream).
                torch.cuda.current_stream(self._device).synchronize()
        columns = {k: v for k, v in batch.columns.items() if k != self.p.input}
        out = batch.with_columns(columns).reject(failures)
        out.columns[self.out] = y.numpy() if self._device == "cpu" else y
        return out

    def transform(self, torch: Any, images: Sequence[Any]) -> Any:
        """[3,H,W] uint8 tensors → resized, cropped, normalised [N,3,h,w] (or NHWC) batch.

        Images of one size are resized in one ``interpolate`` call; the result is rounded
        and clamped to uint8 as Pillow's resize is, so the crop and normalisation see the
        same kind of pixels as in the CPU chain.
        """
        ch, cw = self.crop_hw
        out_dtype = torch.float16 if self.p.dtype == "FP16" else torch.float32
        if not images:
            return torch.empty((0, *self.out_shape), dtype=out_dtype, device=self._device)
        crops: list[Any] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault((int(img.shape[1]), int(img.shape[2])), []).append(i)
        for (h, w), members in groups.items():
            th, tw = self._geometry.target(h, w)
            x = torch.stack([images[i] for i in members])
            if (th, tw) != (h, w):
                x = self._resize(torch, x, th, tw)
            top, left = (th - ch) // 2, (tw - cw) // 2
            x = x[:, :, top : top + ch, left : left + cw]
            for j, i in enumerate(members):
                crops[i] = x[j]
        mul, sub = self._consts
        y = torch.stack(crops).to(torch.float32) * mul - sub
        if self.p.layout == "NHWC":
            y = y.permute(0, 2, 3, 1)
        return y.to(out_dtype).contiguous()

    def _resize(self, torch: Any, x: Any, th: int, tw: int) -> Any:
        mode = _TORCH_MODE[self.p.interpolation]
        if mode == "nearest":  # Pillow's NEAREST samples at pixel centres: torch's nearest-exact
            return torch.nn.functional.interpolate(x, size=(th, tw), mode="nearest-exact")
        y = torch.nn.functional.interpolate(
            x.to(torch.float32), size=(th, tw), mode=mode, align_corners=False, antialias=True
        )
        return y.round_().clamp_(0, 255).to(torch.uint8)

    def _check_header(self, blob: Any) -> tuple[str, str]:
        """Format and colour mode from the header; the refusals of the CPU chain."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(blob)) as opened:
                    w, h = opened.size
                    fmt, mode = str(opened.format), str(opened.mode)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _RefusedError("image_too_large", str(e)) from None
        except Exception as e:  # Pillow raises many types for unreadable headers
            raise _RefusedError("bad_image", unreadable(e)) from None
        if w * h > self.p.max_pixels:
            raise _RefusedError(
                "image_too_large", f"{w}x{h} pixels is over max_pixels={self.p.max_pixels}"
            )
        th, tw = self._geometry.target(h, w)
        ch, cw = self.crop_hw
        if th < ch or tw < cw:
            raise _RefusedError("image_too_small", f"{tw}x{th} is smaller than the {cw}x{ch} crop")
        return fmt, mode

    def _decode_jpegs(
        self, torch: Any, jpegs: dict[int, bytes], failures: _Failures
    ) -> dict[int, Any]:
        """One decoder call for all; on failure, halves until the bad rows are isolated."""
        if not jpegs:
            return {}
        assert self._decoder is not None
        rows = list(jpegs)
        try:
            encoded = [torch.frombuffer(bytearray(jpegs[r]), dtype=torch.uint8) for r in rows]
            return dict(zip(rows, self._decoder(encoded, self._device), strict=True))
        except RuntimeError as e:  # what torchvision raises for a JPEG it cannot decode
            if len(rows) == 1:
                failures[rows[0]] = ("bad_image", f"cannot decode image: {_first(e)}")
                return {}
        mid = len(rows) // 2
        first = self._decode_jpegs(torch, {r: jpegs[r] for r in rows[:mid]}, failures)
        return first | self._decode_jpegs(torch, {r: jpegs[r] for r in rows[mid:]}, failures)

    def _decode_on_cpu(
        self, torch: Any, blobs: dict[int, bytes], failures: _Failures
    ) -> dict[int, Any]:
        """Pillow decodes exactly as ``decode_image``; the pixels go up in one copy each."""
        out: dict[int, Any] = {}
        for i, blob in blobs.items():
            try:
                arr = self._pillow._decode(blob)  # decode_image's own code and reasons
            except _PillowRefusedError as e:
                failures[i] = (e.reason, str(e))
                continue
            chw = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
            out[i] = chw.to(self._device, non_blocking=False)
        return out


def torchvision_decoder() -> JpegDecoder:
    """``torchvision.io.decode_jpeg`` on a list, converting grey to RGB (as Pillow's convert).

    NOT yet run on a GPU here: torchvision's PyPI wheel does not load with the CPU torch of
    the project's machines. The CPU tests inject a Pillow-backed decoder instead.
    """
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception as e:  # ImportError, or its native library failing to load
        raise GraphError(
            f"gpu_decode_image needs torchvision with its image extension: {describe(e)}"
        ) from None

    def decode(encoded: list[Any], device: str) -> list[Any]:
        decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        return list(decoded) if isinstance(decoded, list | tuple) else [decoded]

    return decode


def pillow_decoder() -> JpegDecoder:
    """Pillow on the CPU, as ``decode_image`` converts (``RGB``), then copied to ``device``.

    Raises `RuntimeError` for a JPEG it cannot decode, as torchvision does, so the stage
    isolates bad rows the same way with either decoder.
    """
    torch = _torch()

    def decode(encoded: list[Any], device: str) -> list[Any]:
        out = []
        for t in encoded:
            try:
                with Image.open(io.BytesIO(t.numpy().tobytes())) as img:
                    arr = np.asarray(img.convert("RGB"))
            except Exception as e:  # Pillow raises many types for corrupt data
                raise RuntimeError(f"Pillow: {describe(e)}") from None
            out.append(torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).to(device))
        return out

    return decode


class _RefusedError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _first(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise GraphError("gpu_decode_image needs torch: pip install 'kp-pipeline[torch]'") from None
    return torch


def _torch_stream(torch: Any, stream: Any, device: str) -> Any:
    """The instance's stream as a torch stream: a torch stream, CuPy's, ours, or a handle."""
    if stream is None or isinstance(stream, torch.cuda.Stream):
        return stream
    handle = stream_handle(stream)  # InstanceStream.cuda_stream, cupy's .ptr, an int
    return torch.cuda.ExternalStream(handle, device=torch.device(device))


class _NoStream:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _on_stream(torch: Any, stream: Any) -> Any:
    """``torch.cuda.stream(stream)`` where there is one; nothing on the CPU."""
    return _NoStream() if stream is None else torch.cuda.stream(stream)
