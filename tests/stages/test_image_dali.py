"""dali_image against the CPU chain (decode_image, resize, center_crop, normalize, to_nchw).

DALI's CPU pipeline runs here for real; the tolerances are the ones stated in the
module's docstring, in intensity levels of the 0..255 image. The GPU path (nvJPEG) is
tested only where a GPU with DALI exists, which no machine of the project has.
"""

from __future__ import annotations

import io
import sys
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from schemas import devices
from schemas.errors import GraphError
from schemas.tensors import TensorSpec
from stages.base import Batch, StageContext
from stages.preprocess import image_dali
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
from stages.preprocess.image_dali import DaliImage, DaliImageParams

pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI (pip install 'kp-pipeline[dali]')")


MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
LEVEL = (np.array(STD) * 255)[None, :, None, None]  # output units → 0..255 levels


def _encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def _column(items: list[bytes]) -> np.ndarray:
    col = np.empty((len(items), 1), dtype=object)
    for i, b in enumerate(items):
        col[i, 0] = b
    return col


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _reference(items: list[bytes], resize: int, crop: int, interpolation: str, **kw: Any) -> Batch:
    batch = Batch(list(range(len(items))), {"image": _column(items)})
    for stage in (
        DecodeImage(DecodeImageParams(**kw)),
        Resize(ResizeParams(size=resize, interpolation=interpolation)),  # type: ignore[arg-type]
        CenterCrop(CenterCropParams(size=crop)),
        Normalize(NormalizeParams(mean=MEAN, std=STD)),
        ToNCHW(ToNCHWParams()),
    ):
        batch = stage.process(batch)
    return batch


def _dali(items: list[bytes], resize: int, crop: int, interpolation: str, **kw: Any) -> Batch:
    params = DaliImageParams(
        resize=resize,
        crop=crop,
        interpolation=interpolation,  # type: ignore[arg-type]
        mean=MEAN,
        std=STD,
        **kw,
    )
    stage = DaliImage(params)
    stage.setup(StageContext("m"))
    try:
        return stage.process(Batch(list(range(len(items))), {"image": _column(items)}))
    finally:
        stage.close()


def _levels(a: Batch, b: Batch) -> np.ndarray:
    """|a - b| in 0..255 levels, per element."""
    assert a.rows == b.rows
    return np.abs(np.asarray(a.columns["image"]) - np.asarray(b.columns["image"])) * LEVEL


def _border(size: int, resized: int, crop: int, band: int = 2) -> np.ndarray:
    """Which crop positions lie within ``band`` pixels of the resized image's edge."""
    pos = np.arange(crop) + (resized - crop) // 2
    return (pos < band) | (pos >= resized - band)


@pytest.fixture(scope="module")
def demo() -> list[bytes]:
    pytest.importorskip("skimage.data")
    from pipeline.tools.samples import sample_jpegs

    return list(sample_jpegs().values())


GEOMETRIES = [(256, 224), (224, 224), (64, 56)]


@pytest.mark.parametrize(("resize", "crop"), GEOMETRIES)
def test_bilinear_is_within_one_level_of_pillow_on_the_demo_photos(
    demo: list[bytes], resize: int, crop: int
) -> None:
    got, want = _dali(demo, resize, crop, "bilinear"), _reference(demo, resize, crop, "bilinear")
    diff = _levels(got, want)
    for i, img in enumerate(Image.open(io.BytesIO(b)) for b in demo):
        th, tw = Resize(ResizeParams(size=resize)).target(img.height, img.width)
        inner = ~_border(img.height, th, crop)[:, None] & ~_border(img.width, tw, crop)[None, :]
        assert diff[i][:, inner].max() <= 1 + 1e-3
    assert diff.mean() <= 0.25


@pytest.mark.parametrize("interpolation", ["bicubic", "lanczos"])
@pytest.mark.parametrize(("resize", "crop"), GEOMETRIES)
def test_bicubic_and_lanczos_are_close_to_pillow_on_the_demo_photos(
    demo: list[bytes], interpolation: str, resize: int, crop: int
) -> None:
    diff = _levels(
        _dali(demo, resize, crop, interpolation), _reference(demo, resize, crop, interpolation)
    )
    assert diff.max() <= 24
    assert np.mean(diff > 1 + 1e-3) <= 0.01
    assert diff.mean() <= 0.25


