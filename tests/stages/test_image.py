"""CPU image stages against plain Pillow/NumPy references, and their static signatures."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from schemas.errors import GraphError
from schemas.tensors import TensorSpec
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

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _encode(arr: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    (img.convert(mode) if mode else img).save(buf, fmt)
    return buf.getvalue()


def _column(*items: bytes) -> np.ndarray:
    """A BYTES[1] column as the runtime stacks it: [rows, 1] of objects."""
    col = np.empty((len(items), 1), dtype=object)
    for i, b in enumerate(items):
        col[i, 0] = b
    return col


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _decode(*items: bytes, **params: object) -> Batch:
    stage = DecodeImage(DecodeImageParams(**params))  # type: ignore[arg-type]
    return stage.process(Batch(list(range(len(items))), {"image": _column(*items)}))


def test_png_decodes_losslessly_and_rows_of_different_sizes_stay_apart() -> None:
    a, b = _photo(5, 7, 1), _photo(9, 4, 2)
    out = _decode(_encode(a), _encode(b))
    assert out.rows == [0, 1]
    assert out.rejected == []
    assert isinstance(out.columns["image"], list)
    np.testing.assert_array_equal(out.columns["image"][0], a)
    np.testing.assert_array_equal(out.columns["image"][1], b)


def test_jpeg_decodes_like_pillow() -> None:
    data = _encode(_photo(16, 12), "JPEG")
    out = _decode(data)
    np.testing.assert_array_equal(out.columns["image"][0], np.asarray(Image.open(io.BytesIO(data))))


def test_same_sized_images_are_stacked_into_one_array() -> None:
    a, b = _photo(4, 4), _photo(4, 4, 3)
    out = _decode(_encode(a), _encode(b))
    assert isinstance(out.columns["image"], np.ndarray)
    assert (out.columns["image"].shape, out.columns["image"].dtype) == ((2, 4, 4, 3), np.uint8)
    np.testing.assert_array_equal(out.columns["image"], np.stack([a, b]))


def test_decode_accepts_a_flat_list_column_and_renames_its_output() -> None:
    a = _photo(3, 3)
    stage = DecodeImage(DecodeImageParams(input="jpeg", output="pixels"))
    out = stage.process(Batch([0], {"jpeg": [_encode(a)], "other": np.zeros((1, 2))}))
    assert set(out.columns) == {"pixels", "other"}
    np.testing.assert_array_equal(out.columns["pixels"][0], a)


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("L", "PNG"), ("LA", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("L", "JPEG")],
)
def test_other_modes_become_rgb(mode: str, fmt: str) -> None:
    data = _encode(_photo(6, 6), fmt, mode)
    out = _decode(data)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert out.columns["image"][0].shape == (6, 6, 3)
    np.testing.assert_array_equal(out.columns["image"][0], reference)


def test_rgba_drops_alpha_keeping_the_colour_values() -> None:
    rgba = np.dstack([_photo(4, 4), np.full((4, 4), 7, np.uint8)])
    out = _decode(_encode(rgba))
    np.testing.assert_array_equal(out.columns["image"][0], rgba[:, :, :3])


def test_grayscale_mode_gives_one_channel() -> None:
    gray = _photo(5, 6)[:, :, 0]
    out = _decode(_encode(gray), _encode(_photo(5, 6), mode="L"), mode="L")
    assert out.columns["image"].shape == (2, 5, 6, 1)
    np.testing.assert_array_equal(out.columns["image"][0, :, :, 0], gray)


def test_corrupt_truncated_and_oversized_images_are_rejected_the_rest_served() -> None:
    good = _encode(_photo(8, 8))
    jpeg = _encode(_photo(20, 20), "JPEG")
    out = _decode(
        good,
        b"not an image",
        jpeg[: len(jpeg) // 2],
        _encode(_photo(30, 30)),
        b"",
        good,
        max_pixels=800,
    )
    assert out.rows == [0, 5]
    reasons = {row: reason for row, reason, _ in out.rejected}
    assert reasons == {1: "bad_image", 2: "bad_image", 3: "image_too_large", 4: "bad_image"}
    messages = {row: message for row, _, message in out.rejected}
    assert messages[1].startswith("cannot decode image: UnidentifiedImageError")
    assert messages[1] == messages[4]  # one reason for every unreadable image: no address in it
    assert " at 0x" not in messages[1]
    assert messages[3] == "30x30 pixels is over max_pixels=800"
    assert out.columns["image"].shape == (2, 8, 8, 3)


def test_max_pixels_is_inclusive() -> None:
    out = _decode(_encode(_photo(20, 40)), max_pixels=800)
    assert out.rows == [0]
    assert out.rejected == []


def test_decompression_bombs_are_too_large(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    out = _decode(_encode(_photo(12, 12)), _encode(_photo(30, 30)), max_pixels=10_000)
    assert out.rows == []
    assert [reason for _, reason, _ in out.rejected] == ["image_too_large"] * 2


def test_resize_shorter_side_keeps_the_aspect_ratio() -> None:
    stage = Resize(ResizeParams(size=256))
    assert stage.target(300, 451) == (256, 385)
    assert stage.target(451, 300) == (385, 256)
    assert stage.target(100, 100) == (256, 256)
    assert Resize(ResizeParams(size=1)).target(10, 1000) == (1, 100)
    assert Resize(ResizeParams(size=(5, 7))).target(100, 3) == (5, 7)


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear", "bicubic", "lanczos"])
def test_resize_matches_pillow(interpolation: str) -> None:
    src = [_photo(30, 45, 1), _photo(40, 20, 2)]
    out = Resize(ResizeParams(size=16, interpolation=interpolation)).process(
        Batch([0, 1], {"image": src})
    )
    resample = getattr(Image.Resampling, interpolation.upper())
    expected = [
        np.asarray(Image.fromarray(src[0]).resize((24, 16), resample)),
        np.asarray(Image.fromarray(src[1]).resize((16, 32), resample)),
    ]
    assert isinstance(out.columns["image"], list)
    for got, want in zip(out.columns["image"], expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_resize_to_an_exact_size_stacks_and_keeps_other_columns() -> None:
    src = [_photo(30, 45, 1), _photo(40, 20, 2)]
    batch = Batch([0, 1], {"image": src, "meta": np.arange(2)})
    out = Resize(ResizeParams(size=(8, 9))).process(batch)
    assert out.columns["image"].shape == (2, 8, 9, 3)
    expected = np.asarray(Image.fromarray(src[1]).resize((9, 8), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(out.columns["image"][1], expected)
    assert out.columns["meta"] is batch.columns["meta"]


def test_resize_leaves_images_already_at_size_untouched() -> None:
    img = _photo(16, 20)
    out = Resize(ResizeParams(size=16)).process(Batch([0], {"image": [img]}))
    assert out.columns["image"].shape == (1, 16, 20, 3)
    np.testing.assert_array_equal(out.columns["image"][0], img)


def test_resize_keeps_a_single_channel() -> None:
    gray = _photo(10, 20)[:, :, :1]
    out = Resize(ResizeParams(size=5)).process(Batch([0], {"image": [gray]}))
    expected = np.asarray(Image.fromarray(gray[:, :, 0]).resize((10, 5), Image.Resampling.BILINEAR))
    assert out.columns["image"][0].shape == (5, 10, 1)
    np.testing.assert_array_equal(out.columns["image"][0][:, :, 0], expected)


def test_resize_then_crop_matches_pillow_and_slicing() -> None:
    src = _photo(300, 451)
    batch = Batch([0], {"image": [src]})
    batch = Resize(ResizeParams(size=256, interpolation="bilinear")).process(batch)
    batch = CenterCrop(CenterCropParams(size=224)).process(batch)
    ref = np.asarray(Image.fromarray(src).resize((385, 256), Image.Resampling.BILINEAR))
    assert batch.columns["image"].shape == (1, 224, 224, 3)
    np.testing.assert_array_equal(batch.columns["image"][0], ref[16:240, 80:304])


def test_center_crop_takes_the_middle_rounding_down() -> None:
    imgs = [_photo(7, 9, 1), _photo(6, 6, 2)]
    out = CenterCrop(CenterCropParams(size=(4, 3))).process(Batch([0, 1], {"image": imgs}))
    assert out.columns["image"].shape == (2, 4, 3, 3)
    np.testing.assert_array_equal(out.columns["image"][0], imgs[0][1:5, 3:6])
    np.testing.assert_array_equal(out.columns["image"][1], imgs[1][1:5, 1:4])


def test_crop_rejects_images_smaller_than_the_crop() -> None:
    batch = Batch(["a", "b", "c"], {"image": [_photo(10, 10), _photo(3, 12), _photo(4, 4)]})
    out = CenterCrop(CenterCropParams(size=4)).process(batch)
    assert out.rows == ["a", "c"]
    assert out.rejected == [("b", "image_too_small", "12x3 is smaller than the 4x4 crop")]
    assert out.columns["image"].shape == (2, 4, 4, 3)


def test_crop_of_only_small_images_gives_an_empty_batch() -> None:
    out = CenterCrop(CenterCropParams(size=4)).process(Batch([0], {"image": [_photo(2, 2)]}))
    assert out.rows == []
    assert out.columns["image"].shape == (0, 4, 4, 3)


@pytest.mark.parametrize(
    ("mean", "std", "scale"), [(MEAN, STD, 1 / 255), ([127.0] * 3, [128.0] * 3, 1.0)]
)
def test_normalize_matches_a_float64_reference(
    mean: list[float], std: list[float], scale: float
) -> None:
    x = np.stack([_photo(6, 5, i) for i in range(3)])
    x[0, 0, 0] = [0, 255, 128]
    params = NormalizeParams(mean=mean, std=std, scale=scale)
    out = Normalize(params).process(Batch([0, 1, 2], {"image": x}))
    y = out.columns["image"]
    assert (y.dtype, y.shape) == (np.float32, x.shape)
    reference = (x.astype(np.float64) * scale - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(y, reference, rtol=0, atol=1e-6)


def test_normalize_can_write_another_column() -> None:
    x = np.zeros((1, 2, 2, 3), np.uint8)
    out = Normalize(NormalizeParams(mean=[0.5] * 3, std=[0.5] * 3, output="pixels")).process(
        Batch([0], {"image": x})
    )
    assert list(out.columns) == ["pixels"]
    np.testing.assert_array_equal(out.columns["pixels"], np.full((1, 2, 2, 3), -1.0, np.float32))


def test_to_nchw_is_a_contiguous_transpose() -> None:
    x = np.arange(2 * 3 * 4 * 3, dtype=np.float32).reshape(2, 3, 4, 3)
    out = ToNCHW(ToNCHWParams(output="input")).process(Batch([0, 1], {"image": x}))
    y = out.columns["input"]
    assert list(out.columns) == ["input"]
    assert y.shape == (2, 3, 3, 4)
    assert y.flags.c_contiguous
    for n, c, h, w in np.ndindex(*y.shape):
        assert y[n, c, h, w] == x[n, h, w, c]


def test_signatures_describe_the_demo_chain() -> None:
    specs = {"image": TensorSpec("BYTES", (1,)), "other": TensorSpec("INT8", ())}
    specs = DecodeImage(DecodeImageParams()).signature(specs)
    assert specs["image"] == TensorSpec("UINT8", (None, None, 3))
    specs = Resize(ResizeParams(size=256)).signature(specs)
    assert specs["image"] == TensorSpec("UINT8", (None, None, 3))
    specs = CenterCrop(CenterCropParams(size=224)).signature(specs)
    assert specs["image"] == TensorSpec("UINT8", (224, 224, 3))
    specs = Normalize(NormalizeParams(mean=MEAN, std=STD)).signature(specs)
    assert specs["image"] == TensorSpec("FP32", (224, 224, 3))
    specs = ToNCHW(ToNCHWParams(output="input")).signature(specs)
    assert specs == {"other": TensorSpec("INT8", ()), "input": TensorSpec("FP32", (3, 224, 224))}


def test_signatures_of_other_shapes() -> None:
    assert DecodeImage(DecodeImageParams(mode="L", output="px")).signature(
        {"image": TensorSpec("BYTES", ())}
    ) == {"px": TensorSpec("UINT8", (None, None, 1))}
    assert Resize(ResizeParams(size=(5, 6))).signature(
        {"image": TensorSpec("UINT8", (None, None, 1))}
    ) == {"image": TensorSpec("UINT8", (5, 6, 1))}
    assert CenterCrop(CenterCropParams(size=(2, 3))).signature(
        {"image": TensorSpec("UINT8", (9, 9, 4))}
    ) == {"image": TensorSpec("UINT8", (2, 3, 4))}


@pytest.mark.parametrize(
    ("stage", "specs", "message"),
    [
        (
            DecodeImage(DecodeImageParams()),
            {"image": TensorSpec("FP32", (3,))},
            "'image' must be BYTES[1], got FP32[3]",
        ),
        (
            DecodeImage(DecodeImageParams()),
            {"image": TensorSpec("BYTES", (2,))},
            "must be BYTES[1], got BYTES[2]",
        ),
        (
            DecodeImage(DecodeImageParams(input="photo")),
            {"image": TensorSpec("BYTES", (1,))},
            "decode_image: needs column 'photo', but the batch has image BYTES[1]",
        ),
        (
            Resize(ResizeParams(size=4)),
            {"image": TensorSpec("FP32", (4, 4, 3))},
            "resize: 'image' must be UINT8[h,w,c], got FP32[4,4,3]",
        ),
        (
            Resize(ResizeParams(size=4)),
            {"image": TensorSpec("UINT8", (4, 4))},
            "must be UINT8[h,w,c]",
        ),
        (
            CenterCrop(CenterCropParams(size=4)),
            {"image": TensorSpec("UINT8", (3, 4, 4, 3))},
            "center_crop: 'image' must be UINT8[h,w,c]",
        ),
        (
            CenterCrop(CenterCropParams(size=4)),
            {},
            "needs column 'image', but the batch has nothing",
        ),
        (
            Normalize(NormalizeParams(mean=[0.5], std=[0.5])),
            {"image": TensorSpec("UINT8", (4, 4, 3))},
            "mean and std need 3 values",
        ),
        (
            Normalize(NormalizeParams(mean=MEAN, std=STD)),
            {"image": TensorSpec("UINT8", (None, None, 3))},
            "must be a fixed [h,w,c], got UINT8[?,?,3]",
        ),
        (
            ToNCHW(ToNCHWParams()),
            {"image": TensorSpec("FP32", (3, 4))},
            "to_nchw: 'image' must be [h,w,c], got FP32[3,4]",
        ),
    ],
)
def test_signatures_refuse_misfits(
    stage: object, specs: dict[str, TensorSpec], message: str
) -> None:
    with pytest.raises(GraphError) as e:
        stage.signature(specs)  # type: ignore[attr-defined]
    assert message in str(e.value)
