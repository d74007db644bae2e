"""Image preprocessing on the CPU with Pillow and NumPy.

These are the CPU stages; GPU twins (DALI, CuPy) are a separate set with the same
parameters. Decoding and resizing happen per image (images differ in size); from the
crop on, the batch is one stacked array and the rest is vectorised.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import Field

from schemas.errors import GraphError, describe
from schemas.tensors import TensorSpec
from stages.base import Batch, StageBase, StageParams, require, stack_if_uniform

__all__ = [
    "CenterCrop",
    "DecodeImage",
    "ImageChainParams",
    "ImageChainStage",
    "Normalize",
    "Resize",
    "ToNCHW",
    "unreadable",
]

_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def _image_spec(spec: TensorSpec, stage: str, name: str) -> None:
    if spec.datatype != "UINT8" or len(spec.shape) != 3:
        raise GraphError(f"{stage}: {name!r} must be UINT8[h,w,c], got {spec}")


class ImageChainParams(StageParams):
    """The CPU chain's parameters in one place, for the stages that fuse it (DALI, GPU).

    decode_image → resize → center_crop → normalize → to_nchw, with the same names and
    meanings, so a topology switches between them by changing the stage.
    """

    input: str = "image"
    output: str | None = None
    max_pixels: int = Field(40_000_000, ge=1, description="Refuse larger images (bombs).")
    resize: int | tuple[int, int] = Field(description="Shorter side, or [height, width].")
    interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos"] = "bilinear"
    """The resampling filter of the resize."""
    crop: int | tuple[int, int] = Field(description="Square side, or [height, width].")
    mean: list[float]
    """Per-channel mean, subtracted after ``scale`` (one value per channel)."""
    std: list[float]
    """Per-channel standard deviation the result is divided by."""
    scale: float = 1.0 / 255.0
    """Factor applied to the pixel values first (1/255 maps uint8 to [0, 1])."""
    dtype: Literal["FP32", "FP16"] = "FP32"
    """The output's datatype."""
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    """The output's layout: channels first (NCHW) or last (NHWC)."""


class DecodeImageParams(StageParams):
    """``input`` holds one encoded image per request (BYTES [1])."""

    input: str = "image"
    output: str | None = None
    mode: Literal["RGB", "L"] = "RGB"
    """Decode to three channels (RGB) or one (L, greyscale)."""
    max_pixels: int = Field(40_000_000, ge=1, description="Refuse larger images (bombs).")


