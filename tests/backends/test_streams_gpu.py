"""The GPU instance's two streams on a real GPU: same results as the CPU, and real overlap.

Marked ``gpu``: they run under ``make gpu-check`` on a machine with a CUDA GPU, PyTorch
and CuPy, and are skipped everywhere else (no GPU on the project's machines: they have
not run yet). What they check:

- CuPy preprocessing (``normalize_nchw``) on the instance's preprocess stream, then the
  torch backend on its inference stream, gives the CPU's results, with the preprocessing
  made slow on purpose and several batches preprocessed ahead: the inference stream must
  wait for each batch's own ``ready`` event, and host inputs (pinned copies) too;
- one host wait per batch (`GpuPipeline.host_waits`);
- preprocessing of batch N+1 runs on the GPU while batch N infers, read from CUDA event
  timestamps (GPU time, not the host's clock): its start and end fall inside the
  inference's interval, which one shared stream would make impossible.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from backends import torch_runtime
from backends.base import ModelInfo, ModelSpec
from backends.torch_runtime import TorchBackend
from schemas.tensors import TensorSpec
from stages.base import Batch, StageContext
from stages.preprocess.image_fused import NormalizeNCHW, NormalizeNCHWParams, cupy_stream

torch = pytest.importorskip("torch")
cupy = pytest.importorskip("cupy")


def _cuda() -> bool:
    try:
        return bool(torch.cuda.is_available() and cupy.cuda.is_available())
    except Exception:  # a CuPy without a driver
        return False


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU with PyTorch and CuPy"),
]

H = W = 16
SIGNATURE = {
    "factory": "unused:factory",  # _load_module is replaced: no file, no import
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [3, H, W]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [10]}],
}
PARAMS = NormalizeNCHWParams(input="x", mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


def _classifier() -> Any:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * H * W, 10)).eval()


def _backend(monkeypatch: pytest.MonkeyPatch, module: Any, device: str) -> TorchBackend:
    monkeypatch.setattr(torch_runtime, "_load_module", lambda *a: (module.to(device), {}))
    backend = TorchBackend()
    backend.load(ModelSpec("m", Path("unused.pth"), SIGNATURE), device)
    return backend


def _slow_down(stream_handle: int) -> None:
    """Keep the preprocess stream busy for a while (a large matrix product) before a stage."""
    with cupy_stream(cupy, stream_handle):
        a = cupy.ones((4096, 4096), cupy.float32)
        for _ in range(8):
            a = a @ a * (1.0 / 4096)


def test_cupy_then_torch_on_two_streams_gives_the_cpus_results(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpu = _backend(monkeypatch, _classifier(), "cuda:0")
    cpu = _backend(monkeypatch, _classifier(), "cpu")
    pipeline = gpu.gpu
    assert pipeline is not None
    pre = gpu.preprocess_stream
    assert pre.cuda_stream != gpu.stream.cuda_stream
    stage = NormalizeNCHW(PARAMS)
    stage.setup(StageContext("m", "cuda:0", pre))
    twin = NormalizeNCHW(PARAMS)
    twin.setup(StageContext("m", "cpu"))
    rng = np.random.default_rng(7)
    images = [rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8) for n in (16, 5, 32, 1, 9)]

    # Preprocess every batch first (as the preprocess thread runs ahead), each behind slow
    # work on the preprocess stream: only the `ready` events order inference after it.
    ready = []
    for x in images:
        _slow_down(pre.cuda_stream)
        column = stage.process(Batch(list(range(len(x))), {"x": x})).columns["x"]
        ready.append((column, pipeline.preprocessed()))
    waits = pipeline.host_waits
    for x, (column, event) in zip(images, ready, strict=True):
        pipeline.hand_over(event)
        got = gpu.infer({"x": column})["logits"]
        want = cpu.infer({"x": twin.cpu_pass(x)})["logits"]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert pipeline.host_waits - waits == len(images)  # one host wait per batch

    # host inputs: through the pinned buffers, on the inference stream
    x = twin.cpu_pass(images[2])
    np.testing.assert_allclose(
        gpu.infer({"x": x})["logits"], cpu.infer({"x": x})["logits"], rtol=1e-4, atol=1e-4
    )
    gpu.unload()


class _Timed(torch.nn.Module):  # type: ignore[misc]
    """A heavy model that records CUDA timing events on the stream it runs on."""

    def __init__(self, layers: int = 48, width: int = 4096) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.body = torch.nn.Sequential(
            *(torch.nn.Linear(width, width, bias=False) for _ in range(layers))
        )
        self.head = torch.nn.Linear(width, 10)
        self.start: Any = None
        self.end: Any = None

    def forward(self, x: Any) -> Any:
        start = torch.cuda.Event(enable_timing=True)
        start.record()  # the current stream: the instance's inference stream
        self.start = start
        y = self.head(self.body(x))
        self.end = torch.cuda.Event(enable_timing=True)
        self.end.record()
        return y


def test_preprocessing_of_the_next_batch_runs_while_this_batch_infers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    width = 4096
    model = _Timed(width=width)
    signature = {
        **SIGNATURE,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [width]}],
    }
    monkeypatch.setattr(torch_runtime, "_load_module", lambda *a: (model.to("cuda:0"), {}))
    backend = TorchBackend()
    backend.load(ModelSpec("m", Path("unused.pth"), signature), "cuda:0")
    pipeline, pre = backend.gpu, backend.preprocess_stream
    assert pipeline is not None
    stage = NormalizeNCHW(PARAMS)
    stage.setup(StageContext("m", "cuda:0", pre))
    images = np.random.default_rng(8).integers(0, 256, (256, 224, 224, 3), dtype=np.uint8)
    # Warm up both sides first (CuPy compiles the kernel on its first launch, cuBLAS sets
    # up on the first product, the pinned buffers are allocated), so that the timed run
    # queues work rather than compiling it.
    for _ in range(2):
        stage.process(Batch(list(range(256)), {"x": images}))
    backend.infer({"x": np.zeros((8, width), np.float32)})
    model.start = model.end = None
    pre_view = torch.cuda.ExternalStream(pre.cuda_stream, device="cuda:0")
    x0 = torch.randn(width, width, device="cuda:0")
    torch.cuda.synchronize()
    origin = torch.cuda.Event(enable_timing=True)
    origin.record(pre_view)
    pipeline.hand_over(pipeline.preprocessed())
    out: list[Any] = []
    infer = threading.Thread(target=lambda: out.append(backend.infer({"x": x0})))
    infer.start()  # batch 0 infers on the inference stream (its own thread, as in the runtime)
    deadline = time.monotonic() + 30
    while model.start is None or not model.start.query():  # batch 0 is running on the GPU
        assert time.monotonic() < deadline, "inference never started"
        time.sleep(0.0005)

    # batch 1's preprocessing, queued now on the preprocess stream
    begin, finish = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record(pre_view)
    stage.process(Batch(list(range(256)), {"x": images}))
    finish.record(pre_view)
    pipeline.preprocessed()
    infer.join(60)
    assert out, "inference did not finish"
    torch.cuda.synchronize()

    at = {name: origin.elapsed_time(e) for name, e in [
        ("infer start", model.start), ("infer end", model.end),
        ("pre start", begin), ("pre end", finish),
    ]}  # fmt: skip
    print("GPU timeline (ms after origin):", {k: round(v, 3) for k, v in at.items()})
    assert at["infer start"] < at["pre start"] < at["infer end"]
    assert at["pre end"] < at["infer end"]  # all of it inside the inference of batch 0
    backend.unload()


def test_the_runtime_serves_a_gpu_instance_with_the_cpus_results(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ModelRuntime's threads on a real GPU instance: normalize_nchw on the preprocess
    stream, the torch model on the inference stream, the next batch queued before each
    wait; every result as the CPU computes it, one host wait per batch."""
    from pipeline.config.topology import ModelSettings
    from pipeline.serving.graph import ServedModel
    from pipeline.serving.outcomes import Outcome, OutcomeEncoder
    from pipeline.serving.runtime import ModelRuntime
    from schemas.codec import AvroCodec
    from schemas.messages import Envelope, Request

    gpu = _backend(monkeypatch, _classifier(), "cuda:0")
    cpu = _backend(monkeypatch, _classifier(), "cpu")
    assert gpu.gpu is not None
    stage = NormalizeNCHW(PARAMS)
    stage.setup(StageContext("m", "cuda:0", gpu.preprocess_stream))
    twin = NormalizeNCHW(PARAMS)
    twin.setup(StageContext("m", "cpu"))
    settings = ModelSettings(
        name="m",
        version="1",
        backend="torch",
        artifact="unused.pth",
        inputs=[{"name": "x", "datatype": "UINT8", "shape": [H, W, 3]}],
    )
    info = ModelInfo(
        {"x": TensorSpec("FP32", (3, H, W))}, {"logits": TensorSpec("FP32", (10,))}, None, "cuda:0"
    )
    declared = {"x": TensorSpec("UINT8", (H, W, 3))}
    graph = ServedModel(
        settings, [stage], [], [gpu], info, declared, dict(info.outputs), ["cuda:0"]
    )
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def emit(batch: list[Outcome]) -> None:
        with lock:
            outcomes.extend(batch)

    codec = AvroCodec()
    runtime = ModelRuntime(graph, OutcomeEncoder(codec, "results", "dlq"), emit)
    rng = np.random.default_rng(9)
    images = {i: rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for i in range(96)}
    waits = gpu.gpu.host_waits
    runtime.start()
    try:
        for first in range(0, 96, 8):
            runtime.submit([
                Envelope(
                    topic="in", partition=0, offset=i, key=None, value=b"",
                    timestamp_ms=0, consumed_at=time.monotonic(),
                    request=Request(f"r{i}", "m", {"x": images[i]}),
                )
                for i in range(first, first + 8)
            ])  # fmt: skip
        deadline = time.monotonic() + 60
        while runtime.busy and time.monotonic() < deadline:
            time.sleep(0.001)
    finally:
        assert runtime.stop(10)
    assert len(outcomes) == 96
    assert gpu.gpu.host_waits - waits == 12  # one per batch of 8
    for o in outcomes:
        assert o.reason is None, o.headers
        got = codec.decode_result(o.value).outputs["logits"]
        x = images[o.envelope.offset][None]
        want = cpu.infer({"x": twin.cpu_pass(x)})["logits"][0]
        np.testing.assert_allclose(got.reshape(-1), want, rtol=1e-4, atol=1e-4)
    gpu.unload()
