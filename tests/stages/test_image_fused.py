"""normalize_nchw against normalize + to_nchw: the NumPy twin here, the CuPy kernel on a GPU."""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from schemas import devices
from schemas.errors import GraphError
from schemas.tensors import TensorSpec
from stages.base import Batch, StageContext
from stages.preprocess import image_fused
from stages.preprocess.image import Normalize, NormalizeParams, ToNCHW, ToNCHWParams
from stages.preprocess.image_fused import (
    NormalizeNCHW,
    NormalizeNCHWParams,
    cupy_stream,
    stream_handle,
)

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _reference(x: np.ndarray, mean: list[float], std: list[float], scale: float) -> np.ndarray:
    batch = Batch(list(range(len(x))), {"image": x})
    batch = Normalize(NormalizeParams(mean=mean, std=std, scale=scale)).process(batch)
    return np.asarray(ToNCHW(ToNCHWParams()).process(batch).columns["image"])


def _fused(x: Any, device: str = "cpu", stream: Any = None, **params: Any) -> Any:
    stage = NormalizeNCHW(NormalizeNCHWParams(**{"mean": MEAN, "std": STD, **params}))
    stage.setup(StageContext("m", device=device, stream=stream))
    return stage.process(Batch(list(range(len(x))), {"image": x})).columns["image"]


images = hnp.arrays(
    np.uint8,
    st.tuples(st.integers(0, 4), st.integers(1, 12), st.integers(1, 12), st.just(3)),
)
stats = st.lists(st.floats(0.01, 200), min_size=3, max_size=3)


@settings(max_examples=60, deadline=None)
@given(x=images, mean=stats, std=stats, scale=st.sampled_from([1.0, 1 / 255, 1 / 127.5]))
def test_numpy_twin_equals_normalize_then_to_nchw(
    x: np.ndarray, mean: list[float], std: list[float], scale: float
) -> None:
    want = _reference(x, mean, std, scale)
    y = _fused(x, mean=mean, std=std, scale=scale)
    assert (y.dtype, y.shape, y.flags.c_contiguous) == (np.float32, want.shape, True)
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-6)  # the stated bound; in fact 0
    half = _fused(x, mean=mean, std=std, scale=scale, dtype="FP16")
    assert (half.dtype, half.flags.c_contiguous) == (np.float16, True)
    np.testing.assert_array_equal(half, want.astype(np.float16))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16, np.int32, np.uint16])
@pytest.mark.parametrize("out", ["FP32", "FP16"])
def test_other_input_dtypes_take_normalizes_arithmetic(dtype: type, out: str) -> None:
    x = np.random.default_rng(1).integers(0, 256, (2, 5, 7, 3)).astype(dtype)
    want = _reference(x, MEAN, STD, 1 / 255).astype(np.float16 if out == "FP16" else np.float32)
    np.testing.assert_array_equal(_fused(x, dtype=out), want)


def test_a_demo_sized_batch_and_a_renamed_output_keeping_other_columns() -> None:
    x = np.random.default_rng(2).integers(0, 256, (8, 224, 224, 3), dtype=np.uint8)
    stage = NormalizeNCHW(NormalizeNCHWParams(mean=MEAN, std=STD, output="input"))
    out = stage.process(Batch(list(range(8)), {"image": x, "other": np.arange(8)}))
    assert set(out.columns) == {"input", "other"}
    np.testing.assert_allclose(out.columns["input"], _reference(x, MEAN, STD, 1 / 255), atol=1e-6)


def test_signature_is_normalize_and_to_nchw_in_one() -> None:
    stage = NormalizeNCHW(NormalizeNCHWParams(mean=MEAN, std=STD, output="input", dtype="FP16"))
    specs = {"image": TensorSpec("UINT8", (224, 224, 3)), "other": TensorSpec("INT8", ())}
    assert stage.signature(specs) == {
        "other": TensorSpec("INT8", ()),
        "input": TensorSpec("FP16", (3, 224, 224)),
    }


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (TensorSpec("UINT8", (None, None, 3)), "must be a fixed [h,w,c], got UINT8[?,?,3]"),
        (TensorSpec("UINT8", (4, 4)), "must be a fixed [h,w,c]"),
        (TensorSpec("UINT8", (4, 4, 1)), "mean and std need 1 values"),
    ],
)
def test_signature_refuses_misfits(spec: TensorSpec, message: str) -> None:
    stage = NormalizeNCHW(NormalizeNCHWParams(mean=MEAN, std=STD))
    with pytest.raises(GraphError, match="normalize_nchw") as e:
        stage.signature({"image": spec})
    assert message in str(e.value)


