"""The TensorFlow backend on real SavedModels: signatures, numerics, load errors."""

from __future__ import annotations

import logging
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gpu_fakes import FakeStream

from backends import devices, tensorflow_runtime
from backends.base import Backend, ModelSpec
from backends.streams import GpuPipeline
from backends.tensorflow_runtime import TensorFlowBackend
from pipeline.tools.zoo.keras_twins import export_small_cnn_savedmodel, export_tiny_mlp_savedmodel
from pipeline.tools.zoo.small_cnn import export_small_cnn_onnx
from pipeline.tools.zoo.tiny import tiny_mlp_reference
from schemas.errors import BackendError
from schemas.tensors import TensorSpec

tf = pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both SavedModels and the CNN's ONNX twin, exported once for the module."""
    out = tmp_path_factory.mktemp("tf_models")
    return {
        "tiny": export_tiny_mlp_savedmodel(out),
        "cnn": export_small_cnn_savedmodel(out),
        "cnn_onnx": export_small_cnn_onnx(out),
    }


@pytest.fixture(scope="module")
def odd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SavedModel with a fixed batch, integer and string inputs, two outputs."""
    path = tmp_path_factory.mktemp("odd") / "odd.savedmodel"

    def fn(ids: Any, text: Any) -> dict[str, Any]:
        return {"n": tf.strings.length(text), "flag": ids > 0}

    sig = tf.function(
        fn,
        input_signature=[
            tf.TensorSpec([8, 4], tf.int64, name="ids"),
            tf.TensorSpec([8], tf.string, name="text"),
        ],
    )
    tf.saved_model.save(tf.Module(), str(path), signatures={"serving_default": sig, "other": sig})
    return path


def test_is_a_backend() -> None:
    assert isinstance(TensorFlowBackend(), Backend)


def test_probe_is_usable_and_names_the_version() -> None:
    probe = TensorFlowBackend.probe()
    assert probe.usable
    assert f"tensorflow {tf.__version__}" in probe.detail


def test_tiny_signature_has_a_free_batch(models: dict[str, Path]) -> None:
    info = TensorFlowBackend().load(ModelSpec("tiny", models["tiny"]), "cpu")
    assert info.inputs == {"x": TensorSpec("FP32", (64,))}
    assert info.outputs == {"logits": TensorSpec("FP32", (10,))}
    assert info.max_batch_size is None
    assert info.device == "cpu"


def test_cnn_signature_is_nchw(models: dict[str, Path]) -> None:
    info = TensorFlowBackend().load(ModelSpec("cnn", models["cnn"]), "auto")
    assert info.inputs == {"x": TensorSpec("FP32", (3, 64, 64))}
    assert info.outputs == {"logits": TensorSpec("FP32", (10,))}
    assert info.device == "cpu"  # auto, with no GPU seen


def test_fixed_batch_and_other_dtypes(odd: Path) -> None:
    backend = TensorFlowBackend()
    info = backend.load(ModelSpec("odd", odd), "cpu")
    assert info.inputs == {"ids": TensorSpec("INT64", (4,)), "text": TensorSpec("BYTES", ())}
    assert info.outputs == {"flag": TensorSpec("BOOL", (4,)), "n": TensorSpec("INT32", ())}
    assert info.max_batch_size == 8
    ids = np.arange(-16, 16, dtype=np.int64).reshape(8, 4)
    text = np.array([b"x" * i for i in range(8)], dtype=object)
    out = backend.infer({"ids": ids, "text": text})
    assert list(out) == list(info.outputs)
    np.testing.assert_array_equal(out["n"], np.arange(8, dtype=np.int32))
    np.testing.assert_array_equal(out["flag"], ids > 0)


@pytest.mark.parametrize("n", [1, 37])
def test_tiny_results_match_numpy(models: dict[str, Path], n: int) -> None:
    backend = TensorFlowBackend()
    backend.load(ModelSpec("tiny", models["tiny"]), "cpu")
    x = np.random.default_rng(n).standard_normal((n, 64)).astype(np.float32)
    out = backend.infer({"x": x})
    assert list(out) == ["logits"]
    assert (out["logits"].shape, out["logits"].dtype) == ((n, 10), np.float32)
    np.testing.assert_allclose(out["logits"], tiny_mlp_reference(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("n", [1, 5])
def test_cnn_matches_onnx_runtime(models: dict[str, Path], n: int) -> None:
    ort = pytest.importorskip("onnxruntime")
    x = np.random.default_rng(n).standard_normal((n, 3, 64, 64)).astype(np.float32)
    session = ort.InferenceSession(str(models["cnn_onnx"]), providers=["CPUExecutionProvider"])
    [reference] = session.run(["logits"], {"x": x})
    backend = TensorFlowBackend()
    backend.load(ModelSpec("cnn", models["cnn"]), "cpu")
    logits = backend.infer({"x": x})["logits"]
    assert logits.shape == (n, 10)
    np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-4)


def _at_offset(rows: int, offset: int) -> np.ndarray[Any, Any]:
    """A float32 [rows, 64] view whose data starts ``offset`` bytes past a 64-byte boundary."""
    buf = np.zeros(rows * 64 + 32, dtype=np.float32)
    skip = (-buf.ctypes.data % 64 + offset) // 4
    x = buf[skip : skip + rows * 64].reshape(rows, 64)
    x[:] = np.linspace(-2, 2, x.size, dtype=np.float32).reshape(x.shape)
    assert x.ctypes.data % 64 == offset
    return x


@pytest.mark.parametrize("offset", [0, 4, 16])
def test_host_dlpack_and_unaligned_inputs_give_the_same_numbers(
    models: dict[str, Path], offset: int
) -> None:
    """CPU torch tensors take the device-array path; unaligned ones once aborted the process.

    TF's own from_dlpack accepts a pointer that is not 64-byte aligned and then fails a
    CHECK inside the first kernel that reads it (SIGABRT, not an exception).
    """
    torch = pytest.importorskip("torch")
    backend = TensorFlowBackend()
    backend.load(ModelSpec("tiny", models["tiny"]), "cpu")
    x = _at_offset(3, offset)
    for feed in (x, torch.from_numpy(x)):
        out = backend.infer({"x": feed})
        np.testing.assert_allclose(out["logits"], tiny_mlp_reference(x), rtol=0, atol=1e-5)


def test_infer_before_load_and_after_unload_is_refused(models: dict[str, Path]) -> None:
    with pytest.raises(BackendError, match=r"infer\(\) before load\(\)"):
        TensorFlowBackend().infer({})
    backend = TensorFlowBackend()
    backend.load(ModelSpec("tiny", models["tiny"]), "cpu")
    backend.unload()
    with pytest.raises(BackendError, match=r"infer\(\) before load\(\)"):
        backend.infer({"x": np.zeros((1, 64), np.float32)})


def test_bad_batches_are_backend_errors(models: dict[str, Path]) -> None:
    backend = TensorFlowBackend()
    backend.load(ModelSpec("tiny", models["tiny"]), "cpu")
    with pytest.raises(BackendError, match=r"model 'tiny': batch lacks input\(s\) \['x'\]"):
        backend.infer({"y": np.zeros((1, 64), np.float32)})
    with pytest.raises(BackendError, match="model 'tiny': tensorflow"):
        backend.infer({"x": np.zeros((1, 63), np.float32)})


def test_missing_path_is_a_backend_error(tmp_path: Path) -> None:
    missing = tmp_path / "none.savedmodel"
    with pytest.raises(BackendError, match=f"{missing} does not exist") as e:
        TensorFlowBackend().load(ModelSpec("m", missing), "cpu")
    assert "TensorFlow SavedModel directory" in str(e.value)


def test_onnx_file_or_plain_folder_is_not_a_savedmodel(
    models: dict[str, Path], tmp_path: Path
) -> None:
    for path in (models["cnn_onnx"], tmp_path):
        with pytest.raises(BackendError, match="is not a TensorFlow SavedModel directory") as e:
            TensorFlowBackend().load(ModelSpec("m", path), "cpu")
        assert f"{path}" in str(e.value)


def test_unknown_signature_lists_the_known_ones(odd: Path) -> None:
    spec = ModelSpec("m", odd, {"signature": "predict"})
    with pytest.raises(BackendError, match="no signature 'predict'") as e:
        TensorFlowBackend().load(spec, "cpu")
    assert "other, serving_default" in str(e.value)
    info = TensorFlowBackend().load(ModelSpec("m", odd, {"signature": "other"}), "cpu")
    assert set(info.inputs) == {"ids", "text"}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"threads": 2}, "options.threads: unknown option"),
        ({"intra_op_threads": "many"}, "options.intra_op_threads"),
        ({"signature": 3}, "options.signature"),
    ],
)
def test_bad_options_are_backend_errors(
    models: dict[str, Path], options: dict[str, object], message: str
) -> None:
    with pytest.raises(BackendError, match="tensorflow options") as e:
        TensorFlowBackend().load(ModelSpec("m", models["tiny"], options), "cpu")
    assert message in str(e.value)


def test_cuda_without_a_gpu_is_refused(models: dict[str, Path]) -> None:
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    with pytest.raises(BackendError, match="'cuda:0': tensorflow sees no CUDA device"):
        TensorFlowBackend().load(ModelSpec("m", models["tiny"]), "cuda:0")


def test_late_thread_settings_warn_once(
    models: dict[str, Path], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fixture already started TF's runtime, so a new pool size can only be warned about."""
    monkeypatch.setattr(tensorflow_runtime, "_warned", set())
    current = tf.config.threading.get_intra_op_parallelism_threads()
    spec = ModelSpec("m", models["tiny"], {"intra_op_threads": current + 3})
    with caplog.at_level(logging.WARNING, logger="backends.tensorflow_runtime"):
        TensorFlowBackend().load(spec, "cpu")
        TensorFlowBackend().load(spec, "cpu")
    warnings = [r for r in caplog.records if "intra_op_threads" in r.getMessage()]
    assert len(warnings) == 1
    assert "process-wide" in warnings[0].getMessage()


