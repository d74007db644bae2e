"""The TensorRT backend: signature and profile logic on a fake engine, the real thing on a GPU.

The fake engine answers the ``ICudaEngine`` calls the backend makes, with enums whose
member names are TensorRT's. The tests marked ``tensorrt`` build a real engine from the
tiny MLP and run only where ``tensorrt`` imports and PyTorch sees a CUDA device.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import sys
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gpu_fakes import POOL_SIZE, FakeStream, install_fake_cupy, install_fake_torch_cuda

import backends.tensorrt_runtime as trt_backend
from backends.base import Backend, ModelSpec
from backends.devices import PinnedBuffers
from backends.streams import GpuPipeline
from backends.tensorrt_runtime import (
    TensorRTBackend,
    choose_profile,
    read_signature,
    set_input_shapes,
)
from pipeline.tools.zoo.tiny import export_tiny_mlp_onnx, tiny_mlp_reference
from schemas.errors import BackendError
from schemas.tensors import TensorSpec

Shape = tuple[int, ...]


class Mode(enum.Enum):
    """`tensorrt.TensorIOMode`'s members."""

    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DType(enum.Enum):
    """`tensorrt.DataType`'s members in TensorRT 10."""

    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9


class FakeEngine:
    """The ``ICudaEngine`` methods the backend calls; profiles only for dynamic inputs."""

    def __init__(
        self,
        tensors: Mapping[str, tuple[Mode, DType, Shape]],
        profiles: Sequence[dict[str, tuple[Shape, Shape, Shape]]] = ({},),
        shape_tensors: frozenset[str] = frozenset(),
    ) -> None:
        self.tensors = tensors
        self.profiles = list(profiles)
        self.shape_tensors = shape_tensors

    @property
    def num_io_tensors(self) -> int:
        return len(self.tensors)

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.profiles)

    def get_tensor_name(self, index: int) -> str:
        return list(self.tensors)[index]

    def get_tensor_mode(self, name: str) -> Mode:
        return self.tensors[name][0]

    def get_tensor_dtype(self, name: str) -> DType:
        return self.tensors[name][1]

    def get_tensor_shape(self, name: str) -> list[int]:
        return list(self.tensors[name][2])  # TensorRT returns Dims, a sequence

    def is_shape_inference_io(self, name: str) -> bool:
        return name in self.shape_tensors

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[list[int]]:
        assert -1 in self.tensors[name][2], f"profile shape asked for static {name}"
        return [list(s) for s in self.profiles[profile_index][name]]


class FakeContext:
    """``set_input_shape``/``get_tensor_shape`` of an ``IExecutionContext``: logits [N, 10]."""

    def __init__(self, refuse: bool = False, out: Shape | None = None) -> None:
        self.calls: list[tuple[str, Shape]] = []
        self.refuse = refuse
        self.out = out

    def set_input_shape(self, name: str, shape: Shape) -> bool:
        self.calls.append((name, shape))
        return not self.refuse

    def get_tensor_shape(self, name: str) -> list[int]:
        return list(self.out or (self.calls[0][1][0], 10))


IMAGE = (3, 224, 224)
TWO_PROFILES = [
    {"image": ((1, *IMAGE), (4, *IMAGE), (8, *IMAGE)), "ids": ((1, 1), (4, 64), (8, 128))},
    {"image": ((9, *IMAGE), (32, *IMAGE), (64, *IMAGE)), "ids": ((9, 1), (32, 256), (64, 512))},
]


def dynamic_engine() -> FakeEngine:
    return FakeEngine(
        {
            "image": (Mode.INPUT, DType.HALF, (-1, *IMAGE)),
            "ids": (Mode.INPUT, DType.INT64, (-1, -1)),
            "logits": (Mode.OUTPUT, DType.FLOAT, (-1, 1000)),
            "mask": (Mode.OUTPUT, DType.BOOL, (-1, -1)),
        },
        TWO_PROFILES,
    )


def test_is_a_backend() -> None:
    assert isinstance(TensorRTBackend(), Backend)


def test_dynamic_batch_with_two_profiles() -> None:
    sig = read_signature(dynamic_engine())
    assert sig.inputs == {"image": TensorSpec("FP16", IMAGE), "ids": TensorSpec("INT64", (None,))}
    assert sig.outputs == {
        "logits": TensorSpec("FP32", (1000,)),
        "mask": TensorSpec("BOOL", (None,)),
    }
    assert sig.profiles == tuple(TWO_PROFILES)
    assert sig.max_batch_size == 64


