"""GPU metrics on a fake NVML: each ``cuda:N`` is the GPU CUDA calls N, found by PCI bus id.

NVML numbers every GPU of the machine in its own order; CUDA numbers only those in
``CUDA_VISIBLE_DEVICES``, fastest first by default. The fakes below give NVML one order
and CUDA (the bus-id lookup) another, so a sampler that labels NVML index i ``cuda:i``
reports the wrong GPU's figures.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest

from pipeline.observability import metrics as metrics_module
from pipeline.observability.metrics import GpuSampler, Metrics

# Physical GPUs as NVML lists them (its own index order), with the figures it reports:
# memory used (bytes) and busy percent. NVML writes bus ids with an 8-digit domain.
A, B, C, D = "00000000:1A:00.0", "00000000:3B:00.0", "00000000:5C:00.0", "00000000:7D:00.0"
FIGURES = {A: (1_000, 10), B: (2_000, 20), C: (3_000, 30), D: (4_000, 40)}


def _cuda(bus_id: str) -> str:
    """The same GPU as CUDA and PyTorch write it: a 4-digit domain."""
    return bus_id[4:]


def _pci(bus_id: str) -> tuple[int, ...]:
    return tuple(int(part, 16) for part in re.split(r"[:.]", bus_id))


class NVMLError(Exception):
    pass


class _FakeNvml:
    """pynvml over `FIGURES`: the calls the sampler makes, now and before the fix.

    The methods keep pynvml's camelCase names (hence the noqa).
    """

    def __init__(
        self, order: Sequence[str], refused: Sequence[str] = (), unreadable: Sequence[str] = ()
    ) -> None:
        self.order = list(order)
        self.refused = set(refused)
        self.unreadable = set(unreadable)

    def nvmlInit(self) -> None:  # noqa: N802
        pass

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return len(self.order)

    def _handle(self, bus_id: str) -> str:
        if bus_id in self.refused:
            raise NVMLError("Insufficient Permissions")
        return bus_id

    def nvmlDeviceGetHandleByIndex(self, i: int) -> str:  # noqa: N802
        return self._handle(self.order[i])

    def nvmlDeviceGetHandleByPciBusId(self, bus_id: bytes | str) -> str:  # noqa: N802
        text = bus_id.decode() if isinstance(bus_id, bytes) else bus_id
        for known in self.order:  # NVML parses the id, so both domain widths match
            if _pci(known) == _pci(text):
                return self._handle(known)
        raise NVMLError("Not Found")

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> Any:  # noqa: N802
        if handle in self.unreadable:
            raise NVMLError("GPU is lost")
        return SimpleNamespace(used=FIGURES[handle][0])

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> Any:  # noqa: N802
        return SimpleNamespace(gpu=FIGURES[handle][1])


def _sample(
    monkeypatch: pytest.MonkeyPatch, nvml: _FakeNvml, cuda_sees: Sequence[str], times: int = 1
) -> dict[str, tuple[float, float]]:
    """{device label: (memory used, utilization)} after sampling through the fakes."""
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    visible = [_cuda(b) for b in cuda_sees]
    monkeypatch.setattr(metrics_module, "cuda_bus_ids", lambda: visible, raising=False)
    m = Metrics()
    sampler = GpuSampler(m)
    for _ in range(times):
        sampler.sample()
    out = {}
    for family in m.registry.collect():
        for s in family.samples:
            if s.name in ("kp_gpu_memory_used_bytes", "kp_gpu_utilization_ratio"):
                used, busy = out.get(s.labels["device"], (None, None))
                if s.name == "kp_gpu_memory_used_bytes":
                    used = s.value
                else:
                    busy = s.value
                out[s.labels["device"]] = (used, busy)
    return out


def test_devices_are_matched_by_bus_id_when_nvml_orders_them_the_other_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # CUDA's default order is fastest first; NVML's is not: here they are reversed.
    got = _sample(monkeypatch, _FakeNvml([A, B]), cuda_sees=[B, A])
    assert got == {"cuda:0": (2_000, 0.2), "cuda:1": (1_000, 0.1)}


def test_only_the_gpus_in_cuda_visible_devices_are_labelled_and_as_cuda_numbers_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # CUDA_VISIBLE_DEVICES=2,0: CUDA sees NVML's third GPU as cuda:0, its first as cuda:1.
    got = _sample(monkeypatch, _FakeNvml([A, B, C, D]), cuda_sees=[C, A])
    assert got == {"cuda:0": (3_000, 0.3), "cuda:1": (1_000, 0.1)}


def test_a_device_nvml_refuses_is_skipped_and_logged_once_the_others_are_sampled(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=metrics_module.__name__)
    got = _sample(monkeypatch, _FakeNvml([A, B, C], refused=[B]), cuda_sees=[A, B, C], times=3)
    assert got == {"cuda:0": (1_000, 0.1), "cuda:2": (3_000, 0.3)}
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "cuda:1" in warnings[0]
    assert "3B:00.0" in warnings[0]


def test_a_device_that_stops_answering_is_logged_once_and_the_others_still_sampled(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=metrics_module.__name__)
    got = _sample(monkeypatch, _FakeNvml([A, B], unreadable=[A]), cuda_sees=[A, B], times=3)
    assert got == {"cuda:1": (2_000, 0.2)}
    assert [r.getMessage() for r in caplog.records] == [
        "no GPU metrics for cuda:0: NVML cannot read it: GPU is lost"
    ]


def test_nvml_and_the_bus_ids_can_be_passed_in() -> None:
    m = Metrics()
    sampler = GpuSampler(m, nvml=_FakeNvml([A, B]), bus_ids=lambda: [_cuda(B)])
    sampler.sample()
    assert sampler.available
    assert m.registry.get_sample_value("kp_gpu_memory_used_bytes", {"device": "cuda:0"}) == 2_000
    assert m.registry.get_sample_value("kp_gpu_memory_used_bytes", {"device": "cuda:1"}) is None


def test_unreadable_bus_ids_export_nothing_and_say_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken() -> list[str]:
        raise RuntimeError("no CUDA runtime")

    caplog.set_level(logging.WARNING, logger=metrics_module.__name__)
    sampler = GpuSampler(Metrics(), nvml=_FakeNvml([A]), bus_ids=broken)
    assert not sampler.available
    assert "no CUDA runtime" in caplog.text


# -- cuda_bus_ids: CUDA's numbering, read through PyTorch or CuPy.


def _fake_torch(cuda: bool, buses: Sequence[int]) -> Any:
    def properties(i: int) -> Any:
        return SimpleNamespace(pci_domain_id=0, pci_bus_id=buses[i], pci_device_id=0)

    return SimpleNamespace(
        cuda=SimpleNamespace(
            is_available=lambda: cuda,
            device_count=lambda: len(buses),
            get_device_properties=properties,
        )
    )


def _fake_cupy(ids: Sequence[str]) -> Any:
    runtime = SimpleNamespace(getDeviceCount=lambda: len(ids), deviceGetPCIBusId=ids.__getitem__)
    return SimpleNamespace(cuda=SimpleNamespace(runtime=runtime))


def test_bus_ids_come_from_a_loaded_torch_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(True, [0x3B, 0x1A]))
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(["0000:99:00.0"]))
    assert metrics_module.cuda_bus_ids() == ["0000:3b:00.0", "0000:1a:00.0"]


def test_bus_ids_come_from_cupy_where_torch_is_not_loaded_or_sees_no_cuda(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(["0000:5C:00.0", "0000:1A:00.0"]))
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert metrics_module.cuda_bus_ids() == ["0000:5C:00.0", "0000:1A:00.0"]
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(False, []))  # a CPU build
    assert metrics_module.cuda_bus_ids() == ["0000:5C:00.0", "0000:1A:00.0"]
