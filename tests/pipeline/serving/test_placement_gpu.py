"""Placement against the real NVML of a GPU machine (``make gpu-check``; skipped here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from backends.inventory import read_inventory
from pipeline.config.topology import Topology
from pipeline.serving.placement import place

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _topology(tmp_path: Path, device: str) -> Topology:
    artifact = tmp_path / "m.onnx"
    artifact.write_bytes(b"\0" * 1024)
    return Topology.model_validate(
        {
            "topics": {"input": ["in"], "output": "out", "dead_letter": "dlq"},
            "models": [
                {
                    "name": "m",
                    "backend": "onnxruntime",
                    "artifact": str(artifact),
                    "device": device,
                    "inputs": [{"name": "x", "datatype": "FP32", "shape": [4]}],
                }
            ],
        }
    )


def test_nvml_lists_the_gpus_cuda_sees_and_a_uuid_places_on_the_same_bus(tmp_path: Path) -> None:
    inventory = read_inventory()
    assert inventory.problem is None, inventory.problem
    whole = [g for g in inventory.gpus if not g.mig]
    assert whole
    assert all(g.uuid.startswith("GPU-") and g.memory_free > 0 for g in whole)
    gpu = whole[-1]
    placed = place(
        _topology(tmp_path, gpu.uuid), "t.yaml", environ={"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    )
    (device,) = placed.devices[0]
    props = torch.cuda.get_device_properties(int(device.partition(":")[2]))
    bus = f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
    assert gpu.bus_id.lower().endswith(bus), (gpu.bus_id, bus)


def test_auto_places_on_a_gpu_with_the_most_free_memory(tmp_path: Path) -> None:
    inventory = read_inventory()
    placed = place(_topology(tmp_path, "auto"), "t.yaml", inventory=inventory, environ={})
    best = max((g for g in inventory.gpus if not g.mig), key=lambda g: g.memory_free)
    assert placed.devices == [[f"cuda:{best.index}"]], placed.notes
