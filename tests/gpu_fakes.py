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
    """A CUDA stream that counts host waits on it; ``cuda_stream`` is its handle.

    ``record`` logs "record" and returns an event whose ``synchronize`` (a host wait) logs
    "sync" and counts in ``synchronized`` like the stream's own; ``wait`` logs "wait".
    """

    def __init__(self, handle: int = 0x5EED, log: list[Any] | None = None) -> None:
        self.cuda_stream = handle
        self.synchronized = 0
        self.log = log if log is not None else []

    def synchronize(self) -> None:
        self.synchronized += 1
        self.log.append("sync")

    def record(self) -> FakeEvent:
        self.log.append("record")
        return FakeEvent(self)

    def wait(self, event: Any) -> None:
        self.log.append("wait")

    def close(self) -> None:
        self.log.append("close")


class FakeEvent:
    """An event on a `FakeStream`: a host wait on it counts as one on the stream."""

    def __init__(self, stream: FakeStream) -> None:
        self.stream = stream
        self.handle = id(self)
        self.done = False

    def synchronize(self) -> None:
        self.stream.synchronize()
        self.done = True

    def query(self) -> bool:
        return self.done


# -- a recording fake of streams and events: what was queued where, in which order ---------


class Timeline:
    """Every operation on the recording streams, and every host wait, in the order made.

    Entries are tuples: ``("record", stream, event)``, ``("wait", stream, event)``,
    ``("launch", stream, label)`` (work: a kernel, a copy, a model run),
    ``("host_wait", event)`` and ``("stream_sync", stream)`` (a host wait on a whole
    stream, which the pipeline never needs).
    """

    def __init__(self) -> None:
        self.log: list[tuple[str, ...]] = []
        self.events: dict[str, RecordingEvent] = {}

    def stream(self, name: str) -> RecordingStream:
        return RecordingStream(name, self)

    def index(self, entry: tuple[str, ...]) -> int:
        return self.log.index(entry)

    def host_waits(self) -> list[str]:
        return [e[1] for e in self.log if e[0] == "host_wait"]

    def on(self, stream: str) -> list[tuple[str, ...]]:
        """What was queued on one stream, in order (host waits left out)."""
        return [e for e in self.log if len(e) == 3 and e[1] == stream]

    def covers(self, event: str, label: str) -> bool:
        """Whether ``event`` was recorded after the launch ``label`` on the same stream."""
        ev = self.events[event]
        stream_ops = self.on(ev.stream)
        launch = ("launch", ev.stream, label)
        record = ("record", ev.stream, event)
        return launch in stream_ops and stream_ops.index(launch) < stream_ops.index(record)

    def waited_before(self, stream: str, label: str) -> set[str]:
        """The events ``stream`` waited on between its previous launch and ``label``."""
        ops = self.on(stream)
        end = ops.index(("launch", stream, label))
        start = max((i for i, e in enumerate(ops[:end]) if e[0] == "launch"), default=-1)
        return {e[2] for e in ops[start + 1 : end] if e[0] == "wait"}


class RecordingEvent:
    """An event on a recording stream; it completes when the host waits on it or
    ``complete`` is called (the GPU finishing it)."""

    def __init__(self, name: str, stream: str, timeline: Timeline) -> None:
        self.name = name
        self.stream = stream
        self.handle = 0xE000 + len(timeline.events)
        self.done = False
        self._timeline = timeline

    def synchronize(self) -> None:
        self._timeline.log.append(("host_wait", self.name))
        self.done = True

    def query(self) -> bool:
        return self.done

    def complete(self) -> None:
        self.done = True


class RecordingStream:
    """A CUDA stream that logs what is queued on it into a `Timeline`."""

    def __init__(self, name: str, timeline: Timeline) -> None:
        self.name = name
        self.cuda_stream = 0x5000 + 16 * len({e[1] for e in timeline.log if len(e) == 3})
        self.timeline = timeline
        self._recorded = 0

    def record(self) -> RecordingEvent:
        self._recorded += 1
        event = RecordingEvent(f"{self.name}#{self._recorded}", self.name, self.timeline)
        self.timeline.events[event.name] = event
        self.timeline.log.append(("record", self.name, event.name))
        return event

    def wait(self, event: RecordingEvent) -> None:
        self.timeline.log.append(("wait", self.name, event.name))

    def launch(self, label: str) -> None:
        self.timeline.log.append(("launch", self.name, label))

    def synchronize(self) -> None:
        self.timeline.log.append(("stream_sync", self.name))

    def close(self) -> None:
        self.log.append("close")


def install_fake_cupy(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """A ``cupy`` module whose ``cuda.Stream`` creates a new stream each time, like CuPy's."""
    state = types.SimpleNamespace(made=[], device=0, events=[], waits=[])

    class Stream:
        def __init__(self, non_blocking: bool = False) -> None:
            self.non_blocking = non_blocking
            self.device = state.device
            self.ptr = 0xC0DE000 + 16 * len(state.made)
            self.synchronized = 0
            state.made.append(self)

        def synchronize(self) -> None:
            self.synchronized += 1

        def wait_event(self, event: Any) -> None:
            state.waits.append((self, event))

    class Event:
        def __init__(self, block: bool = False, disable_timing: bool = False) -> None:
            self.ptr = 0xE7E000 + 16 * len(state.events)
            self.device = state.device
            self.disable_timing = disable_timing
            self.stream: Any = None
            self.done = False
            state.events.append(self)

        def record(self, stream: Any = None) -> None:
            self.stream = stream

        def synchronize(self) -> None:
            self.done = True

    @contextlib.contextmanager
    def device(index: int) -> Iterator[None]:
        before, state.device = state.device, index
        try:
            yield
        finally:
            state.device = before

    module = types.ModuleType("cupy")
    module.__dict__["cuda"] = types.SimpleNamespace(Stream=Stream, Device=device, Event=Event)
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