@pytest.mark.parametrize(
    ("batch", "tokens", "profile"),
    [(1, 1, 0), (8, 128, 0), (9, 1, 1), (9, 128, 1), (64, 512, 1), (4, 300, None)],
)
def test_first_profile_admitting_the_batch_is_chosen(
    batch: int, tokens: int, profile: int | None
) -> None:
    profiles = read_signature(dynamic_engine()).profiles
    shapes = {"image": (batch, *IMAGE), "ids": (batch, tokens)}
    if profile is not None:
        assert choose_profile(profiles, shapes) == profile
    else:  # 300 tokens need profile 1, whose batches start at 9
        with pytest.raises(BackendError, match="no optimization profile admits"):
            choose_profile(profiles, shapes)


def test_a_shape_outside_every_profile_lists_the_ranges() -> None:
    profiles = read_signature(dynamic_engine()).profiles
    with pytest.raises(BackendError) as e:
        choose_profile(profiles, {"image": (65, *IMAGE), "ids": (65, 3)})
    assert str(e.value) == (
        "no optimization profile admits image [65, 3, 224, 224], ids [65, 3] ("
        "profile 0: image [1, 3, 224, 224]..[8, 3, 224, 224], ids [1, 1]..[8, 128]; "
        "profile 1: image [9, 3, 224, 224]..[64, 3, 224, 224], ids [9, 1]..[64, 512])"
    )
    with pytest.raises(BackendError, match="no optimization profile admits"):  # wrong rank
        choose_profile(profiles, {"image": (2, 224, 224), "ids": (2, 3)})
    with pytest.raises(BackendError, match=r"\(engine has none\)"):
        choose_profile((), {"x": (1,)})


def test_a_pinned_profile_is_the_only_candidate() -> None:
    profiles = read_signature(dynamic_engine()).profiles
    shapes = {"image": (4, *IMAGE), "ids": (4, 3)}
    assert choose_profile(profiles, shapes, only=0) == 0
    with pytest.raises(BackendError) as e:
        choose_profile(profiles, shapes, only=1)
    assert "profile 1: image [9, 3, 224, 224]" in str(e.value)
    assert "profile 0" not in str(e.value)


def test_static_batch() -> None:
    engine = FakeEngine(
        {
            "x": (Mode.INPUT, DType.FLOAT, (8, 64)),
            "logits": (Mode.OUTPUT, DType.FLOAT, (8, 10)),
        }
    )
    sig = read_signature(engine)  # the fake asserts no profile shape is asked for
    assert sig.inputs == {"x": TensorSpec("FP32", (64,))}
    assert sig.outputs == {"logits": TensorSpec("FP32", (10,))}
    assert sig.profiles == ({"x": ((8, 64), (8, 64), (8, 64))},)
    assert sig.max_batch_size == 8
    assert choose_profile(sig.profiles, {"x": (8, 64)}) == 0
    with pytest.raises(BackendError, match=r"x \[8, 64\]\.\.\[8, 64\]"):
        choose_profile(sig.profiles, {"x": (3, 64)})


def test_every_served_datatype_maps() -> None:
    names = ["FLOAT", "HALF", "INT8", "INT32", "INT64", "BOOL", "UINT8"]
    tensors = {n.lower(): (Mode.OUTPUT, DType[n], (-1, 2)) for n in names}
    sig = read_signature(FakeEngine(tensors))
    assert [s.datatype for s in sig.outputs.values()] == [
        "FP32", "FP16", "INT8", "INT32", "INT64", "BOOL", "UINT8"
    ]  # fmt: skip
    assert sig.inputs == {}
    assert sig.max_batch_size is None


@pytest.mark.parametrize("dtype", [DType.FP8, DType.BF16, DType.INT4])
def test_unsupported_datatype_names_the_tensor(dtype: DType) -> None:
    engine = FakeEngine(
        {"x": (Mode.INPUT, DType.FLOAT, (4, 2)), "q": (Mode.OUTPUT, dtype, (4, 2))},
    )
    with pytest.raises(BackendError, match=f"tensor 'q': TensorRT type {dtype.name} is not"):
        read_signature(engine)