class FakeGPUs:
    """``tf.config``'s device calls on a machine with two GPUs, recording memory growth."""

    def __init__(self, started: bool = False) -> None:
        self.gpus = [types.SimpleNamespace(name=f"/physical_device:GPU:{i}") for i in (0, 1)]
        self.growth: dict[str, bool | None] = {gpu.name: None for gpu in self.gpus}
        self.started = started
        self.calls: list[tuple[str, bool]] = []

    def list_physical_devices(self, kind: str | None = None) -> list[Any]:
        return list(self.gpus) if kind == "GPU" else []

    def get_memory_growth(self, gpu: Any) -> bool | None:
        return self.growth[gpu.name]

    def set_memory_growth(self, gpu: Any, enable: bool) -> None:
        self.calls.append((gpu.name, enable))
        if self.growth[gpu.name] == enable:
            return
        if self.started:
            raise RuntimeError("Physical devices cannot be modified after being initialized")
        self.growth[gpu.name] = enable


def _fake_gpus(monkeypatch: pytest.MonkeyPatch, gpus: FakeGPUs) -> FakeGPUs:
    monkeypatch.setattr(tf.config, "list_physical_devices", gpus.list_physical_devices)
    monkeypatch.setattr(tf.config.experimental, "get_memory_growth", gpus.get_memory_growth)
    monkeypatch.setattr(tf.config.experimental, "set_memory_growth", gpus.set_memory_growth)
    monkeypatch.setattr(tensorflow_runtime, "_warned", set())
    return gpus


