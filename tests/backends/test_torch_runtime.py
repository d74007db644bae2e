"""The torch backend: every format against the NumPy reference, signatures, load errors."""

from __future__ import annotations

import contextlib
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gpu_fakes import POOL_SIZE, RecordingStream, Timeline, hide_cupy, install_fake_torch_cuda

from backends import torch_runtime
from backends.base import Backend, ModelSpec
from backends.streams import GpuPipeline
from backends.torch_runtime import TorchBackend
from pipeline.tools.zoo import small_cnn, tiny
from pipeline.tools.zoo.tiny import tiny_mlp_reference
from schemas.errors import BackendError
from schemas.tensors import TensorSpec

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]
SIGNATURE = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [64]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [10]}],
}
FACTORY = {"factory": "pipeline.tools.zoo.tiny:tiny_mlp_module", **SIGNATURE}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models")
    tiny.export_tiny_mlp_torchscript(out)
    tiny.export_tiny_mlp_exported(out)
    tiny.export_tiny_mlp_state_dict(out)
    tiny.export_tiny_mlp_onnx(out)
    return out


def _load(path: Path, options: dict[str, Any] | None = None, device: str = "cpu") -> TorchBackend:
    backend = TorchBackend()
    backend.load(ModelSpec("tiny", path, options or {}), device)
    return backend


def _x(n: int) -> np.ndarray[Any, Any]:
    return np.random.default_rng(n).standard_normal((n, 64)).astype(np.float32)


def test_is_a_backend() -> None:
    assert isinstance(TorchBackend(), Backend)


@pytest.mark.parametrize(
    ("file", "options"),
    [("tiny_mlp.pt", {}), ("tiny_mlp.pt2", {}), ("tiny_mlp.pth", FACTORY)],
    ids=["torchscript", "export", "factory"],
)
@pytest.mark.parametrize("n", [1, 37])
def test_every_format_matches_numpy(
    models: Path, file: str, options: dict[str, Any], n: int
) -> None:
    backend = TorchBackend()
    info = backend.load(ModelSpec("tiny", models / file, options), "cpu")
    assert info.inputs == {"x": TensorSpec("FP32", (64,))}
    assert info.outputs == {"logits": TensorSpec("FP32", (10,))}
    assert info.device == "cpu"
    x = _x(n)
    out = backend.infer({"x": x})
    assert list(out) == ["logits"]
    assert (out["logits"].shape, out["logits"].dtype) == ((n, 10), np.float32)
    np.testing.assert_allclose(out["logits"], tiny_mlp_reference(x), rtol=0, atol=1e-5)


def test_an_exported_program_reports_its_batch_limit(models: Path) -> None:
    backend = TorchBackend()
    assert backend.load(ModelSpec("tiny", models / "tiny_mlp.pt2"), "cpu").max_batch_size == 4096
    assert backend.load(ModelSpec("tiny", models / "tiny_mlp.pt"), "cpu").max_batch_size is None


@pytest.mark.parametrize(("precision", "atol"), [("bf16", 0.05), ("fp16", 0.01)])
def test_half_precision_stays_close_and_returns_the_signature_dtype(
    models: Path, precision: str, atol: float
) -> None:
    x = _x(16)
    out = _load(models / "tiny_mlp.pt", {"precision": precision}).infer({"x": x})["logits"]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, tiny_mlp_reference(x), rtol=0, atol=atol)
    assert not np.allclose(out, tiny_mlp_reference(x), rtol=0, atol=1e-6)  # it really ran halved


def test_read_only_inputs_are_served(models: Path) -> None:
    x = _x(3)
    frozen = np.frombuffer(x.tobytes(), dtype=np.float32).reshape(3, 64)
    assert not frozen.flags.writeable
    out = _load(models / "tiny_mlp.pt").infer({"x": frozen})
    np.testing.assert_allclose(out["logits"], tiny_mlp_reference(x), atol=1e-5)


