"""What stages and backends share about CUDA streams: the protocols, and reuse after an event.

The ordering rules themselves are written where the streams are made, in
`backends.streams`; they live there because a backend makes an instance's streams. Stages
cannot import ``backends`` (layering), yet a GPU stage keeps the same rule for its own
buffers (a pinned buffer reused only after the event that released it): so the small
pieces both need are here, on the ground floor. Nothing here imports a CUDA library.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["BufferRing", "Event", "LibraryEvent", "Stream"]


class Event(Protocol):
    """A CUDA event: ``handle`` is the raw ``cudaEvent_t`` (what TensorRT takes)."""

    @property
    def handle(self) -> int:
        """The raw ``cudaEvent_t``."""
        ...

    def synchronize(self) -> None:
        """Block the calling host thread until the event has completed."""
        ...

    def query(self) -> bool:
        """Whether the event has completed (never blocks)."""
        ...


class Stream(Protocol):
    """A CUDA stream the pipeline orders: record events on it, make it wait on others."""

    cuda_stream: int

    def record(self) -> Event:
        """A new event recorded on this stream now (after the work queued so far)."""
        ...

    def wait(self, event: Event) -> None:
        """Make the work queued here from now on wait for ``event`` (no host wait)."""
        ...


@dataclass(slots=True)
class LibraryEvent:
    """A CuPy or PyTorch CUDA event as an `Event` (``raw`` is the library's own object).

    CuPy's ``Event`` has ``ptr`` and ``done``; PyTorch's ``cuda_event`` and ``query()``;
    both ``synchronize()`` (their documented APIs).
    """

    raw: Any

    @property
    def handle(self) -> int:
        """The raw ``cudaEvent_t``."""
        ptr = getattr(self.raw, "ptr", None)
        return int(self.raw.cuda_event if ptr is None else ptr)

    def synchronize(self) -> None:
        """Block the host until the event completed."""
        self.raw.synchronize()

    def query(self) -> bool:
        """Whether the event completed (never blocks)."""
        done = getattr(self.raw, "done", None)
        return bool(self.raw.query() if done is None else done)


@dataclass(slots=True)
class _Slot:
    buffer: Any = None
    released: Event | None = None  # None: never used, or known complete


class BufferRing:
    """Reusable buffers of one kind, each reused only after the event that released it.

    ``depth`` slots are handed out in turn. `take` returns a slot's buffer once it is safe
    to write: for a device writer, after a stream wait on its release event; for a host
    writer, after that event completed (a host wait only if it has not). ``make`` builds
    a slot's buffer when it has none or ``fits`` says the one it has is too small.
    """

    def __init__(
        self,
        make: Callable[[Any], Any],
        *,
        depth: int = 2,
        fits: Callable[[Any, Any], bool] | None = None,
        on_host_wait: Callable[[], None] | None = None,
    ) -> None:
        if depth < 1:
            raise ValueError("a ring needs at least one slot")
        self._make = make
        self._fits = fits or (lambda buffer, need: True)
        self._slots = [_Slot() for _ in range(depth)]
        self._next = 0
        self._on_host_wait = on_host_wait or (lambda: None)
        self._lock = threading.Lock()

    def take(self, need: Any, *, writer: Stream | None = None) -> tuple[int, Any]:
        """The next slot's index and buffer, safe to write once this returns.

        ``writer`` is the stream that writes the buffer; None means the host writes it.
        """
        with self._lock:
            index = self._next
            self._next = (index + 1) % len(self._slots)
            slot = self._slots[index]
        released, slot.released = slot.released, None
        if released is not None:
            if writer is not None:
                writer.wait(released)
            elif not released.query():
                self._on_host_wait()
                released.synchronize()
        if slot.buffer is None or not self._fits(slot.buffer, need):
            slot.buffer = self._make(need)
        return index, slot.buffer

    def release(self, index: int, event: Event | None) -> None:
        """Slot ``index`` is free once ``event`` completes (None: free now)."""
        self._slots[index].released = event

    def clear(self) -> None:
        """Drop every buffer (the caller has waited for their last users)."""
        for slot in self._slots:
            slot.buffer, slot.released = None, None
