"""The machine's NVIDIA GPUs and MIG slices as NVML lists them, for placement.

NVML (``nvidia-ml-py``, in the GPU extras) is read, not CUDA: it answers without creating
a CUDA context, sees every GPU whatever ``CUDA_VISIBLE_DEVICES`` hides, knows each
device's free memory now and its MIG slices' UUIDs, and so can be asked before the
process decides which devices CUDA may see (`pipeline.serving.placement`). It numbers
GPUs in PCI bus order, as ``nvidia-smi`` does; CUDA does too under
``CUDA_DEVICE_ORDER=PCI_BUS_ID``, which placement sets when it relies on that.

Written against NVML's documented calls (``nvmlDeviceGetHandleByIndex``,
``nvmlDeviceGetMigMode``, ``nvmlDeviceGetMigDeviceHandleByIndex`` ...) and tested with a
fake ``pynvml``; NOT RUN against a real driver (no GPU on the project's machines, and no
MIG-enabled GPU on the ones lent to it). Where NVML is missing or fails, the inventory is
empty and says why: a CPU machine places everything as the topology wrote it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["Gpu", "Inventory", "MigSlice", "import_nvml", "read_inventory"]

GIB = 2**30
_T = TypeVar("_T")


@dataclass(frozen=True)
class MigSlice:
    """One MIG device (a GPU instance's compute instance): what CUDA can be given."""

    uuid: str
    gpu: int  # the parent's NVML index
    memory_total: int
    memory_free: int


@dataclass(frozen=True)
class Gpu:
    """One physical GPU, at NVML index ``index`` (PCI bus order)."""

    index: int
    uuid: str
    name: str
    bus_id: str
    memory_total: int
    memory_free: int
    mig: bool = False  # MIG mode on: CUDA work runs only on its slices
    slices: tuple[MigSlice, ...] = ()

    def describe(self) -> str:
        """``0 NVIDIA H100 GPU-8932f937… 71.2 of 80.0 GiB free`` (one line)."""
        mode = f", MIG on: {len(self.slices)} slice(s)" if self.mig else ""
        return (
            f"{self.index} {self.name} {self.uuid} {_gib(self.memory_free)} of "
            f"{_gib(self.memory_total)} GiB free{mode}"
        )


@dataclass(frozen=True)
class Inventory:
    """What NVML listed, or why it could not list anything (``problem``)."""

    gpus: tuple[Gpu, ...] = ()
    problem: str | None = None

    @property
    def slices(self) -> tuple[MigSlice, ...]:
        """Every MIG slice of every GPU."""
        return tuple(s for g in self.gpus for s in g.slices)

    def gpu(self, uuid: str) -> Gpu | None:
        """The GPU with this UUID (or the unique one it abbreviates, as CUDA allows)."""
        return _unique([g for g in self.gpus if g.uuid.startswith(uuid)])

    def slice(self, uuid: str) -> MigSlice | None:
        """The MIG slice with this UUID (or the unique one it abbreviates)."""
        return _unique([s for s in self.slices if s.uuid.startswith(uuid)])

    def lines(self) -> list[str]:
        """A listing for people: each GPU, then its slices, indented."""
        if not self.gpus:
            return [f"no NVIDIA GPU listed ({self.problem or 'NVML lists none'})"]
        out = []
        for g in self.gpus:
            out.append(g.describe())
            out += [
                f"  {s.uuid} {_gib(s.memory_free)} of {_gib(s.memory_total)} GiB free"
                for s in g.slices
            ]
        return out


def _unique(found: list[_T]) -> _T | None:
    return found[0] if len(found) == 1 else None


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def import_nvml() -> Any:
    """The ``pynvml`` module of nvidia-ml-py, or None where it is not installed."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:  # nvidia-ml-py is in the GPU extras only
        return None
    return pynvml


def read_inventory(nvml: Any = None) -> Inventory:
    """List the GPUs and MIG slices now; an empty `Inventory` with its reason on failure."""
    nvml = nvml if nvml is not None else import_nvml()
    if nvml is None:
        return Inventory(problem="nvidia-ml-py is not installed (the gpu extras install it)")
    try:
        nvml.nvmlInit()
    except Exception as e:  # no driver: a CPU machine
        return Inventory(problem=f"NVML did not start: {e}")
    try:
        return Inventory(tuple(_gpu(nvml, i) for i in range(nvml.nvmlDeviceGetCount())))
    except Exception as e:  # a GPU NVML cannot read: say so rather than place blind
        return Inventory(problem=f"NVML could not list the GPUs: {e}")
    finally:
        with contextlib.suppress(Exception):  # nothing to release if it fails
            nvml.nvmlShutdown()


def _gpu(nvml: Any, index: int) -> Gpu:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    try:
        mig = nvml.nvmlDeviceGetMigMode(handle)[0] == 1  # [current, pending]; 1 is enabled
    except Exception:  # NVML_ERROR_NOT_SUPPORTED: a GPU without MIG
        mig = False
    slices: list[MigSlice] = []
    if mig:
        for j in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
            try:
                sub = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, j)
            except Exception:  # NVML_ERROR_NOT_FOUND: no slice made at this index
                continue
            sub_memory = nvml.nvmlDeviceGetMemoryInfo(sub)
            slices.append(
                MigSlice(
                    _text(nvml.nvmlDeviceGetUUID(sub)),
                    index,
                    int(sub_memory.total),
                    int(sub_memory.free),
                )
            )
    return Gpu(
        index=index,
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        name=_text(nvml.nvmlDeviceGetName(handle)),
        bus_id=_text(nvml.nvmlDeviceGetPciInfo(handle).busId),
        memory_total=int(memory.total),
        memory_free=int(memory.free),
        mig=mig,
        slices=tuple(slices),
    )


def _text(value: Any) -> str:
    """Older nvidia-ml-py returns bytes where newer returns str."""
    return value.decode() if isinstance(value, bytes) else str(value)