def test_cpu_inputs_and_outputs_share_memory_with_numpy(models: Path) -> None:
    """No copy between NumPy and the module on the CPU path (the issue asks for that)."""
    seen: list[Any] = []

    class Identity(torch.nn.Module):  # type: ignore[misc]
        def forward(self, x: Any) -> Any:
            seen.append(x)
            return x

    backend = TorchBackend()
    backend.load(ModelSpec("id", models / "tiny_mlp.pt", SIGNATURE), "cpu")
    backend._module = Identity()
    backend._outputs = {"logits": TensorSpec("FP32", (64,))}
    x = _x(4)
    out = backend.infer({"x": x})["logits"]
    assert np.shares_memory(seen[0].numpy(), x)
    assert np.shares_memory(out, x)


def test_declared_options_name_tuple_and_dict_outputs(tmp_path: Path) -> None:
    class Both(torch.nn.Module):  # type: ignore[misc]
        def forward(self, x: Any) -> Any:
            return x.sum(dim=1, keepdim=True), x * 2

    class AsDict(torch.nn.Module):  # type: ignore[misc]
        def forward(self, x: Any) -> Any:
            return {"double": x * 2, "total": x.sum(dim=1, keepdim=True)}

    declared = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [3]}],
        "outputs": [
            {"name": "total", "datatype": "FP32", "shape": [1]},
            {"name": "double", "datatype": "FP32", "shape": [3]},
        ],
    }
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    for module in (Both(), AsDict()):
        path = tmp_path / f"{type(module).__name__}.pt"
        traced = torch.jit.trace(module, torch.from_numpy(x), strict=False)
        torch.jit.save(traced, str(path))
        out = _load(path, declared).infer({"x": x})
        assert list(out) == ["total", "double"]
        np.testing.assert_array_equal(out["total"], [[3], [12]])
        np.testing.assert_array_equal(out["double"], x * 2)


def test_a_module_returning_the_wrong_number_of_outputs_is_an_error(tmp_path: Path) -> None:
    class Two(torch.nn.Module):  # type: ignore[misc]
        def forward(self, x: Any) -> Any:
            return x, x

    path = tmp_path / "two.pt"
    torch.jit.save(torch.jit.trace(Two(), torch.zeros(1, 64)), str(path))
    backend = _load(path, SIGNATURE)
    with pytest.raises(BackendError, match=r"returned 2 tensor\(s\); the signature names"):
        backend.infer({"x": _x(1)})


@pytest.mark.image_model
@pytest.mark.parametrize("file", ["efficientnet_lite0.pt", "efficientnet_lite0.pt2"])
def test_efficientnet_formats_match_the_onnx_export(file: str) -> None:
    onnx_path = ROOT / "models" / "efficientnet_lite0.onnx"
    path = ROOT / "models" / file
    if not (onnx_path.exists() and path.exists()):
        pytest.skip("models/ lacks the EfficientNet exports: run `kp-pipeline models export`")
    from backends.onnx_runtime import OnnxRuntimeBackend

    x = np.random.default_rng(3).uniform(-1, 1, (2, 3, 224, 224)).astype(np.float32)
    ort = OnnxRuntimeBackend()
    ort.load(ModelSpec("e", onnx_path), "cpu")
    want = ort.infer({"input": x})["logits"]
    backend = TorchBackend()
    info = backend.load(ModelSpec("e", path), "cpu")
    assert info.inputs == {"input": TensorSpec("FP32", (3, 224, 224))}
    np.testing.assert_allclose(backend.infer({"input": x})["logits"], want, rtol=0, atol=1e-4)


def test_small_cnn_torchscript_matches_its_onnx_twin(tmp_path: Path) -> None:
    from backends.onnx_runtime import OnnxRuntimeBackend

    onnx_path = small_cnn.export_small_cnn_onnx(tmp_path)
    ts_path = small_cnn.export_small_cnn_torchscript(tmp_path)
    x = np.random.default_rng(5).standard_normal((3, 3, 64, 64)).astype(np.float32)
    ort = OnnxRuntimeBackend()
    ort.load(ModelSpec("c", onnx_path), "cpu")
    got = _load(ts_path).infer({"x": x})["logits"]
    np.testing.assert_allclose(got, ort.infer({"x": x})["logits"], rtol=0, atol=1e-4)


