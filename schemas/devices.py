"""Device strings as topology.yaml writes them, and what counts as an array on a device.

``cpu``, ``cuda`` (= ``cuda:0``), ``cuda:N`` and ``auto`` (the first GPU when the runtime
sees one, else the CPU). The topology's check, the backends' placement and the GPU
stages all read them through `parse_device`, so one pattern decides what a device is.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from schemas.errors import BackendError

__all__ = ["DEVICE_FORMS", "is_device_array", "parse_device"]

DEVICE_FORMS = "cpu, auto, cuda or cuda:N"
_DEVICE = re.compile(r"^(cpu|auto|cuda)(?::(\d+))?$")


def parse_device(device: str) -> tuple[str, int | None]:
    """``'cuda:1'`` → ``('cuda', 1)``; ``'cpu'`` → ``('cpu', None)``; `BackendError` if neither."""
    m = _DEVICE.match(device)
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise BackendError(f"device {device!r}: expected {DEVICE_FORMS}")
    kind, index = m.group(1), m.group(2)
    return kind, None if index is None else int(index)


def is_device_array(x: Any) -> bool:
    """Whether ``x`` is a non-NumPy array that can be handed over through DLPack."""
    return not isinstance(x, np.ndarray) and hasattr(x, "__dlpack__")
