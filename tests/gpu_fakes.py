"""Recording fakes of the CUDA pieces the backends touch, to test their GPU paths on a CPU.

The project's machines have no GPU: these stand in for CuPy's and PyTorch's stream APIs
and record what the backends ask of them (which streams were made, from which pool,
when the host waited on them), so the tests can check the order of things.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest

POOL_SIZE = 32
"""Streams per device and priority in c10's pool (kStreamsPerPoolBits = 5)."""


class FakeStream:
    """A CUDA stream that counts host synchronisations; ``cuda_stream`` is its handle."""

    def __init__(self, handle: int = 0x5EED, log: list[str] | None = None) -> None:
        self.cuda_stream = handle
        self.synchronized = 0
        self.log = log if log is not None else []

    def synchronize(self) -> None:
        self.synchronized += 1
        self.log.append("sync")

    def close(self) -> None:
        self.log.append("close")


def install_fake_cupy(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """A ``cupy`` module whose ``cuda.Stream`` creates a new stream each time, like CuPy's."""
    state = types.SimpleNamespace(made=[], device=0)

    class Stream:
        def __init__(self, non_blocking: bool = False) -> None:
            self.non_blocking = non_blocking
            self.device = state.device
            self.ptr = 0xC0DE000 + 16 * len(state.made)
            self.synchronized = 0
            state.made.append(self)

        def synchronize(self) -> None:
            self.synchronized += 1

    @contextlib.contextmanager
    def device(index: int) -> Iterator[None]:
        before, state.device = state.device, index
        try:
            yield
        finally:
            state.device = before

    module = types.ModuleType("cupy")
    module.__dict__["cuda"] = types.SimpleNamespace(Stream=Stream, Device=device)
    monkeypatch.setitem(sys.modules, "cupy", module)
    return state


def hide_cupy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import cupy`` fail, as on a machine without it."""
    monkeypatch.setitem(sys.modules, "cupy", None)


class ExternalStream:
    """``torch.cuda.ExternalStream``: a view of a stream someone else made."""

    def __init__(self, stream_ptr: int, device: Any = None) -> None:
        self.cuda_stream = stream_ptr
        self.device = device
        self.synchronized = 0

    def synchronize(self) -> None:
        self.synchronized += 1


def install_fake_torch_cuda(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """A CUDA PyTorch on one device: ``torch.cuda.Stream`` is c10's pool, round robin.

    ``cudart()`` answers ``cudaStreamCreate`` with a new handle each call and records
    ``cudaStreamDestroy``; ``state.pooled`` counts streams taken from the pool.
    """
    torch = pytest.importorskip("torch")
    state = types.SimpleNamespace(pooled=0, created=[], destroyed=[], status=0)

    class PooledStream:
        def __init__(self, device: Any = None, priority: int = 0) -> None:
            self.cuda_stream = 0x9000 + 16 * (state.pooled % POOL_SIZE)
            state.pooled += 1

        def synchronize(self) -> None:
            pass

    def create(address: int) -> int:
        if state.status:
            return int(state.status)
        handle = 0xA000 + 16 * len(state.created)
        ctypes.c_void_p.from_address(address).value = handle
        state.created.append(handle)
        return 0

    cudart = types.SimpleNamespace(
        cudaError=types.SimpleNamespace(success=0),
        cudaStreamCreate=create,
        cudaStreamDestroy=state.destroyed.append,
        cudaGetErrorString=lambda status: f"error {status}",
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", PooledStream)
    monkeypatch.setattr(torch.cuda, "ExternalStream", ExternalStream)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    return state
