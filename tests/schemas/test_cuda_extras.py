"""Which GPU extra an install hint names: from a loaded CUDA PyTorch, else the driver."""

from __future__ import annotations

import ctypes
import sys
from types import SimpleNamespace
from typing import Any

import pytest

from schemas import devices

BOTH = "'kp-pipeline[gpu-cu12]' (CUDA 12) or 'kp-pipeline[gpu-cu13]' (CUDA 13)"


def _machine(monkeypatch: pytest.MonkeyPatch, torch_cuda: str | None, driver: int | None) -> None:
    """A loaded torch built for ``torch_cuda`` (None: a CPU build), and a driver's major."""
    monkeypatch.setitem(
        sys.modules, "torch", SimpleNamespace(version=SimpleNamespace(cuda=torch_cuda))
    )
    monkeypatch.setattr(devices, "_driver_cuda_major", lambda: driver, raising=False)


@pytest.mark.parametrize(
    ("torch_cuda", "driver", "major"),
    [
        ("13.0", 13, 13),  # the project's GPU machines: torch 2.11+cu130, driver 580
        ("12.6", 13, 12),  # a cu126 torch on a CUDA 13 driver: match torch
        (None, 13, 13),  # CPU torch: the driver says
        (None, 12, 12),
        (None, None, None),  # no GPU anywhere (these machines)
    ],
)
def test_cuda_major_prefers_a_loaded_cuda_torch_then_the_driver(
    monkeypatch: pytest.MonkeyPatch, torch_cuda: str | None, driver: int | None, major: int | None
) -> None:
    _machine(monkeypatch, torch_cuda, driver)
    assert devices.cuda_major() == major


def test_without_torch_loaded_the_driver_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.setattr(devices, "_driver_cuda_major", lambda: 13)
    assert devices.cuda_major() == 13
    assert "torch" not in sys.modules  # not imported for a hint


@pytest.mark.parametrize(
    ("major", "extra"),
    [
        (12, "'kp-pipeline[gpu-cu12]'"),
        (13, "'kp-pipeline[gpu-cu13]'"),
        (14, "'kp-pipeline[gpu-cu13]'"),  # a newer driver runs CUDA 13 wheels
        (11, BOTH),  # older than every extra
        (None, BOTH),
    ],
)
def test_the_extra_for_each_cuda_major(major: int | None, extra: str) -> None:
    assert devices.gpu_extra_for(major) == extra


def test_install_hint_names_the_machines_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    _machine(monkeypatch, None, 13)
    assert devices.gpu_install_hint() == "pip install 'kp-pipeline[gpu-cu13]'"
    _machine(monkeypatch, None, None)
    assert devices.gpu_install_hint() == f"pip install {BOTH}"


class _FakeLibcuda:
    def __init__(self, version: int, status: int = 0) -> None:
        self.version, self.status = version, status

    def cuDriverGetVersion(self, ref: Any) -> int:  # noqa: N802 - the driver API's name
        ref._obj.value = self.version
        return self.status


@pytest.mark.parametrize(
    ("lib", "major"),
    [
        (_FakeLibcuda(13000), 13),  # driver 580
        (_FakeLibcuda(12080), 12),
        (_FakeLibcuda(13000, status=3), None),  # CUDA_ERROR_NOT_INITIALIZED
        (OSError("libcuda.so.1: cannot open shared object file"), None),
    ],
)
def test_driver_version_from_libcuda(
    monkeypatch: pytest.MonkeyPatch, lib: Any, major: int | None
) -> None:
    def load(name: str) -> Any:
        assert name in ("libcuda.so.1", "nvcuda.dll")
        if isinstance(lib, Exception):
            raise lib
        return lib

    monkeypatch.setattr(ctypes, "CDLL", load)
    assert devices._driver_cuda_major() == major