def _ties(size: int, resized: int, crop: int) -> np.ndarray:
    """Crop positions whose nearest-neighbour sample falls exactly between two pixels."""
    pos = (np.arange(crop) + (resized - crop) // 2 + 0.5) * size / resized
    return np.abs(pos - np.round(pos)) < 1e-3


def _assert_nearest_differs_only_at_ties(items: list[bytes], resize: int, crop: int) -> None:
    got, want = _dali(items, resize, crop, "nearest"), _reference(items, resize, crop, "nearest")
    assert (got.rows, got.rejected) == (want.rows, want.rejected)
    diff = _levels(got, want).max(axis=1) > 1e-3  # [n, h, w]
    for i, row in enumerate(got.rows):
        img = Image.open(io.BytesIO(items[row]))
        th, tw = Resize(ResizeParams(size=resize)).target(img.height, img.width)
        allowed = _ties(img.height, th, crop)[:, None] | _ties(img.width, tw, crop)[None, :]
        assert not (diff[i] & ~allowed).any()


@pytest.mark.parametrize(("resize", "crop"), GEOMETRIES)
def test_nearest_differs_only_where_a_sample_ties(
    demo: list[bytes], resize: int, crop: int
) -> None:
    _assert_nearest_differs_only_at_ties(demo, resize, crop)


sizes = st.tuples(st.integers(2, 160), st.integers(2, 160))
geometry = st.integers(1, 48).flatmap(lambda r: st.tuples(st.just(r), st.integers(1, r)))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=st.lists(sizes, min_size=1, max_size=4), geo=geometry, seed=st.integers(0, 99))
def test_random_sizes_and_aspect_ratios_match_the_cpu_chain(
    shapes: list[tuple[int, int]], geo: tuple[int, int], seed: int
) -> None:
    resize, crop = geo
    items = [_encode(_photo(h, w, seed + i)) for i, (h, w) in enumerate(shapes)]
    got, want = _dali(items, resize, crop, "bilinear"), _reference(items, resize, crop, "bilinear")
    assert (got.rows, got.rejected) == (want.rows, want.rejected)  # image_too_small alike
    assert got.columns["image"].shape == (len(got.rows), 3, crop, crop)
    diff = _levels(got, want)
    for i, row in enumerate(got.rows):
        h, w = shapes[row]
        th, tw = Resize(ResizeParams(size=resize)).target(h, w)
        inner = ~_border(h, th, crop)[:, None] & ~_border(w, tw, crop)[None, :]
        assert diff[i][:, inner].max(initial=0) <= 1 + 1e-3
    _assert_nearest_differs_only_at_ties(items, resize, crop)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK"])
