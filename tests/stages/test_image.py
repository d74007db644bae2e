from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import GraphError
from pipeline.tensors import TensorSpec
from stages.base import Batch
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


def _encode(arr: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    (img.convert(mode) if mode else img).save(buf, fmt)
    return buf.getvalue()


def _column(*items: bytes) -> np.ndarray:
    col = np.empty((len(items), 1), dtype=object)
    for i, b in enumerate(items):
        col[i, 0] = b
    return col


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _decode(*items: bytes, **params: object) -> Batch:
    stage = DecodeImage(DecodeImageParams(**params))  # type: ignore[arg-type]
    return stage.process(Batch(list(range(len(items))), {"image": _column(*items)}))


def test_decode_is_lossless_for_png_and_keeps_rows_apart() -> None:
    a, b = _photo(5, 7, 1), _photo(9, 4, 2)
    out = _decode(_encode(a), _encode(b))
    assert out.rows == [0, 1]
    assert isinstance(out.columns["image"], list)  # different sizes stay a list
    np.testing.assert_array_equal(out.columns["image"][0], a)
    np.testing.assert_array_equal(out.columns["image"][1], b)


def test_same_sized_images_are_stacked() -> None:
    out = _decode(_encode(_photo(4, 4)), _encode(_photo(4, 4, 3)))
    assert out.columns["image"].shape == (2, 4, 4, 3)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_other_modes_become_rgb(mode: str) -> None:
    src = _photo(6, 6)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = _decode(_encode(src, fmt, mode))
    reference = np.asarray(Image.open(io.BytesIO(_encode(src, fmt, mode))).convert("RGB"))
    np.testing.assert_array_equal(out.columns["image"][0], reference)


def test_corrupt_and_oversized_images_are_rejected_the_rest_served() -> None:
    good = _encode(_photo(8, 8))
    jpeg = _encode(_photo(20, 20), "JPEG")
    out = _decode(
        good, b"not an image", jpeg[: len(jpeg) // 2], _encode(_photo(30, 30)), good, max_pixels=800
    )
    assert out.rows == [0, 4]
    reasons = {row: reason for row, reason, _ in out.rejected}
    assert reasons == {1: "bad_image", 2: "bad_image", 3: "image_too_large"}
    assert out.columns["image"].shape == (2, 8, 8, 3)


def test_resize_and_crop_match_pillow() -> None:
    src = _photo(300, 451)
    batch = Batch([0], {"image": [src]})
    batch = Resize(ResizeParams(size=256, interpolation="bilinear")).process(batch)
    batch = CenterCrop(CenterCropParams(size=224)).process(batch)
    ref = Image.fromarray(src).resize((385, 256), Image.Resampling.BILINEAR)
    ref_arr = np.asarray(ref)[16:240, 80:304]
    np.testing.assert_array_equal(batch.columns["image"][0], ref_arr)
    assert batch.columns["image"].shape == (1, 224, 224, 3)


def test_crop_rejects_images_smaller_than_the_crop() -> None:
    batch = Batch([0, 1], {"image": [_photo(10, 10), _photo(3, 12)]})
    out = CenterCrop(CenterCropParams(size=(4, 4))).process(batch)
    assert out.rows == [0]
    assert out.rejected[0][:2] == (1, "image_too_small")


def test_normalize_and_layout_match_numpy() -> None:
    x = np.stack([_photo(4, 5, i) for i in range(3)])
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    batch = Normalize(NormalizeParams(mean=mean, std=std)).process(Batch([0, 1, 2], {"image": x}))
    batch = ToNCHW(ToNCHWParams(output="input")).process(batch)
    ref = ((x / 255.0 - np.array(mean)) / np.array(std)).transpose(0, 3, 1, 2)
    out = batch.columns["input"]
    assert out.dtype == np.float32
    assert out.flags.c_contiguous
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_signatures_describe_the_chain_and_refuse_misfits() -> None:
    specs = {"image": TensorSpec("BYTES", (1,))}
    specs = DecodeImage(DecodeImageParams()).signature(specs)
    assert specs == {"image": TensorSpec("UINT8", (None, None, 3))}
    specs = Resize(ResizeParams(size=256)).signature(specs)
    specs = CenterCrop(CenterCropParams(size=224)).signature(specs)
    assert specs == {"image": TensorSpec("UINT8", (224, 224, 3))}
    with pytest.raises(GraphError, match="mean and std need 3 values"):
        Normalize(NormalizeParams(mean=[0.5], std=[0.5])).signature(specs)
    with pytest.raises(GraphError, match="needs column 'photo'"):
        DecodeImage(DecodeImageParams(input="photo")).signature(specs)
    with pytest.raises(GraphError, match="must be BYTES"):
        DecodeImage(DecodeImageParams()).signature({"image": TensorSpec("FP32", (3,))})
    with pytest.raises(GraphError, match="must be a fixed"):
        Normalize(NormalizeParams(mean=[0] * 3, std=[1] * 3)).signature(
            {"image": TensorSpec("UINT8", (None, None, 3))}
        )
