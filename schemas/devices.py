"""Device strings, arrays on a device, and which GPU extra fits this machine's CUDA.

Device strings as topology.yaml writes them: ``cpu``, ``cuda`` (= ``cuda:0``), ``cuda:N``,
``auto`` (placed by free memory, `pipeline.serving.placement`; the first GPU the runtime
sees where NVML cannot list them, else the CPU), and NVML's UUIDs: a GPU's ``GPU-…`` and a
MIG slice's ``MIG-…`` (`is_uuid_device`). Placement turns UUIDs into ``cuda:N`` before a
backend or stage sees them; those read ``cpu``/``auto``/``cuda[:N]`` through
`parse_device`, so one pattern decides what a device is.

The GPU wheels come per CUDA major version (``cupy-cuda12x``/``cupy-cuda13x``, DALI's
``-cuda120``/``-cuda130``, onnxruntime-gpu before/from 1.27), gathered in the extras
``gpu-cu12`` and ``gpu-cu13``. Install hints name the one for this machine through
`gpu_extra`; it lives here so that stages and backends can both use it.
"""

from __future__ import annotations

import ctypes
import re
import sys
from typing import Any

import numpy as np

from schemas.errors import BackendError

__all__ = [
    "DEVICE_FORMS",
    "GPU_EXTRAS",
    "cuda_major",
    "gpu_extra",
    "gpu_extra_for",
    "gpu_install_hint",
    "is_device_array",
    "is_uuid_device",
    "parse_device",
]

DEVICE_FORMS = "cpu, auto, cuda, cuda:N, a GPU's UUID (GPU-...) or a MIG slice's (MIG-...)"
_DEVICE = re.compile(r"^(cpu|auto|cuda)(?::(\d+))?$")
# nvidia-smi -L's forms, including the older MIG-GPU-<uuid>/<gi>/<ci>; CUDA also takes a
# unique prefix of a UUID, and so does placement.
_UUID = re.compile(r"^(GPU|MIG)-[0-9A-Za-z][0-9A-Za-z/-]*$")


def is_uuid_device(device: str) -> bool:
    """Whether ``device`` names a GPU or MIG slice by NVML UUID (``GPU-…``/``MIG-…``)."""
    return _UUID.match(device) is not None


def parse_device(device: str) -> tuple[str, int | None]:
    """``'cuda:1'`` → ``('cuda', 1)``; ``'cpu'`` → ``('cpu', None)``; `BackendError` if neither."""
    m = _DEVICE.match(device)
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        if is_uuid_device(device):
            raise BackendError(
                f"device {device!r}: a UUID is placed as cuda:N before a runtime sees it "
                "(pipeline.serving.placement); this caller got it unplaced"
            )
        raise BackendError(f"device {device!r}: expected {DEVICE_FORMS}")
    kind, index = m.group(1), m.group(2)
    return kind, None if index is None else int(index)


def is_device_array(x: Any) -> bool:
    """Whether ``x`` is a non-NumPy array that can be handed over through DLPack."""
    return not isinstance(x, np.ndarray) and hasattr(x, "__dlpack__")


# The project's GPU extras by the CUDA major version their wheels are built for.
GPU_EXTRAS = {12: "gpu-cu12", 13: "gpu-cu13"}


def cuda_major() -> int | None:
    """The CUDA major version GPU wheels must match here, or None where none is found.

    A loaded PyTorch built for CUDA says it first: wheels beside it should share its CUDA.
    Else the driver: ``cuDriverGetVersion`` gives the newest CUDA it runs (1000 × major +
    10 × minor) and is documented without a ``cuInit`` first. Torch is not imported here:
    this runs on the way to an error message, where seconds of import only delay it.
    """
    torch = sys.modules.get("torch")
    version = getattr(getattr(torch, "version", None), "cuda", None)
    if isinstance(version, str) and version.partition(".")[0].isdigit():
        return int(version.partition(".")[0])
    return _driver_cuda_major()


def _driver_cuda_major() -> int | None:
    """From libcuda itself, so that no Python package is needed; None without a driver.

    Written against the CUDA driver API's documentation; NOT RUN here (no driver on the
    project's machines, where it returns None).
    """
    name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        lib = ctypes.CDLL(name)
        version = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
    except (OSError, AttributeError):  # no driver, or not NVIDIA's
        return None
    return version.value // 1000 or None


def gpu_extra() -> str:
    """``'kp-pipeline[gpu-cuNN]'`` for this machine's CUDA (`cuda_major`); both where unknown."""
    return gpu_extra_for(cuda_major())


def gpu_extra_for(major: int | None) -> str:
    """The GPU extra for CUDA ``major``; both, with their CUDA versions, for None.

    A driver newer than every extra runs the newest one (drivers run older CUDA); one
    older than all of them is treated as unknown.
    """
    fitting = [m for m in GPU_EXTRAS if major is not None and m <= major]
    if fitting:
        return f"'kp-pipeline[{GPU_EXTRAS[max(fitting)]}]'"
    return " or ".join(f"'kp-pipeline[{extra}]' (CUDA {m})" for m, extra in GPU_EXTRAS.items())


def gpu_install_hint() -> str:
    """The pip command for `gpu_extra`, for error messages."""
    return f"pip install {gpu_extra()}"
