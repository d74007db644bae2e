"""Device strings, their resolution per runtime, and what counts as a device array."""

from __future__ import annotations

import numpy as np
import pytest

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
    with pytest.raises(BackendError, match="expected cpu, auto, cuda or cuda:N"):
        parse_device(device)


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