# -- refusals ---------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match=f"no model file at {tmp_path / 'none.pt'}"):
        _load(tmp_path / "none.pt")


def test_an_onnx_file_is_not_a_torch_model(models: Path) -> None:
    with pytest.raises(BackendError, match="is not a TorchScript archive \\(not a zip archive\\)"):
        _load(models / "tiny_mlp.onnx")


def test_a_program_read_as_torchscript_names_the_expected_format(models: Path) -> None:
    with pytest.raises(
        BackendError, match="is not a TorchScript archive \\(format 'torchscript'\\)"
    ):
        _load(models / "tiny_mlp.pt2", {"format": "torchscript"})


def test_a_zip_that_is_neither_format_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt2"
    with zipfile.ZipFile(junk, "w") as z:
        z.writestr("hello.txt", "not a program")
    with pytest.raises(BackendError, match=r"is not a torch\.export program"):
        _load(junk)


def test_torchscript_without_a_signature_asks_for_one(tmp_path: Path) -> None:
    path = tmp_path / "bare.pt"
    torch.jit.save(torch.jit.script(torch.nn.ReLU()), str(path))
    with pytest.raises(BackendError, match=r"carries no signature: declare options\.inputs"):
        _load(path)


def test_a_declared_signature_must_agree_with_the_program(models: Path) -> None:
    wrong = {**SIGNATURE, "inputs": [{"name": "x", "datatype": "INT64", "shape": [64]}]}
    with pytest.raises(BackendError, match="declared INT64\\[64\\], but the program was exported"):
        _load(models / "tiny_mlp.pt2", wrong)


def test_an_embedded_signature_that_is_not_json_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.pt"
    torch.jit.save(
        torch.jit.script(torch.nn.ReLU()), str(path), _extra_files={"kp_signature.json": "{"}
    )
    with pytest.raises(BackendError, match="is not a signature"):
        _load(path)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("no.such.module:build", "options.factory: torch module factory 'no.such.module:build'"),
        ("pipeline.tools.zoo.tiny:nothing_here", "has no 'nothing_here'"),
        (
            "pipeline.tools.zoo.tiny:tiny_weights",
            "tiny_weights failed on|returned tuple, not a Module",
        ),
    ],
)
def test_factory_failures_name_the_factory(models: Path, factory: str, message: str) -> None:
    with pytest.raises(BackendError, match=message):
        _load(models / "tiny_mlp.pth", {**SIGNATURE, "factory": factory})


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"precison": "fp16"}, "options.precison: unknown option"),
        ({"precision": "int4"}, "options.precision: Input should be"),
        ({"format": "factory"}, "options.format is 'factory' but options.factory names none"),
        ({"inputs": [{"name": "x", "datatype": "FLOAT", "shape": [64]}]}, "unknown datatype"),
    ],
)
def test_bad_options(models: Path, options: dict[str, Any], field: str) -> None:
    with pytest.raises(BackendError, match=field):
        _load(models / "tiny_mlp.pt", options)