class _TorchLike:
    cuda_stream = 1234


class _CupyLike:
    ptr = 5678


def test_stream_handles_from_ints_torch_and_cupy_streams() -> None:
    assert stream_handle(None) is None
    assert stream_handle(42) == 42
    assert stream_handle(_TorchLike()) == 1234
    assert stream_handle(_CupyLike()) == 5678
    with pytest.raises(GraphError, match="cannot use str as a CUDA stream"):
        stream_handle("stream")


class _NewStream:
    null = "null stream"

    @staticmethod
    def from_external(obj: Any) -> tuple[str, Any]:
        return ("from_external", obj.__cuda_stream__())


class _OldStream:
    null = "null stream"


def test_cupy_streams_over_raw_handles_for_old_and_new_cupy() -> None:
    new = SimpleNamespace(cuda=SimpleNamespace(Stream=_NewStream))
    old = SimpleNamespace(cuda=SimpleNamespace(Stream=_OldStream, ExternalStream=lambda h: h))
    assert cupy_stream(new, None) == cupy_stream(old, None) == "null stream"
    assert cupy_stream(new, 77) == ("from_external", (0, 77))  # CuPy 14: stream protocol
    assert cupy_stream(old, 77) == 77  # before CuPy 14: ExternalStream(ptr)


def _cuda() -> bool:
    try:
        import cupy

        return bool(cupy.cuda.is_available())
    except Exception:
        return False


def test_auto_is_the_cpu_without_a_gpu_and_bad_devices_are_refused() -> None:
    if _cuda():
        pytest.skip("this machine has a GPU")
    x = np.zeros((1, 2, 2, 3), np.uint8)
    assert isinstance(_fused(x, device="auto"), np.ndarray)
    with pytest.raises(GraphError, match="normalize_nchw: device 'gpu'"):
        _fused(x, device="gpu")


def test_cuda_without_cupy_is_refused_at_setup() -> None:
    try:
        import cupy  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("CuPy is installed")
    with pytest.raises(GraphError, match="needs CuPy"):
        _fused(np.zeros((1, 2, 2, 3), np.uint8), device="cuda:0")


