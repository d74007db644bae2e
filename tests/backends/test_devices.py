"""Device strings, their resolution per runtime, and what counts as a device array."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
from gpu_fakes import POOL_SIZE, hide_cupy, install_fake_cupy, install_fake_torch_cuda

from backends import devices
from backends.devices import PinnedBuffers, resolve_device
from schemas.devices import is_device_array, parse_device
from schemas.errors import BackendError


@pytest.mark.parametrize(
    ("device", "parsed"),
    [
        ("cpu", ("cpu", None)),
        ("auto", ("auto", None)),
        ("cuda", ("cuda", None)),
        ("cuda:3", ("cuda", 3)),
    ],
)
def test_parse(device: str, parsed: tuple[str, int | None]) -> None:
    assert parse_device(device) == parsed


@pytest.mark.parametrize("device", ["gpu", "cpu:0", "auto:1", "cuda:x", ""])
def test_parse_refuses(device: str) -> None:
    with pytest.raises(BackendError, match="expected cpu, auto, cuda, cuda:N"):
        parse_device(device)


def test_an_unplaced_uuid_reaching_a_runtime_says_what_went_wrong() -> None:
    with pytest.raises(BackendError, match="a UUID is placed as cuda:N before a runtime"):
        parse_device("MIG-1111")


@pytest.mark.parametrize(
    ("device", "gpus", "placed"),
    [
        ("cpu", 2, "cpu"),
        ("auto", 0, "cpu"),
        ("auto", 2, "cuda:0"),
        ("cuda", 1, "cuda:0"),
        ("cuda:1", 2, "cuda:1"),
        ("auto", None, "cuda:0"),  # can use CUDA, cannot count: ONNX Runtime
        ("cuda:5", None, "cuda:5"),
    ],
)
def test_resolve(device: str, gpus: int | None, placed: str) -> None:
    assert resolve_device(device, gpus, "rt") == placed


def test_resolve_refuses_a_gpu_the_runtime_cannot_see() -> None:
    with pytest.raises(BackendError, match="device 'cuda': rt sees no CUDA device"):
        resolve_device("cuda", 0, "rt")
    with pytest.raises(BackendError, match=r"device 'cuda:2': rt sees 2 CUDA device\(s\)"):
        resolve_device("cuda:2", 2, "rt")


def test_device_arrays_are_dlpack_capable_non_numpy_arrays() -> None:
    torch = pytest.importorskip("torch")
    assert not is_device_array(np.zeros(3))
    assert not is_device_array([1, 2])
    assert is_device_array(torch.zeros(3))


def test_pinned_buffers_are_reused_and_grow() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("pinned memory needs a CUDA driver")
    buffers = PinnedBuffers()
    a = buffers.view("x", (4, 8), torch.float32)
    b = buffers.view("x", (2, 8), torch.float32)
    assert a.is_pinned()
    assert a.data_ptr() == b.data_ptr()
    c = buffers.view("x", (64, 8), torch.float32)
    assert c.shape == (64, 8)


# -- streams an instance owns: made for it, never one of torch's pooled 32 -----------------


def test_each_instance_stream_is_a_new_non_blocking_cupy_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cupy = install_fake_cupy(monkeypatch)
    streams = [devices.instance_stream(1) for _ in range(POOL_SIZE + 8)]
    assert all(s is not None for s in streams)
    handles = {s.cuda_stream for s in streams if s is not None}
    assert len(handles) == POOL_SIZE + 8
    assert all(made.non_blocking and made.device == 1 for made in cupy.made)
    first = streams[0]
    assert first is not None
    first.synchronize()
    assert cupy.made[0].synchronized == 1
    # close lets the CuPy stream go, which destroys what CuPy created
    alive = weakref.ref(cupy.made[0])
    cupy.made.clear()
    first.close()
    gc.collect()
    assert alive() is None


def test_without_cupy_the_stream_is_created_through_torch_and_destroyed_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hide_cupy(monkeypatch)
    cuda = install_fake_torch_cuda(monkeypatch)
    streams = [devices.instance_stream(0) for _ in range(POOL_SIZE + 8)]
    assert cuda.pooled == 0
    assert [s.cuda_stream for s in streams if s is not None] == cuda.created
    assert len(set(cuda.created)) == POOL_SIZE + 8
    first = streams[0]
    assert first is not None
    view = first.torch()
    assert view.cuda_stream == first.cuda_stream
    first.synchronize()
    assert view.synchronized == 1
    first.close()
    first.close()
    assert cuda.destroyed == [cuda.created[0]]
    del streams, first, view
    gc.collect()
    assert sorted(cuda.destroyed) == sorted(cuda.created)  # collected ones are destroyed too


def test_a_stream_cuda_cannot_create_is_a_backend_error(monkeypatch: pytest.MonkeyPatch) -> None:
    hide_cupy(monkeypatch)
    install_fake_torch_cuda(monkeypatch).status = 2
    with pytest.raises(BackendError, match="cuda:0: cannot create a CUDA stream: error 2"):
        devices.instance_stream(0)


def test_no_stream_without_cupy_or_a_cuda_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    hide_cupy(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.instance_stream(0) is None