def test_shape_tensor_inputs_and_scalars_are_refused() -> None:
    shape_input = FakeEngine(
        {"dims": (Mode.INPUT, DType.INT64, (2,))}, shape_tensors=frozenset({"dims"})
    )
    with pytest.raises(BackendError, match="input 'dims' is a shape tensor"):
        read_signature(shape_input)
    with pytest.raises(BackendError, match="tensor 's' is a scalar"):
        read_signature(FakeEngine({"s": (Mode.INPUT, DType.FLOAT, ())}))


def test_input_shapes_are_set_before_output_shapes_are_read() -> None:
    ctx = FakeContext()
    assert set_input_shapes(ctx, {"x": np.zeros((5, 64)).shape}, ["logits"]) == {"logits": (5, 10)}
    assert ctx.calls == [("x", (5, 64))]
    with pytest.raises(BackendError, match=r"TensorRT refused shape \[5, 64\] for input 'x'"):
        set_input_shapes(FakeContext(refuse=True), {"x": (5, 64)}, ["logits"])
    with pytest.raises(BackendError, match="output 'logits' has a data-dependent shape"):
        set_input_shapes(FakeContext(out=(5, -1)), {"x": (5, 64)}, ["logits"])


class MlpContext:
    """An ``IExecutionContext`` that runs the tiny MLP on host memory at the bound addresses.

    It reads and writes only through the addresses the backend set, as TensorRT does, so
    the backend's staging, binding and copying are exercised for real on the CPU.
    """

    def __init__(self) -> None:
        self.addresses: dict[str, int] = {}
        self.shapes: dict[str, Shape] = {}
        self.switches: list[tuple[int, int]] = []
        self.ok = True

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        self.switches.append((profile_index, stream_handle))
        return True

    def set_input_shape(self, name: str, shape: Shape) -> bool:
        self.shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str) -> list[int]:
        return [self.shapes["x"][0], 10]

    def set_tensor_address(self, name: str, memory: int) -> bool:
        self.addresses[name] = memory
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        n = self.shapes["x"][0]
        x = (ctypes.c_float * (n * 64)).from_address(self.addresses["x"])
        out = (ctypes.c_float * (n * 10)).from_address(self.addresses["logits"])
        y = tiny_mlp_reference(np.ctypeslib.as_array(x).reshape(n, 64))
        np.ctypeslib.as_array(out)[:] = y.ravel()
        return self.ok


class HostBuffers(PinnedBuffers):
    """`PinnedBuffers` without the pinning, which needs a CUDA build of PyTorch."""

    def view(self, name: str, shape: tuple[int, ...], dtype: Any, run: Any = None) -> Any:
        import torch

        return torch.empty(shape, dtype=dtype)


