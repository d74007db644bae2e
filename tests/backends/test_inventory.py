"""NVML's listing of GPUs and MIG slices, read through a fake ``pynvml``."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from backends.inventory import GIB, Inventory, MigSlice, read_inventory


class NVMLError(Exception):
    """pynvml's error type, by shape."""


class _FakeNvml:
    """Two GPUs: 0 whole, 1 in MIG mode with slices at indices 0 and 2 (1 is empty)."""

    def __init__(self, *, start_fails: bool = False, bytes_names: bool = False) -> None:
        self.start_fails, self.bytes_names, self.shut = start_fails, bytes_names, False

    def _s(self, text: str) -> Any:
        return text.encode() if self.bytes_names else text

    def nvmlInit(self) -> None:  # noqa: N802
        if self.start_fails:
            raise NVMLError("Driver Not Loaded")

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.shut = True

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> str:  # noqa: N802
        return f"gpu{i}"

    def nvmlDeviceGetUUID(self, h: str) -> Any:  # noqa: N802
        return self._s({"gpu0": "GPU-aaaa", "gpu1": "GPU-bbbb"}.get(h, f"MIG-{h}"))

    def nvmlDeviceGetName(self, h: str) -> Any:  # noqa: N802
        return self._s("NVIDIA H100")

    def nvmlDeviceGetPciInfo(self, h: str) -> Any:  # noqa: N802
        return SimpleNamespace(busId=self._s(f"00000000:0{h[-1]}:00.0"))

    def nvmlDeviceGetMemoryInfo(self, h: str) -> Any:  # noqa: N802
        free = {"gpu0": 70, "gpu1": 80, "s0": 9, "s2": 19}[h]
        return SimpleNamespace(total=80 * GIB, free=free * GIB)

    def nvmlDeviceGetMigMode(self, h: str) -> list[int]:  # noqa: N802
        if h == "gpu0":
            raise NVMLError("Not Supported")
        return [1, 1]

    def nvmlDeviceGetMaxMigDeviceCount(self, h: str) -> int:  # noqa: N802
        return 3

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: str, j: int) -> str:  # noqa: N802
        if j == 1:
            raise NVMLError("Not Found")
        return f"s{j}"


def test_gpus_and_their_mig_slices_are_listed_in_nvml_order() -> None:
    nvml = _FakeNvml()
    inv = read_inventory(nvml)
    assert inv.problem is None
    assert nvml.shut
    assert [(g.index, g.uuid, g.mig) for g in inv.gpus] == [
        (0, "GPU-aaaa", False),
        (1, "GPU-bbbb", True),
    ]
    assert inv.slices == (
        MigSlice("MIG-s0", 1, 80 * GIB, 9 * GIB),
        MigSlice("MIG-s2", 1, 80 * GIB, 19 * GIB),
    )
    assert inv.gpus[0].memory_free == 70 * GIB
    assert inv.gpus[0].bus_id == "00000000:00:00.0"
    assert inv.lines()[0] == "0 NVIDIA H100 GPU-aaaa 70.0 of 80.0 GiB free"
    assert inv.lines()[1].endswith("MIG on: 2 slice(s)")
    assert inv.lines()[2] == "  MIG-s0 9.0 of 80.0 GiB free"


def test_older_bindings_returning_bytes_read_the_same() -> None:
    assert read_inventory(_FakeNvml(bytes_names=True)) == read_inventory(_FakeNvml())


def test_uuids_may_be_abbreviated_when_unique_as_cuda_allows() -> None:
    inv = read_inventory(_FakeNvml())
    assert inv.gpu("GPU-aa") is inv.gpus[0]
    assert inv.gpu("GPU-") is None  # two match: not unique
    assert inv.slice("MIG-s2") == inv.slices[1]
    assert inv.slice("MIG-zz") is None


def test_no_driver_is_an_empty_inventory_that_says_why() -> None:
    inv = read_inventory(_FakeNvml(start_fails=True))
    assert inv == Inventory(problem="NVML did not start: Driver Not Loaded")
    assert inv.lines() == ["no NVIDIA GPU listed (NVML did not start: Driver Not Loaded)"]