class DecodeImage(StageBase):
    """Decode JPEG/PNG/... bytes into HWC uint8 arrays; refuse corrupt and oversized images."""

    Params: ClassVar[type[StageParams]] = DecodeImageParams
    name = "decode_image"

    def __init__(self, params: DecodeImageParams) -> None:
        super().__init__(params)
        self.p = params
        self.out = params.output or params.input

    def signature(self, inputs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        """BYTES[1] (or BYTES[]) in, UINT8[h,w,c] out."""
        spec = require(inputs, self.p.input, self.name)
        if spec.datatype != "BYTES" or spec.shape not in ((), (1,)):
            raise GraphError(f"{self.name}: {self.p.input!r} must be BYTES[1], got {spec}")
        channels = 3 if self.p.mode == "RGB" else 1
        out = {k: v for k, v in inputs.items() if k != self.p.input}
        out[self.out] = TensorSpec("UINT8", (None, None, channels))
        return out

    def process(self, batch: Batch) -> Batch:
        """Decode each row; a row that does not decode is rejected, not raised."""
        col = batch.columns[self.p.input]
        images: list[Any] = []
        failures: dict[int, tuple[str, str]] = {}
        for i in range(len(batch)):
            raw = col[i]
            data = raw.reshape(-1)[0] if isinstance(raw, np.ndarray) else raw
            try:
                images.append(self._decode(data))
            except _RefusedError as e:
                failures[i] = (e.reason, str(e))
                images.append(None)
        columns = {k: v for k, v in batch.columns.items() if k != self.p.input}
        columns[self.out] = images
        out = batch.with_columns(columns).reject(failures)
        out.columns[self.out] = stack_if_uniform(list(out.columns[self.out]))
        return out

    def _decode(self, data: bytes) -> np.ndarray[Any, Any]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                opened = Image.open(io.BytesIO(data))
                w, h = opened.size
                if w * h > self.p.max_pixels:
                    raise _RefusedError(
                        "image_too_large", f"{w}x{h} pixels is over max_pixels={self.p.max_pixels}"
                    )
                img = opened.convert(self.p.mode)
                img.load()
        except _RefusedError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _RefusedError("image_too_large", str(e)) from None
        except Exception as e:  # Pillow raises many types for corrupt data
            raise _RefusedError("bad_image", unreadable(e)) from None
        arr = np.asarray(img)
        return arr if arr.ndim == 3 else arr[:, :, None]


def unreadable(e: Exception) -> str:
    """A ``bad_image`` message for what Pillow raised on bytes it could not read.

    Pillow names the file it could not identify, here ``<_io.BytesIO object at 0x…>``: an
    address that differs per request would make every such dead letter's reason unique.
    """
    if isinstance(e, UnidentifiedImageError):
        return "cannot decode image: UnidentifiedImageError: no image format Pillow reads"
    return f"cannot decode image: {describe(e)}"


class _RefusedError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ResizeParams(StageParams):
    """``size``: shorter side (int, aspect kept) or exact ``[height, width]``."""

    input: str = "image"
    size: int | tuple[int, int]
    interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos"] = "bilinear"
    """The resampling filter of the resize."""


class Resize(StageBase):
    """Resize each image with Pillow's filter of the given name."""

    Params: ClassVar[type[StageParams]] = ResizeParams
    name = "resize"

    def __init__(self, params: ResizeParams) -> None:
        super().__init__(params)
        self.p = params

    def signature(self, inputs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        """UINT8[h,w,c] in; fixed [H,W,c] out for an exact size, free dims otherwise."""
        spec = require(inputs, self.p.input, self.name)
        _image_spec(spec, self.name, self.p.input)
        out = dict(inputs)
        if isinstance(self.p.size, tuple):
            out[self.p.input] = TensorSpec("UINT8", (*self.p.size, spec.shape[2]))
        else:
            out[self.p.input] = TensorSpec("UINT8", (None, None, spec.shape[2]))
        return out

    def target(self, h: int, w: int) -> tuple[int, int]:
        """Output (height, width) for an input of (h, w)."""
        if isinstance(self.p.size, tuple):
            return self.p.size
        s = self.p.size / min(h, w)
        return max(1, round(h * s)), max(1, round(w * s))

    def process(self, batch: Batch) -> Batch:
        """Resize every row."""
        resample = _FILTERS[self.p.interpolation]
        out = []
        for img in batch.columns[self.p.input]:
            th, tw = self.target(img.shape[0], img.shape[1])
            if (th, tw) == img.shape[:2]:
                out.append(img)
                continue
            pil = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)
            arr = np.asarray(pil.resize((tw, th), resample))
            out.append(arr if arr.ndim == 3 else arr[:, :, None])
        columns = dict(batch.columns)
        columns[self.p.input] = stack_if_uniform(out)
        return batch.with_columns(columns)


class CenterCropParams(StageParams):
    """``size``: square side or ``[height, width]``; smaller images are rejected."""

    input: str = "image"
    size: int | tuple[int, int]


class CenterCrop(StageBase):
    """Cut the centre ``size`` out of each image; the result is one stacked array."""

    Params: ClassVar[type[StageParams]] = CenterCropParams
    name = "center_crop"

    def __init__(self, params: CenterCropParams) -> None:
        super().__init__(params)
        self.p = params
        self.h, self.w = (params.size, params.size) if isinstance(params.size, int) else params.size

    def signature(self, inputs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        """UINT8[h,w,c] in, UINT8[H,W,c] out."""
        spec = require(inputs, self.p.input, self.name)
        _image_spec(spec, self.name, self.p.input)
        out = dict(inputs)
        out[self.p.input] = TensorSpec("UINT8", (self.h, self.w, spec.shape[2]))
        return out

    def process(self, batch: Batch) -> Batch:
        """Crop every row; rows smaller than the crop are rejected."""
        crops: list[Any] = []
        failures: dict[int, tuple[str, str]] = {}
        for i, img in enumerate(batch.columns[self.p.input]):
            h, w = img.shape[:2]
            if h < self.h or w < self.w:
                failures[i] = (
                    "image_too_small",
                    f"{w}x{h} is smaller than the {self.w}x{self.h} crop",
                )
                crops.append(None)
                continue
            top, left = (h - self.h) // 2, (w - self.w) // 2
            crops.append(img[top : top + self.h, left : left + self.w])
        columns = dict(batch.columns)
        columns[self.p.input] = crops
        out = batch.with_columns(columns).reject(failures)
        rows = list(out.columns[self.p.input])
        out.columns[self.p.input] = (
            np.stack(rows) if rows else np.empty((0, self.h, self.w, 3), np.uint8)
        )
        return out


class NormalizeParams(StageParams):
    """``out = (x * scale - mean) / std`` per channel, as float32."""

    input: str = "image"
    output: str | None = None
    mean: list[float]
    """Per-channel mean, subtracted after ``scale`` (one value per channel)."""
    std: list[float]
    """Per-channel standard deviation the result is divided by."""
    scale: float = 1.0 / 255.0
    """Factor applied to the pixel values first (1/255 maps uint8 to [0, 1])."""


class Normalize(StageBase):
    """Per-channel normalisation of stacked HWC images into float32 (vectorised)."""

    Params: ClassVar[type[StageParams]] = NormalizeParams
    name = "normalize"

    def __init__(self, params: NormalizeParams) -> None:
        super().__init__(params)
        self.p = params
        self.out = params.output or params.input
        std = np.asarray(params.std, np.float32)
        # x * scale / std - mean / std, folded into one multiply and one subtract.
        self._mul = (np.float32(params.scale) / std).astype(np.float32)
        self._sub = (np.asarray(params.mean, np.float32) / std).astype(np.float32)

    def signature(self, inputs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        """A fixed-shape HWC tensor in, FP32 of the same shape out."""
        spec = require(inputs, self.p.input, self.name)
        if len(spec.shape) != 3 or None in spec.shape:
            raise GraphError(f"{self.name}: {self.p.input!r} must be a fixed [h,w,c], got {spec}")
        c = spec.shape[2]
        if len(self.p.mean) != c or len(self.p.std) != c:
            raise GraphError(f"{self.name}: mean and std need {c} values for {spec}")
        out = {k: v for k, v in inputs.items() if k != self.p.input}
        out[self.out] = TensorSpec("FP32", spec.shape)
        return out

    def process(self, batch: Batch) -> Batch:
        """Normalise the whole batch at once."""
        x = np.asarray(batch.columns[self.p.input])
        y = x.astype(np.float32)
        y *= self._mul
        y -= self._sub
        columns = {k: v for k, v in batch.columns.items() if k != self.p.input}
        columns[self.out] = y
        return batch.with_columns(columns)


class ToNCHWParams(StageParams):
    """Move channels first; ``output`` renames the column (e.g. to the model's input)."""

    input: str = "image"
    output: str | None = None


class ToNCHW(StageBase):
    """[N,H,W,C] → contiguous [N,C,H,W]."""

    Params: ClassVar[type[StageParams]] = ToNCHWParams
    name = "to_nchw"

    def __init__(self, params: ToNCHWParams) -> None:
        super().__init__(params)
        self.p = params
        self.out = params.output or params.input

    def signature(self, inputs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        """[h,w,c] in, [c,h,w] out, same datatype."""
        spec = require(inputs, self.p.input, self.name)
        if len(spec.shape) != 3:
            raise GraphError(f"{self.name}: {self.p.input!r} must be [h,w,c], got {spec}")
        h, w, c = spec.shape
        out = {k: v for k, v in inputs.items() if k != self.p.input}
        out[self.out] = TensorSpec(spec.datatype, (c, h, w))
        return out

    def process(self, batch: Batch) -> Batch:
        """Transpose the whole batch into a new contiguous array."""
        x = np.asarray(batch.columns[self.p.input])
        columns = {k: v for k, v in batch.columns.items() if k != self.p.input}
        columns[self.out] = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        return batch.with_columns(columns)


class ImageChainStage(StageBase):
    """What the fused image stages share: their output's place and shape, and its check.

    Subclasses add the decoding; `check_params` is where one refuses a parameter its
    library cannot honour.
    """

    def __init__(self, params: ImageChainParams) -> None:
        super().__init__(params)
        self.p = params
        self.out = params.output or params.input
        self.crop_hw = (params.crop, params.crop) if isinstance(params.crop, int) else params.crop
        self._geometry = Resize(ResizeParams(size=params.resize))

    @property
    def out_shape(self) -> tuple[int, int, int]:
        """Per-row output shape: [3, crop_h, crop_w] (NCHW) or [crop_h, crop_w, 3]."""
        h, w = self.crop_hw
        return (3, h, w) if self.p.layout == "NCHW" else (h, w, 3)

    def check_params(self) -> None:
        """Raise `GraphError` for parameters this stage cannot honour (default: none)."""

    def signature(self, inputs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        """BYTES[1] (or BYTES[]) in; FP32/FP16 [3,h,w] (or [h,w,3]) out."""
        spec = require(inputs, self.p.input, self.name)
        if spec.datatype != "BYTES" or spec.shape not in ((), (1,)):
            raise GraphError(f"{self.name}: {self.p.input!r} must be BYTES[1], got {spec}")
        if len(self.p.mean) != 3 or len(self.p.std) != 3:
            raise GraphError(f"{self.name}: mean and std need 3 values (RGB)")
        self.check_params()
        out = {k: v for k, v in inputs.items() if k != self.p.input}
        out[self.out] = TensorSpec(self.p.dtype, self.out_shape)
        return out
