"""gpu_decode_image against the CPU chain (decode_image, resize, center_crop, normalize, to_nchw).

On the CPU the decoder is injected: Pillow decodes (as decode_image does), so what is
compared is the stage's own torch code (grouping, resize, rounding, crop, normalisation,
layout) and its rejects. The real nvJPEG path and its parity run only where a GPU is
(marked ``gpu``; ``make gpu-check``).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from PIL import Image

from schemas.errors import GraphError
from schemas.tensors import TensorSpec
from stages.base import Batch, StageContext
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
from stages.preprocess.image_gpu import GpuDecodeImage, GpuDecodeImageParams

torch = pytest.importorskip("torch")

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
LEVEL = (np.array(STD) * 255)[None, :, None, None]  # output units → 0..255 levels


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth picture with edges (gradients and a disc), like a photo more than noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    r = 127 + 100 * np.sin(xx / (7 + seed)) * np.cos(yy / 11)
    g = 255 * xx / w
    b = np.where((xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (min(h, w) / 3) ** 2, 220, 30)
    img = np.stack([r, g, b], -1) + rng.normal(0, 4, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _encode(arr: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _photos() -> list[bytes]:
    """The demo's sample photos where scikit-image is installed, and synthetic ones."""
    out = [_encode(_photo(300, 400, 1)), _encode(_photo(480, 320, 2)), _encode(_photo(300, 400, 3))]
    try:
        from pipeline.tools.samples import sample_jpegs

        out += list(sample_jpegs().values())
    except Exception:  # no scikit-image: the synthetic photos alone
        pass
    return out


def _column(items: list[bytes]) -> np.ndarray:
    col = np.empty((len(items), 1), dtype=object)
    for i, b in enumerate(items):
        col[i, 0] = b
    return col