@pytest.fixture
def on_host(monkeypatch: pytest.MonkeyPatch) -> tuple[TensorRTBackend, MlpContext, FakeStream]:
    """A backend attached to `MlpContext` on the CPU, as load would attach a real one."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    engine = FakeEngine(
        {"x": (Mode.INPUT, DType.FLOAT, (-1, 64)), "logits": (Mode.OUTPUT, DType.FLOAT, (-1, 10))},
        [{"x": ((1, 64), (4, 64), (8, 64))}, {"x": ((9, 64), (32, 64), (64, 64))}],
    )
    backend, ctx, stream = TensorRTBackend(), MlpContext(), FakeStream()
    backend._host = HostBuffers()
    backend._attach((None, engine, ctx), stream, "cpu", read_signature(engine), None)
    backend._pipeline = GpuPipeline(stream, stream)  # type: ignore[arg-type]
    return backend, ctx, stream


def test_data_path_switches_profiles_only_when_the_batch_needs_it(
    on_host: tuple[TensorRTBackend, MlpContext, FakeStream],
) -> None:
    backend, ctx, stream = on_host
    for n, switches in [(4, []), (20, [1]), (30, [1]), (2, [1, 0]), (1, [1, 0])]:
        x = np.random.default_rng(n).standard_normal((n, 64))  # float64: cast on staging
        out = backend.infer({"x": x})
        assert (out["logits"].shape, out["logits"].dtype) == ((n, 10), np.float32)
        np.testing.assert_allclose(out["logits"], tiny_mlp_reference(x), rtol=0, atol=1e-5)
        assert [p for p, _ in ctx.switches] == switches
    assert {s for _, s in ctx.switches} == {stream.cuda_stream}
    assert stream.synchronized == 5  # one host wait per batch, on its `done` event
    assert stream.log.count("wait") == 5  # each batch's compute after its `ready` event


def test_data_path_reuses_output_buffers_and_takes_dlpack(
    on_host: tuple[TensorRTBackend, MlpContext, FakeStream],
) -> None:
    import torch

    backend, ctx, _ = on_host
    x = np.ones((8, 64), np.float32)
    backend.infer({"x": x})
    first = ctx.addresses["logits"]
    backend.infer({"x": x[:3]})
    assert ctx.addresses["logits"] == first  # smaller batch: same buffer
    out = backend.infer({"x": torch.from_numpy(x[:5].T.copy()).T})  # DLPack, not contiguous
    np.testing.assert_allclose(out["logits"], tiny_mlp_reference(x[:5]), atol=1e-5)
    backend.infer({"x": np.ones((64, 64), np.float32)})
    assert ctx.addresses["logits"] != first  # grown


def test_data_path_failures(on_host: tuple[TensorRTBackend, MlpContext, FakeStream]) -> None:
    backend, ctx, stream = on_host
    with pytest.raises(BackendError, match=r"batch lacks input\(s\) \['x'\]"):
        backend.infer({"y": np.zeros((1, 64), np.float32)})
    with pytest.raises(BackendError, match="no optimization profile admits x"):
        backend.infer({"x": np.zeros((65, 64), np.float32)})
    with pytest.raises(BackendError, match="input 'x': Cannot cast"):
        backend.infer({"x": np.zeros((2, 64), np.complex64)})
    ctx.ok = False
    synced = stream.synchronized
    with pytest.raises(BackendError, match="execute_async_v3 failed"):
        backend.infer({"x": np.zeros((2, 64), np.float32)})
    assert stream.synchronized == synced + 1  # copies already queued are waited for
    backend.unload()
    with pytest.raises(BackendError, match=r"infer\(\) before load\(\)"):
        backend.infer({"x": np.zeros((2, 64), np.float32)})


def test_a_pinned_profile_is_switched_to_and_enforced(
    on_host: tuple[TensorRTBackend, MlpContext, FakeStream],
) -> None:
    backend, ctx, _ = on_host
    backend._pinned = 1
    backend.infer({"x": np.zeros((12, 64), np.float32)})
    assert [p for p, _ in ctx.switches] == [1]
    with pytest.raises(BackendError, match=r"\(profile 1: x \[9, 64\]\.\.\[64, 64\]\)"):
        backend.infer({"x": np.zeros((2, 64), np.float32)})


@pytest.fixture
def gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend one GPU is visible, so load gets past device resolution."""
    monkeypatch.setattr(trt_backend, "_gpu_count", lambda: 1)


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch, gpus: None) -> types.SimpleNamespace:
    """A `tensorrt` module whose Runtime returns ``state.engine``; no CUDA device guard."""
    torch = pytest.importorskip("torch")
    state = types.SimpleNamespace(engine=None, severity=None)

    class Logger:
        ERROR, WARNING, INFO, VERBOSE = "ERROR", "WARNING", "INFO", "VERBOSE"

        def __init__(self, severity: str) -> None:
            state.severity = severity

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, data: bytes) -> Any:
            return state.engine

    module = types.ModuleType("tensorrt")
    module.__dict__.update(Logger=Logger, Runtime=Runtime, __version__="10.9.0")
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    return state


@pytest.mark.parametrize(
    ("device", "tail"), [("cpu", "only"), ("auto", "only, and none is visible here")]
)
def test_no_cuda_device_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device: str, tail: str
) -> None:
    monkeypatch.setattr(trt_backend, "_gpu_count", lambda: 0)
    with pytest.raises(BackendError) as e:
        TensorRTBackend().load(ModelSpec("m", tmp_path / "m.plan"), device)
    assert str(e.value) == (f"device {device!r}: TensorRT engines run on a CUDA device {tail}")


def test_a_gpu_that_is_not_there_is_refused(tmp_path: Path, gpus: None) -> None:
    with pytest.raises(BackendError, match=r"device 'cuda:1': tensorrt sees 1 CUDA"):
        TensorRTBackend().load(ModelSpec("m", tmp_path / "m.plan"), "cuda:1")