def test_memory_growth_is_on_for_every_gpu_before_the_runtime_starts(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Otherwise TF reserves nearly all GPU memory at start, whatever the model's device."""
    gpus = _fake_gpus(monkeypatch, FakeGPUs())
    TensorFlowBackend().load(ModelSpec("m", models["tiny"]), "cpu")
    assert gpus.growth == {"/physical_device:GPU:0": True, "/physical_device:GPU:1": True}
    TensorFlowBackend().load(ModelSpec("m", models["tiny"]), "cpu")
    assert len(gpus.calls) == 2  # already set: not asked again


def test_memory_growth_can_be_turned_off(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    gpus = _fake_gpus(monkeypatch, FakeGPUs())
    spec = ModelSpec("m", models["tiny"], {"memory_growth": False})
    TensorFlowBackend().load(spec, "cpu")
    assert gpus.calls == []  # TF's default is off already
    with pytest.raises(BackendError, match=r"options\.memory_growth"):
        TensorFlowBackend().load(ModelSpec("m", models["tiny"], {"memory_growth": "lots"}), "cpu")


def test_memory_growth_after_the_runtime_started_warns_once(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    gpus = _fake_gpus(monkeypatch, FakeGPUs(started=True))
    with caplog.at_level(logging.WARNING, logger="backends.tensorflow_runtime"):
        TensorFlowBackend().load(ModelSpec("m", models["tiny"]), "cpu")
        TensorFlowBackend().load(ModelSpec("m", models["tiny"]), "cpu")
    warnings = [r.getMessage() for r in caplog.records if "memory_growth" in r.getMessage()]
    assert len(warnings) == 1
    assert "memory_growth=true ignored: Physical devices cannot be modified" in warnings[0]
    assert gpus.growth == {"/physical_device:GPU:0": None, "/physical_device:GPU:1": None}


class CudaArray:
    """A float32 array on a GPU as CuPy shows it; ``__dlpack__`` and ``copy`` are logged."""

    def __init__(self, data: np.ndarray[Any, Any], ptr: int, log: list[Any]) -> None:
        self.data, self.log = data, log
        self.__cuda_array_interface__ = {"data": (ptr, False), "shape": data.shape}

    def __dlpack_device__(self) -> tuple[int, int]:
        return (2, 0)  # kDLCUDA, device 0

    def __dlpack__(self, stream: Any = None) -> Any:
        self.log.append(("__dlpack__", stream))
        return types.SimpleNamespace(data=self.data)  # the capsule, as far as TF is told

    def copy(self) -> CudaArray:
        self.log.append("copy")
        return CudaArray(self.data.copy(), 0x20000, self.log)


@pytest.fixture
def on_fake_gpu(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> tuple[TensorFlowBackend, FakeStream]:
    """The tiny model with a stream, as load attaches one on a GPU; from_dlpack is logged."""
    backend = TensorFlowBackend()
    backend.load(ModelSpec("tiny", models["tiny"]), "cpu")
    stream = FakeStream(0xFEED)

    def from_dlpack(capsule: Any) -> Any:
        stream.log.append("from_dlpack")
        return tf.constant(capsule.data)

    monkeypatch.setattr(tf.experimental.dlpack, "from_dlpack", from_dlpack)
    backend._stream = stream
    backend._pipeline = GpuPipeline(FakeStream(0xBEE, stream.log), stream)  # type: ignore[arg-type]
    return backend, stream


@pytest.mark.parametrize(
    ("ptr", "expected"),
    [
        (0x10000, ["record", "sync", ("__dlpack__", 0xFEED), "from_dlpack"]),
        (0x10004, ["record", "sync", "copy", ("__dlpack__", 0xFEED), "sync", "from_dlpack"]),
    ],
)
def test_a_device_array_is_finished_on_its_stream_before_tensorflow_reads_it(
    on_fake_gpu: tuple[TensorFlowBackend, FakeStream], ptr: int, expected: list[Any]
) -> None:
    """TF's from_dlpack orders nothing: the batch's `ready` event is waited for on the host.

    TF takes no external stream or event, so the host waits on the event recorded on the
    preprocess stream after the batch's stages ("record", "sync"), and on the inference
    stream only after a copy made for alignment.
    """
    backend, stream = on_fake_gpu
    assert backend.gpu is not None
    ready = backend.gpu.preprocessed()  # as the preprocess thread marks a batch's end
    backend.gpu.hand_over(ready)
    x = np.linspace(-1, 1, 3 * 64, dtype=np.float32).reshape(3, 64)
    out = backend.infer({"x": CudaArray(x, ptr, stream.log)})
    assert stream.log == expected
    assert ready.event.query()  # it was that batch's event the host waited on
    np.testing.assert_allclose(out["logits"], tiny_mlp_reference(x), rtol=0, atol=1e-5)


def test_host_inputs_make_tensorflow_wait_for_nothing(
    on_fake_gpu: tuple[TensorFlowBackend, FakeStream],
) -> None:
    backend, stream = on_fake_gpu
    backend.infer({"x": np.zeros((2, 64), np.float32)})
    assert stream.log == []


def test_a_device_array_without_a_stream_to_order_it_is_refused(
    on_fake_gpu: tuple[TensorFlowBackend, FakeStream],
) -> None:
    backend, stream = on_fake_gpu
    backend._stream = backend._pipeline = None
    with pytest.raises(BackendError, match="no CUDA stream of its own"):
        backend.infer({"x": CudaArray(np.zeros((1, 64), np.float32), 0x10000, stream.log)})
    assert "from_dlpack" not in stream.log


def test_on_a_gpu_the_instance_owns_a_stream_and_unload_closes_it(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_gpus(monkeypatch, FakeGPUs())
    stream, pre = FakeStream(0xFEED), FakeStream(0xBEE)
    made = [stream, pre]
    monkeypatch.setattr(devices, "instance_stream", lambda device: made.pop(0))
    backend = TensorFlowBackend()
    backend.load(ModelSpec("tiny", models["tiny"]), "cuda:1")  # TF soft-places it on the CPU
    assert backend.stream is stream
    assert backend.preprocess_stream is pre
    backend.unload()
    assert backend.stream is None
    assert backend.preprocess_stream is None
    assert stream.log == pre.log == ["close"]