def test_a_gpu_that_torch_cannot_see_is_refused(models: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(BackendError, match="torch sees no CUDA device"):
        _load(models / "tiny_mlp.pt", device="cuda:0")
    assert TorchBackend().load(ModelSpec("t", models / "tiny_mlp.pt"), "auto").device == "cpu"


def test_infer_before_load_and_after_unload(models: Path) -> None:
    with pytest.raises(BackendError, match=r"infer\(\) before load\(\)"):
        TorchBackend().infer({})
    backend = _load(models / "tiny_mlp.pt")
    backend.unload()
    with pytest.raises(BackendError, match=r"infer\(\) before load\(\)"):
        backend.infer({"x": _x(1)})


def test_probe_reports_the_version_and_devices() -> None:
    probe = TorchBackend.probe()
    assert probe.usable
    assert f"torch {torch.__version__}" in probe.detail
    assert "CUDA devices:" in probe.detail


def test_the_embedded_signature_is_what_the_zoo_wrote(models: Path) -> None:
    extra = {"kp_signature.json": ""}
    torch.jit.load(str(models / "tiny_mlp.pt"), _extra_files=extra)
    assert json.loads(extra["kp_signature.json"]) == SIGNATURE


def test_past_torchs_stream_pool_every_cuda_instance_still_owns_its_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """torch.cuda.Stream() would hand the 33rd instance the 1st one's stream (faked here)."""
    hide_cupy(monkeypatch)
    cuda = install_fake_torch_cuda(monkeypatch)
    monkeypatch.setattr(
        torch_runtime, "_load_module", lambda *args: (torch.nn.Identity(), {})
    )  # nothing moves to a GPU here
    backends = [_load(Path("tiny.pth"), FACTORY, device="cuda:0") for _ in range(POOL_SIZE + 8)]
    handles = [b.stream.cuda_stream for b in backends]
    pre = [b.preprocess_stream.cuda_stream for b in backends]
    assert len(set(handles) | set(pre)) == 2 * (POOL_SIZE + 8)  # two per instance, all own
    assert cuda.pooled == 0
    backends[0].unload()
    assert sorted(cuda.destroyed) == sorted([handles[0], pre[0]])
    assert backends[0].stream is None
    assert backends[0].preprocess_stream is None


class _Logged(torch.nn.Module):  # type: ignore[misc]
    """A module whose every run is logged as a launch on the recording inference stream."""

    def __init__(self, inner: Any, stream: RecordingStream) -> None:
        super().__init__()
        self.inner, self.stream, self.runs = inner, stream, 0

    def forward(self, x: Any) -> Any:
        self.stream.launch(f"model:{self.runs}")
        self.runs += 1
        return self.inner(x)


def test_the_cuda_path_waits_for_ready_and_makes_one_host_wait_per_batch(
    models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU branch of `infer`, run on the CPU with a recording fake of the two streams."""
    backend = _load(models / "tiny_mlp.pth", FACTORY)
    timeline = Timeline()
    gpu = GpuPipeline(timeline.stream("pre"), timeline.stream("infer"))
    assert isinstance(gpu.inference, RecordingStream)
    backend._module = _Logged(backend._module, gpu.inference)
    backend._stream, backend._pipeline = gpu.inference, gpu
    backend._pinned = _Unpinned()
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    for n in range(3):
        assert isinstance(gpu.preprocess, RecordingStream)
        gpu.preprocess.launch(f"pre:{n}")
        gpu.hand_over(gpu.preprocessed())
        x = _x(4 + n)
        out = backend.infer({"x": x})["logits"]
        np.testing.assert_allclose(out, tiny_mlp_reference(x), rtol=0, atol=1e-5)
        (ready,) = timeline.waited_before("infer", f"model:{n}")
        assert timeline.covers(ready, f"pre:{n}")
    assert gpu.host_waits == 3
    assert all(timeline.covers(done, f"model:{n}") for n, done in enumerate(timeline.host_waits()))


class _Unpinned(torch_runtime.PinnedBuffers):
    """`PinnedBuffers` handing out ordinary memory (pinning needs a CUDA build of torch)."""

    def view(self, name: str, shape: tuple[int, ...], dtype: Any, run: Any = None) -> Any:
        count = int(np.prod(shape)) if shape else 1
        return torch.empty(count, dtype=dtype).view(shape)


# -- GPU: run where a CUDA device exists (none on the project's machines) -------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_instances_own_streams_and_match_the_cpu(models: Path) -> None:
    a = _load(models / "tiny_mlp.pt", device="cuda:0")
    b = _load(models / "tiny_mlp.pt", device="cuda:0")
    assert a._stream is not None
    assert b._stream is not None
    assert a._stream.cuda_stream != b._stream.cuda_stream
    x = _x(33)
    for backend in (a, b):
        out = backend.infer({"x": x})["logits"]
        np.testing.assert_allclose(out, tiny_mlp_reference(x), rtol=0, atol=1e-4)
    on_device = torch.from_numpy(x).cuda()
    np.testing.assert_allclose(
        a.infer({"x": on_device})["logits"], tiny_mlp_reference(x), rtol=0, atol=1e-4
    )