def test_missing_engine_file_is_refused(tmp_path: Path, gpus: None) -> None:
    path = tmp_path / "none.plan"
    with pytest.raises(BackendError, match=f"no engine file at {path}"):
        TensorRTBackend().load(ModelSpec("m", path), "cuda:0")
    with pytest.raises(BackendError, match="no engine file"):
        TensorRTBackend().load(ModelSpec("m", tmp_path), "cuda:0")  # a folder is not a file


def test_a_file_tensorrt_cannot_deserialize_is_refused(
    tmp_path: Path, fake_trt: types.SimpleNamespace
) -> None:
    junk = tmp_path / "junk.plan"
    junk.write_bytes(b"not an engine")
    with pytest.raises(BackendError) as e:
        TensorRTBackend().load(ModelSpec("m", junk, {"log_level": "verbose"}), "cuda:0")
    assert str(e.value).startswith(
        f"{junk} is not a serialized TensorRT engine for TensorRT 10.9.0 on this GPU"
    )
    assert fake_trt.severity == "VERBOSE"


def test_engine_problems_name_the_model(tmp_path: Path, fake_trt: types.SimpleNamespace) -> None:
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"engine")
    fake_trt.engine = dynamic_engine()
    with pytest.raises(BackendError, match=r"options.profile 2: the engine has 2 optimization"):
        TensorRTBackend().load(ModelSpec("m", plan, {"profile": 2}), "cuda:0")
    fake_trt.engine = FakeEngine({"q": (Mode.OUTPUT, DType.FP8, (-1,))})
    with pytest.raises(BackendError, match="tensor 'q': TensorRT type FP8"):
        TensorRTBackend().load(ModelSpec("m", plan), "cuda:0")


class LoadableEngine(FakeEngine):
    """A `FakeEngine` that also makes execution contexts, so load gets to the end."""

    def create_execution_context(self) -> FakeContext:
        return FakeContext()


def test_past_torchs_stream_pool_every_instance_still_owns_its_stream(
    tmp_path: Path, fake_trt: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.cuda.Stream() would hand the 33rd instance the 1st one's stream (faked here)."""
    cuda = install_fake_torch_cuda(monkeypatch)
    cupy = install_fake_cupy(monkeypatch)
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"engine")
    fake_trt.engine = LoadableEngine(
        {"x": (Mode.INPUT, DType.FLOAT, (-1, 64)), "logits": (Mode.OUTPUT, DType.FLOAT, (-1, 10))},
        [{"x": ((1, 64), (4, 64), (8, 64))}],
    )
    backends = [TensorRTBackend() for _ in range(POOL_SIZE + 8)]
    for backend in backends:
        backend.load(ModelSpec("m", plan), "cuda:0")
    handles = {backend.stream.cuda_stream for backend in backends}
    pre = {backend.preprocess_stream.cuda_stream for backend in backends}
    assert len(handles) == len(pre) == POOL_SIZE + 8
    assert not handles & pre  # an instance's two streams, and no other's
    assert cuda.pooled == 0
    assert handles | pre == {made.ptr for made in cupy.made}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"profile": -1}, "options.profile: Input should be greater than or equal to 0"),
        ({"profile": "first"}, "options.profile"),
        ({"log_level": "loud"}, "options.log_level: Input should be 'error', 'warning'"),
        ({"precision": "fp16"}, "options.precision: unknown option"),
    ],
)
def test_bad_options_are_refused(tmp_path: Path, options: dict[str, Any], message: str) -> None:
    with pytest.raises(BackendError, match="tensorrt options: ") as e:
        TensorRTBackend().load(ModelSpec("m", tmp_path / "m.plan", options), "cuda:0")
    assert message in str(e.value)


def test_infer_before_load_is_refused() -> None:
    with pytest.raises(BackendError, match=r"infer\(\) before load\(\)"):
        TensorRTBackend().infer({"x": np.zeros((1, 64), np.float32)})


def test_probe_without_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import raises ImportError
    probe = TensorRTBackend.probe()
    assert not probe.usable
    assert probe.detail.startswith("tensorrt is not importable: ")


def test_probe_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    module = types.ModuleType("tensorrt")
    module.__dict__["__version__"] = "10.9.0"
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    probe = TensorRTBackend.probe()
    assert not probe.usable
    assert probe.detail.startswith(f"TensorRT 10.9.0, torch {torch.__version__} is ")
    assert probe.detail.endswith(("a CPU-only build", "sees no CUDA device"))