class PillowDecoder:
    """The injected decoder: Pillow, recording each call; raises like torchvision does."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, encoded: list[Any], device: str) -> list[Any]:
        self.calls.append(len(encoded))
        out = []
        for t in encoded:
            try:
                img = Image.open(io.BytesIO(t.numpy().tobytes()))
                arr = np.asarray(img.convert("RGB"))
            except Exception as e:
                raise RuntimeError(f"Error while decoding: {e}") from None
            out.append(torch.from_numpy(arr.transpose(2, 0, 1).copy()).to(device))
        return out


def _cpu_chain(items: list[bytes], interpolation: str = "bilinear", **kw: Any) -> Batch:
    stages = [
        DecodeImage(DecodeImageParams(max_pixels=kw.get("max_pixels", 40_000_000))),
        Resize(ResizeParams(size=kw.get("resize", 256), interpolation=interpolation)),  # type: ignore[arg-type]
        CenterCrop(CenterCropParams(size=kw.get("crop", 224))),
        Normalize(NormalizeParams(mean=MEAN, std=STD)),
        ToNCHW(ToNCHWParams()),
    ]
    batch = Batch(list(range(len(items))), {"image": _column(items)})
    for s in stages:
        batch = s.process(batch)
    return batch


def _gpu_stage(
    decoder: Any = None, device: str = "cpu", interpolation: str = "bilinear", **kw: Any
) -> GpuDecodeImage:
    params = GpuDecodeImageParams(
        resize=kw.pop("resize", 256),
        crop=kw.pop("crop", 224),
        mean=MEAN,
        std=STD,
        interpolation=interpolation,  # type: ignore[arg-type]
        **kw,
    )
    stage = GpuDecodeImage(params, decoder=decoder if decoder is not None else PillowDecoder())
    stage.setup(StageContext("m", device=device))
    return stage


def _run(stage: GpuDecodeImage, items: list[bytes]) -> Batch:
    return stage.process(Batch(list(range(len(items))), {"image": _column(items)}))


@pytest.mark.parametrize(
    ("interpolation", "max_levels", "mean_levels"),
    [("bilinear", 2.0, 0.25), ("bicubic", 8.0, 0.25), ("nearest", 255.0, 0.5)],
)
def test_matches_the_pillow_chain_within_the_stated_tolerance(
    interpolation: str, max_levels: float, mean_levels: float
) -> None:
    """Nearest picks other pixels at exact ties (any difference there): bounded on the mean."""
    photos = _photos()
    ref = _cpu_chain(photos, interpolation).columns["image"]
    out = _run(_gpu_stage(interpolation=interpolation), photos).columns["image"]
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.float32
    assert out.shape == ref.shape == (len(photos), 3, 224, 224)
    diff = np.abs(out - ref) * LEVEL
    assert diff.max() <= max_levels + 1e-3
    assert diff.mean() <= mean_levels


def test_images_of_one_size_are_resized_together_and_each_size_apart() -> None:
    same = _encode(_photo(300, 400, 1))
    other = _encode(_photo(480, 320, 2))
    items = [same, other, same, same]
    out = _run(_gpu_stage(), items).columns["image"]
    ref = _cpu_chain(items).columns["image"]
    np.testing.assert_array_equal(out[0], out[2])
    assert np.abs(out[1] - ref[1]).max() * LEVEL.max() <= 2.0 + 1e-3


def test_rejects_the_same_inputs_as_the_cpu_chain_with_the_same_reasons() -> None:
    wide, tall = _encode(_photo(300, 400)), _encode(_photo(480, 320))
    items = [wide, b"not an image", b"", _encode(_photo(4000, 3000)), tall, wide]
    kw: dict[str, Any] = {"max_pixels": 10_000_000, "crop": (224, 300)}
    gpu = _run(_gpu_stage(**kw), items)
    cpu = _cpu_chain(items, **kw)
    assert sorted((r, reason) for r, reason, _ in gpu.rejected) == sorted(
        (r, reason) for r, reason, _ in cpu.rejected
    )
    reasons = {r: reason for r, reason, _ in gpu.rejected}
    assert reasons == {1: "bad_image", 2: "bad_image", 3: "image_too_large", 4: "image_too_small"}
    assert gpu.rows == cpu.rows == [0, 5]
    assert gpu.columns["image"].shape == (2, 3, 224, 300)
    assert np.abs(gpu.columns["image"] - cpu.columns["image"]).max() * LEVEL.max() <= 2.0 + 1e-3


def test_an_empty_or_all_rejected_batch_is_an_empty_array_of_the_output_shape() -> None:
    out = _run(_gpu_stage(), [b"junk"])
    assert out.columns["image"].shape == (0, 3, 224, 224)
    assert out.columns["image"].dtype == np.float32


def test_a_jpeg_the_decoder_refuses_is_isolated_and_the_rest_decode() -> None:
    good = _encode(_photo(300, 400))
    truncated = good[: len(good) // 3]  # the header reads; the decode fails
    decoder = PillowDecoder()
    items = [good, good, truncated, good, good]
    out = _run(_gpu_stage(decoder), items)
    assert [(r, reason) for r, reason, _ in out.rejected] == [(2, "bad_image")]
    assert "cannot decode image" in out.rejected[0][2]
    assert out.columns["image"].shape == (4, 3, 224, 224)
    assert out.rows == [0, 1, 3, 4]
    assert decoder.calls[0] == 5
    assert sum(decoder.calls) > 5


def test_png_falls_back_to_pillow_or_is_rejected_as_asked() -> None:
    arr = _photo(300, 400)
    png, jpeg = _encode(arr, "PNG"), _encode(arr)
    decoder = PillowDecoder()
    out = _run(_gpu_stage(decoder), [png, jpeg])
    ref = _cpu_chain([png, jpeg]).columns["image"]
    assert not out.rejected
    assert decoder.calls == [1]
    assert np.abs(out.columns["image"] - ref).max() * LEVEL.max() <= 2.0 + 1e-3
    refused = _run(_gpu_stage(non_jpeg="reject"), [png, jpeg])
    assert [(r, reason) for r, reason, _ in refused.rejected] == [(0, "bad_image")]
    assert "decodes JPEG only; got PNG" in refused.rejected[0][2]


def test_grey_and_cmyk_jpegs_become_rgb_like_pillow() -> None:
    grey = io.BytesIO()
    Image.fromarray(_photo(300, 400)[:, :, 0]).save(grey, "JPEG")
    cmyk = io.BytesIO()
    Image.fromarray(_photo(300, 400)).convert("CMYK").save(cmyk, "JPEG")
    items = [grey.getvalue(), cmyk.getvalue()]
    decoder = PillowDecoder()
    out = _run(_gpu_stage(decoder), items).columns["image"]
    ref = _cpu_chain(items).columns["image"]
    assert decoder.calls == [1]  # grey on the decoder; CMYK through Pillow on the CPU
    assert np.abs(out - ref).max() * LEVEL.max() <= 2.0 + 1e-3


def test_fp16_and_nhwc_are_the_fp32_nchw_result_cast_and_transposed() -> None:
    photos = _photos()[:2]
    base = _run(_gpu_stage(), photos).columns["image"]
    half = _run(_gpu_stage(dtype="FP16", layout="NHWC"), photos).columns["image"]
    assert half.dtype == np.float16
    assert half.shape == (2, 224, 224, 3)
    np.testing.assert_array_equal(half, base.transpose(0, 2, 3, 1).astype(np.float16))


def test_signature_matches_dali_image_and_refuses_lanczos_and_wrong_inputs() -> None:
    stage = GpuDecodeImage(GpuDecodeImageParams(resize=256, crop=224, mean=MEAN, std=STD))
    out = stage.signature({"image": TensorSpec("BYTES", (1,)), "k": TensorSpec("FP32", (2,))})
    assert out == {"k": TensorSpec("FP32", (2,)), "image": TensorSpec("FP32", (3, 224, 224))}
    with pytest.raises(GraphError, match="must be BYTES"):
        stage.signature({"image": TensorSpec("UINT8", (4, 4, 3))})
    lanczos = GpuDecodeImageParams(
        resize=256, crop=224, mean=MEAN, std=STD, interpolation="lanczos"
    )
    with pytest.raises(GraphError, match="'lanczos' has no torch equivalent"):
        GpuDecodeImage(lanczos).signature({"image": TensorSpec("BYTES", (1,))})


def test_the_pillow_decoder_option_gives_what_the_injected_one_gives() -> None:
    photos = [*_photos()[:2], _encode(_photo(300, 400))[:2000]]
    params = GpuDecodeImageParams(resize=256, crop=224, mean=MEAN, std=STD, decoder="pillow")
    stage = GpuDecodeImage(params)
    stage.setup(StageContext("m"))
    out = _run(stage, photos)
    ref = _run(_gpu_stage(), photos)
    np.testing.assert_array_equal(out.columns["image"], ref.columns["image"])
    assert [(r, reason) for r, reason, _ in out.rejected] == [(2, "bad_image")]


def test_cpu_output_is_numpy_and_leaves_no_device_arrays() -> None:
    stage = _gpu_stage()
    assert not stage.leaves_device_arrays
    assert isinstance(_run(stage, _photos()[:1]).columns["image"], np.ndarray)
    with pytest.raises(GraphError, match="gpu_decode_image: device"):
        _gpu_stage(device="gpu")


# -- on a GPU (make gpu-check) ------------------------------------------------------------


def _cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("torchvision.io", reason="needs torchvision")


@pytest.mark.gpu
def test_nvjpeg_matches_the_pillow_chain_on_the_gpu() -> None:
    _cuda()
    photos = _photos()
    stage = GpuDecodeImage(GpuDecodeImageParams(resize=256, crop=224, mean=MEAN, std=STD))
    stage.setup(StageContext("m", device="cuda:0", stream=torch.cuda.Stream()))
    out = _run(stage, photos).columns["image"]
    assert stage.leaves_device_arrays
    assert isinstance(out, torch.Tensor)
    assert out.device.type == "cuda"
    torch.cuda.synchronize()
    ref = _cpu_chain(photos).columns["image"]
    diff = np.abs(out.cpu().numpy() - ref) * LEVEL
    print(f"nvJPEG chain vs Pillow chain: max {diff.max():.2f} levels, mean {diff.mean():.3f}")
    assert diff.max() <= 24.0
    assert diff.mean() <= 1.5


@pytest.mark.gpu
def test_nvjpeg_isolates_bad_jpegs_and_hands_over_through_dlpack() -> None:
    _cuda()
    good = _encode(_photo(300, 400))
    stage = GpuDecodeImage(GpuDecodeImageParams(resize=256, crop=224, mean=MEAN, std=STD))
    stage.setup(StageContext("m", device="cuda:0"))
    out = _run(stage, [good, good[: len(good) // 3], b"junk", good])
    assert sorted((r, reason) for r, reason, _ in out.rejected) == [
        (1, "bad_image"),
        (2, "bad_image"),
    ]
    x = out.columns["image"]
    assert tuple(x.shape) == (2, 3, 224, 224)
    assert x.is_cuda
    # What the torch backend does with a device column: DLPack, same memory, no host copy.
    assert torch.utils.dlpack.from_dlpack(x).data_ptr() == x.data_ptr()