@pytest.mark.parametrize(
    ("torch_cuda", "hint"),
    [
        ("13.0", "pip install 'kp-pipeline[gpu-cu13]'"),
        ("12.6", "pip install 'kp-pipeline[gpu-cu12]'"),
        (
            None,
            "pip install 'kp-pipeline[gpu-cu12]' (CUDA 12) or 'kp-pipeline[gpu-cu13]' (CUDA 13)",
        ),
    ],
)
def test_the_cupy_hint_names_the_extra_for_the_machines_cuda(
    monkeypatch: pytest.MonkeyPatch, torch_cuda: str | None, hint: str
) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` fails
    monkeypatch.setitem(
        sys.modules, "torch", SimpleNamespace(version=SimpleNamespace(cuda=torch_cuda))
    )
    monkeypatch.setattr(devices, "_driver_cuda_major", lambda: None, raising=False)
    with pytest.raises(GraphError) as e:
        _fused(np.zeros((1, 2, 2, 3), np.uint8), device="cuda:0")
    assert str(e.value) == f"normalize_nchw on CUDA needs CuPy: {hint}"


# -- CUDA ordering, on a fake CuPy: which stream each host copy and each launch is on.


class _DeviceArray:
    """A fake CuPy array: a NumPy array said to be on the device."""

    def __init__(self, a: np.ndarray, log: list[tuple[str, Any]] | None = None) -> None:
        self.a = a
        self.shape, self.size, self.dtype = a.shape, a.size, a.dtype
        self.log = log

    def set(self, host: np.ndarray, stream: Any = None) -> None:
        """``cupy.ndarray.set``: a host → device copy on ``stream``, from ``host``'s memory."""
        assert self.log is not None
        self.log.append(("host copy", stream.ptr))
        self.log.append(("from", host.__array_interface__["data"][0]))
        self.a[...] = host


class _FakeCupy:
    """Just what normalize_nchw calls; logs (event, stream handle) in call order.

    The legacy default stream is handle 0. ``new_api`` picks CuPy 14's
    ``Stream.from_external`` over the older ``ExternalStream``.
    """

    def __init__(self, new_api: bool) -> None:
        self.log: list[tuple[str, int]] = []
        current = [0]
        log = self.log

        class Stream:
            def __init__(self, handle: int) -> None:
                self.ptr = handle

            def __enter__(self) -> Stream:
                current.append(self.ptr)
                return self

            def __exit__(self, *exc: object) -> None:
                current.pop()

            def synchronize(self) -> None:
                log.append(("synchronize", self.ptr))

        class Device:
            def __init__(self, index: int) -> None:
                self.index = index

            def __enter__(self) -> Device:
                return self

            def __exit__(self, *exc: object) -> None:
                pass

        class Event:
            """Completes when the host waits on it, or when ``done`` is set by the test."""

            def __init__(self, disable_timing: bool = False) -> None:
                self.ptr = 0xE0 + len(events)
                self.done = self_.events_complete
                events.append(self)

            def record(self, stream: Any) -> None:
                log.append(("record", stream.ptr))

            def synchronize(self) -> None:
                log.append(("host wait", self.ptr))
                self.done = True

        self_ = self
        self.events_complete = True
        events: list[Event] = []
        self.events = events
        Stream.null = Stream(0)  # type: ignore[attr-defined]
        cuda = SimpleNamespace(
            Stream=Stream,
            Device=Device,
            Event=Event,
            is_available=lambda: True,
            alloc_pinned_memory=bytearray,  # stands in for page-locked memory
        )
        if new_api:
            Stream.from_external = staticmethod(  # type: ignore[attr-defined]
                lambda obj: Stream(obj.__cuda_stream__()[1])
            )
        else:
            cuda.ExternalStream = Stream
        self.cuda = cuda

        def asarray(x: Any) -> _DeviceArray:
            if isinstance(x, np.ndarray):
                log.append(("host copy", current[-1]))
                return _DeviceArray(x.copy())
            return x  # type: ignore[no-any-return]

        def launch(x: Any, mul: Any, sub: Any, c: int, hw: int, y: Any) -> None:
            log.append(("kernel", current[-1]))
            nchw = x.a.transpose(0, 3, 1, 2).astype(np.float32)
            y.a[...] = nchw * mul.a[:, None, None] - sub.a[:, None, None]

        self.asarray = asarray
        self.from_dlpack = lambda x: x
        self.ascontiguousarray = lambda x: x
        self.empty = lambda shape, dtype: _DeviceArray(np.empty(shape, dtype), log)
        self.ElementwiseKernel = lambda *args: launch


def _unordered_copies(log: list[tuple[str, int]]) -> list[int]:
    """Host copies a later kernel may overtake: on another stream, and not synchronised."""
    late = []
    for i, (event, stream) in enumerate(log):
        if event != "host copy":
            continue
        for later, on in log[i + 1 :]:
            if later == "synchronize" and on == stream:
                break
            if later == "kernel" and on != stream:
                late.append(i)
                break
    return late


@pytest.mark.parametrize("new_api", [True, False], ids=["from_external", "ExternalStream"])
def test_constants_and_numpy_inputs_are_copied_on_the_kernels_stream(
    monkeypatch: pytest.MonkeyPatch, new_api: bool
) -> None:
    fake = _FakeCupy(new_api)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(image_fused, "_KERNELS", {})  # not the fake kernel for later tests
    stage = NormalizeNCHW(NormalizeNCHWParams(mean=MEAN, std=STD))
    stage.setup(StageContext("m", device="cuda:0", stream=1234))
    x = np.random.default_rng(5).integers(0, 256, (2, 3, 4, 3), dtype=np.uint8)
    on_device = _DeviceArray(x)
    for source in (x, on_device, x):
        y = stage.process(Batch([0, 1], {"image": source})).columns["image"]
        np.testing.assert_allclose(y.a, _fused(x), rtol=0, atol=1e-6)
    assert [e for e in fake.log if e[0] == "kernel"] == [("kernel", 1234)] * 3
    assert sum(event == "host copy" for event, _ in fake.log) == 4  # 2 constants, 2 inputs
    assert _unordered_copies(fake.log) == []


def test_numpy_inputs_go_up_from_two_pinned_buffers_reused_after_their_copy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each upload is queued from a pinned buffer, then an event marks the copy's end; the
    host writes that buffer again two uploads later, waiting only if the copy still runs."""
    fake = _FakeCupy(new_api=True)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(image_fused, "_KERNELS", {})
    stage = NormalizeNCHW(NormalizeNCHWParams(mean=MEAN, std=STD))
    stage.setup(StageContext("m", device="cuda:0", stream=1234))
    fake.log.clear()
    fake.events_complete = False  # the copies have not finished when the host comes back
    rng = np.random.default_rng(6)
    for n in range(4):
        x = rng.integers(0, 256, (2, 3, 4, 3), dtype=np.uint8)
        y = stage.process(Batch([0, 1], {"image": x})).columns["image"]
        np.testing.assert_allclose(y.a, _fused(x), rtol=0, atol=1e-6)  # the batch's own data
        if n == 1:
            fake.events[0].done = True  # the first copy finished meanwhile: no wait for it
    sources = [e[1] for e in fake.log if e[0] == "from"]
    assert sources[0] == sources[2] != sources[1] == sources[3]  # two buffers, in turn
    copies = [i for i, e in enumerate(fake.log) if e[0] == "host copy"]
    records = [i for i, e in enumerate(fake.log) if e[0] == "record"]
    assert len(copies) == len(records) == 4
    assert all(c < r for c, r in zip(copies, records, strict=True))  # each copy's own event
    assert all(fake.log[i][1] == 1234 for i in copies + records)  # on the stage's stream
    # the fourth upload reuses the second buffer, whose copy was still running: the host
    # waited on that copy's event before writing the buffer again
    waits = [(i, e) for i, e in enumerate(fake.log) if e[0] == "host wait"]
    assert [e for _, e in waits] == [("host wait", fake.events[1].ptr)]
    assert copies[2] < waits[0][0] < copies[3]


def test_the_ordering_check_flags_a_copy_on_another_stream() -> None:
    log = [("host copy", 0), ("kernel", 7)]
    assert _unordered_copies(log) == [0]
    assert _unordered_copies([("host copy", 0), ("synchronize", 0), ("kernel", 7)]) == []


# -- GPU: the CuPy kernel. Runs where CuPy sees a CUDA device (none on the project's machines).


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU and CuPy")
@pytest.mark.parametrize("out", ["FP32", "FP16"])
def test_cuda_kernel_matches_the_numpy_twin_on_the_instances_stream(out: str) -> None:
    import cupy

    x = np.random.default_rng(3).integers(0, 256, (5, 37, 29, 3), dtype=np.uint8)
    want = _fused(x, dtype=out)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        on_device = cupy.asarray(x)
    for source in (on_device, x, cupy.asfortranarray(on_device)):  # DLPack, NumPy, strided
        y = _fused(source, device="cuda:0", stream=stream, dtype=out)
        assert isinstance(y, cupy.ndarray)
        assert (y.shape, y.dtype, y.flags.c_contiguous) == (want.shape, want.dtype, True)
        stream.synchronize()
        if out == "FP32":
            np.testing.assert_allclose(cupy.asnumpy(y), want, rtol=0, atol=1e-6)
        else:  # one float16 ulp: the kernel may fuse multiply and subtract (one rounding)
            np.testing.assert_allclose(
                cupy.asnumpy(y).astype(np.float32),
                want.astype(np.float32),
                rtol=2**-10,
                atol=2**-24,
            )
    empty = _fused(cupy.zeros((0, 4, 4, 3), cupy.uint8), device="cuda:0", dtype=out)
    assert empty.shape == (0, 3, 4, 4)


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU and CuPy")
def test_cuda_kernel_takes_a_torch_tensor_through_dlpack() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch here has no CUDA")
    x = np.random.default_rng(4).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    stream = torch.cuda.Stream()
    y = _fused(torch.from_numpy(x).cuda(), device="cuda:0", stream=stream)
    stream.synchronize()
    np.testing.assert_allclose(y.get(), _fused(x), rtol=0, atol=1e-6)