def test_probe_here_agrees_with_the_machine() -> None:
    probe = TensorRTBackend.probe()
    try:
        import tensorrt  # noqa: F401
        import torch

        usable = torch.cuda.is_available()
    except (ImportError, OSError):
        usable = False
    assert probe.usable == usable, probe.detail


# --- real TensorRT on a CUDA GPU ---------------------------------------------------------

HERE = TensorRTBackend.probe()
needs_trt = pytest.mark.skipif(not HERE.usable, reason=f"TensorRT backend unusable: {HERE.detail}")


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny MLP built into an engine with one profile: batch 1..64, optimised for 32."""
    import tensorrt as trt

    out = tmp_path_factory.mktemp("trt")
    onnx_path = export_tiny_mlp_onnx(out)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        pytest.fail("; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
    config = builder.create_builder_config()
    config.clear_flag(trt.BuilderFlag.TF32)  # TF32 matmuls would miss atol 1e-4
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, 64), (32, 64), (64, 64))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    assert serialized is not None, "TensorRT could not build the tiny MLP"
    plan = out / "tiny_mlp.plan"
    with plan.open("wb") as f:
        f.write(serialized)
    return plan


@pytest.mark.tensorrt
@needs_trt
def test_tiny_engine_signature_and_profile(tiny_plan: Path) -> None:
    backend = TensorRTBackend()
    info = backend.load(ModelSpec("tiny", tiny_plan), "cuda:0")
    assert info.inputs == {"x": TensorSpec("FP32", (64,))}
    assert info.outputs == {"logits": TensorSpec("FP32", (10,))}
    assert info.max_batch_size == 64
    assert info.device == "cuda:0"
    assert info.profiles == ({"x": ((1, 64), (32, 64), (64, 64))},)
    with pytest.raises(BackendError, match=r"x \[1, 64\]\.\.\[64, 64\]"):
        backend.infer({"x": np.zeros((65, 64), np.float32)})
    backend.unload()


@pytest.mark.tensorrt
@needs_trt
def test_tiny_engine_matches_numpy(tiny_plan: Path) -> None:
    backend = TensorRTBackend()
    backend.load(ModelSpec("tiny", tiny_plan), "cuda:0")
    for n in (1, 37, 1, 37):  # shrinking and growing again reuses the buffers
        x = np.random.default_rng(n).standard_normal((n, 64)).astype(np.float32)
        out = backend.infer({"x": x})
        assert list(out) == ["logits"]
        assert (out["logits"].shape, out["logits"].dtype) == ((n, 10), np.float32)
        np.testing.assert_allclose(out["logits"], tiny_mlp_reference(x), rtol=0, atol=1e-4)
    backend.unload()


@pytest.mark.tensorrt
@needs_trt
def test_tiny_engine_takes_device_arrays(tiny_plan: Path) -> None:
    import torch

    backend = TensorRTBackend()
    backend.load(ModelSpec("tiny", tiny_plan), "cuda:0")
    x = np.random.default_rng(7).standard_normal((37, 64)).astype(np.float32)
    out = backend.infer({"x": torch.from_numpy(x).to("cuda:0")})
    np.testing.assert_allclose(out["logits"], tiny_mlp_reference(x), rtol=0, atol=1e-4)
    backend.unload()


@pytest.mark.tensorrt
@needs_trt
def test_each_instance_owns_its_stream(tiny_plan: Path) -> None:
    a, b = TensorRTBackend(), TensorRTBackend()
    a.load(ModelSpec("tiny", tiny_plan), "cuda:0")
    b.load(ModelSpec("tiny", tiny_plan), "cuda:0")
    assert a._stream.cuda_stream != b._stream.cuda_stream
    assert 0 not in (a._stream.cuda_stream, b._stream.cuda_stream)  # not the default stream
    a.unload()
    b.unload()


@pytest.mark.tensorrt
@needs_trt
def test_real_tensorrt_refuses_junk(tmp_path: Path) -> None:
    junk = tmp_path / "junk.plan"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(BackendError, match="is not a serialized TensorRT engine"):
        TensorRTBackend().load(ModelSpec("m", junk), "cuda:0")