def test_other_colour_modes_decode_like_pillow(mode: str) -> None:
    img = Image.fromarray(_photo(40, 30)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG" if mode == "CMYK" else "PNG")
    got, want = (
        _dali([buf.getvalue()], 30, 30, "bilinear"),
        _reference([buf.getvalue()], 30, 30, "bilinear"),
    )
    assert _levels(got, want).max() <= 1e-3  # no resize: decoding alone, bit-exact


def test_fp16_and_nhwc_are_the_same_numbers() -> None:
    items = [_encode(_photo(50, 70, i)) for i in range(3)]
    base = _dali(items, 32, 24, "bilinear").columns["image"]
    half = _dali(items, 32, 24, "bilinear", dtype="FP16").columns["image"]
    nhwc = _dali(items, 32, 24, "bilinear", layout="NHWC").columns["image"]
    assert (half.dtype, nhwc.dtype, nhwc.shape) == (np.float16, np.float32, (3, 24, 24, 3))
    np.testing.assert_allclose(half, base, rtol=2**-10, atol=2**-14)
    np.testing.assert_array_equal(nhwc, base.transpose(0, 2, 3, 1))


def test_bad_images_are_rejected_and_the_rest_served() -> None:
    good = [_encode(_photo(40, 50, i)) for i in range(4)]
    jpeg = _encode(_photo(60, 60, 9), "JPEG")
    gif = _encode(_photo(40, 40), "GIF")
    items = [
        good[0],
        b"not an image",  # Pillow cannot read a header: never reaches DALI
        jpeg[: len(jpeg) // 2],  # a header, then DALI fails: found by splitting the run
        _encode(_photo(100, 100)),
        b"",
        good[1],
        jpeg[:-10],
        gif,
        _encode(_photo(8, 8)),  # upscaled to 32x32
        _encode(_photo(4, 200)),  # upscaled to 32x1600
        good[2],
        good[3],
    ]
    got = _dali(items, 32, 32, "bilinear", max_pixels=5000, max_batch_size=4)
    reasons = {row: reason for row, reason, _ in got.rejected}
    assert reasons == {
        1: "bad_image",
        2: "bad_image",
        3: "image_too_large",
        4: "bad_image",
        6: "bad_image",
        7: "bad_image",
    }
    messages = {row: message for row, _, message in got.rejected}
    assert messages[1].startswith("cannot decode image: UnidentifiedImageError")
    assert messages[2] == "cannot decode image: DALI: Failed to decode"
    assert messages[3] == "100x100 pixels is over max_pixels=5000"
    assert messages[7] == "cannot decode image: DALI does not decode GIF"
    assert got.rows == [0, 5, 8, 9, 10, 11]
    clean = _dali([items[r] for r in got.rows], 32, 32, "bilinear")
    np.testing.assert_array_equal(got.columns["image"], clean.columns["image"])


def test_images_smaller_than_the_crop_are_rejected_like_center_crop() -> None:
    items = [_encode(_photo(40, 40)), _encode(_photo(4, 200))]
    got = _dali(items, 16, 20, "bilinear")
    want = _reference(items, 16, 20, "bilinear")
    assert (
        got.rejected
        == want.rejected
        == [
            (0, "image_too_small", "16x16 is smaller than the 20x20 crop"),
            (1, "image_too_small", "800x16 is smaller than the 20x20 crop"),
        ]
    )
    assert got.columns["image"].shape == (0, 3, 20, 20)


def test_decompression_bombs_are_too_large(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    got = _dali([_encode(_photo(12, 12)), _encode(_photo(30, 30))], 8, 8, "bilinear")
    assert [reason for _, reason, _ in got.rejected] == ["image_too_large"] * 2


def test_batches_larger_than_dalis_are_split_and_keep_their_order() -> None:
    items = [_encode(_photo(20 + i, 30 - i, i)) for i in range(10)]
    whole = _dali(items, 16, 16, "bilinear")
    split = _dali(items, 16, 16, "bilinear", max_batch_size=3)
    assert split.rows == list(range(10))
    np.testing.assert_array_equal(split.columns["image"], whole.columns["image"])


def test_a_flat_list_column_other_columns_and_a_renamed_output() -> None:
    stage = DaliImage(
        DaliImageParams(input="jpeg", output="input", resize=8, crop=8, mean=MEAN, std=STD)
    )
    out = stage.process(Batch([0], {"jpeg": [_encode(_photo(8, 8))], "other": np.zeros((1, 2))}))
    assert set(out.columns) == {"input", "other"}
    assert out.columns["input"].shape == (1, 3, 8, 8)


def test_errors_that_are_not_the_images_fail_the_batch_and_the_stage_recovers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stage = DaliImage(DaliImageParams(resize=8, crop=8, mean=MEAN, std=STD))
    batch = Batch([0], {"image": [_encode(_photo(8, 8))]})
    broken = stage._build()
    broken.run = lambda **_: (_ for _ in ()).throw(RuntimeError("Error in CPU operator resize"))
    monkeypatch.setattr(stage, "_pipe", broken)
    with pytest.raises(RuntimeError, match="resize"):
        stage.process(batch)  # not bisected into per-image rejects
    assert stage.process(batch).rows == [0]  # rebuilt after the error
    stage.close()
    assert stage.process(batch).rows == [0]  # and after close


def test_signature_declares_the_model_input() -> None:
    stage = DaliImage(DaliImageParams(output="input", resize=256, crop=224, mean=MEAN, std=STD))
    specs = {"image": TensorSpec("BYTES", (1,)), "other": TensorSpec("INT8", ())}
    assert stage.signature(specs) == {
        "other": TensorSpec("INT8", ()),
        "input": TensorSpec("FP32", (3, 224, 224)),
    }
    nhwc = DaliImage(
        DaliImageParams(resize=8, crop=(4, 6), mean=MEAN, std=STD, dtype="FP16", layout="NHWC")
    )
    assert nhwc.signature({"image": TensorSpec("BYTES", ())}) == {
        "image": TensorSpec("FP16", (4, 6, 3))
    }


@pytest.mark.parametrize(
    ("params", "specs", "message"),
    [
        ({}, {"image": TensorSpec("UINT8", (4, 4, 3))}, "'image' must be BYTES[1], got UINT8"),
        ({}, {"image": TensorSpec("BYTES", (2,))}, "must be BYTES[1], got BYTES[2]"),
        ({"input": "x"}, {"image": TensorSpec("BYTES", (1,))}, "needs column 'x'"),
        ({"mean": [0.5]}, {"image": TensorSpec("BYTES", (1,))}, "mean and std need 3 values"),
    ],
)
def test_signature_refuses_misfits(
    params: dict[str, Any], specs: dict[str, TensorSpec], message: str
) -> None:
    stage = DaliImage(
        DaliImageParams(**{"resize": 8, "crop": 8, "mean": MEAN, "std": STD, **params})
    )
    with pytest.raises(GraphError, match="dali_image") as e:
        stage.signature(specs)
    assert message in str(e.value)


def _has_cuda() -> bool:
    from nvidia.dali import backend

    return bool(backend.GetCUDADeviceCount() > 0)


def test_auto_is_the_cpu_without_a_gpu_and_a_missing_gpu_is_refused() -> None:
    if _has_cuda():
        pytest.skip("this machine has a GPU")
    stage = DaliImage(DaliImageParams(resize=8, crop=8, mean=MEAN, std=STD))
    stage.setup(StageContext("m", device="auto"))
    assert stage.process(Batch([0], {"image": [_encode(_photo(8, 8))]})).rows == [0]
    with pytest.raises(GraphError, match="dali_image: cannot build DALI on cuda:0"):
        stage.setup(StageContext("m", device="cuda:0"))
    with pytest.raises(GraphError, match="dali_image: device 'tpu'"):
        stage.setup(StageContext("m", device="tpu"))


# -- GPU: nvJPEG and DALI's GPU operators. No machine of the project can run these. ------


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU that DALI can use")
def test_gpu_pipeline_hands_a_device_array_matching_the_cpu(demo: list[bytes]) -> None:
    cupy = pytest.importorskip("cupy")
    items = [*demo, _encode(_photo(300, 451))]
    stage = DaliImage(DaliImageParams(resize=256, crop=224, mean=MEAN, std=STD))
    stream = cupy.cuda.Stream(non_blocking=True)
    stage.setup(StageContext("m", device="cuda:0", stream=stream.ptr))
    out = stage.process(Batch(list(range(len(items))), {"image": _column(items)}))
    y = out.columns["image"]
    assert isinstance(y, cupy.ndarray)
    assert (y.device.id, y.shape, y.dtype) == (0, (4, 3, 224, 224), cupy.float32)
    stream.synchronize()
    cpu = _dali(items, 256, 224, "bilinear").columns["image"]
    diff = np.abs(cupy.asnumpy(y) - cpu) * LEVEL
    assert diff[-1].max() <= 1 + 1e-3  # PNG: decoded on the host; GPU resize, same filter
    assert diff.mean() <= 0.5  # JPEG: nvJPEG's IDCT is not libjpeg-turbo's


@pytest.mark.parametrize(
    ("driver", "hint"),
    [
        (13, "pip install 'kp-pipeline[gpu-cu13]'"),
        (12, "pip install 'kp-pipeline[gpu-cu12]'"),
        (
            None,  # no CUDA: DALI's CPU operators, from the `dali` extra
            "pip install 'kp-pipeline[dali]' (CPU operators), or 'kp-pipeline[gpu-cu12]' "
            "(CUDA 12) or 'kp-pipeline[gpu-cu13]' (CUDA 13) on a GPU",
        ),
    ],
)
def test_without_dali_the_hint_names_the_extra_for_the_machines_cuda(
    monkeypatch: pytest.MonkeyPatch, driver: int | None, hint: str
) -> None:
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # `import nvidia.dali` fails
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(version=SimpleNamespace(cuda=None)))
    monkeypatch.setattr(devices, "_driver_cuda_major", lambda: driver, raising=False)
    with pytest.raises(GraphError) as e:
        image_dali._dali()
    assert str(e.value) == f"dali_image needs NVIDIA DALI: {hint}"
