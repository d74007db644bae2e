"""Placement: ``auto`` by free memory, GPUs and MIG slices by UUID, refusals naming the field.

Over a fake NVML inventory (no GPU here): two whole GPUs and a third in MIG mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from backends.inventory import GIB, Gpu, Inventory, MigSlice
from pipeline.config.topology import Topology
from pipeline.serving import placement as placement_module
from pipeline.serving.placement import Placement, apply_placement, place
from schemas.errors import ConfigError

SLICES = (MigSlice("MIG-1111", 2, 10 * GIB, 9 * GIB), MigSlice("MIG-2222", 2, 20 * GIB, 19 * GIB))
INVENTORY = Inventory(
    (
        Gpu(0, "GPU-aaaa", "H100", "0:1", 80 * GIB, 10 * GIB),
        Gpu(1, "GPU-bbbb", "H100", "0:2", 80 * GIB, 8 * GIB),
        Gpu(2, "GPU-cccc", "A100", "0:3", 40 * GIB, 40 * GIB, mig=True, slices=SLICES),
    )
)


def _topology(tmp_path: Path, *models: dict[str, Any]) -> Topology:
    listed = []
    for i, m in enumerate(models):
        artifact = tmp_path / f"m{i}.onnx"
        with artifact.open("wb") as f:  # sparse: the size is what placement reads
            f.truncate(int(m.pop("gib", 0) * GIB))
        listed.append(
            {
                "name": f"m{i}",
                "backend": "onnxruntime",
                "artifact": str(artifact),
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [4]}],
                **m,
            }
        )
    return Topology.model_validate(
        {"topics": {"input": ["in"], "output": "out", "dead_letter": "dlq"}, "models": listed}
    )


def _place(topology: Topology, env: dict[str, str] | None = None) -> Placement:
    return place(topology, "t.yaml", inventory=INVENTORY, environ=env if env is not None else {})


def _refused(topology: Topology, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as e:
        _place(topology, env)
    return str(e.value)


def test_a_topology_that_needs_no_placing_does_not_ask_nvml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no(*_: Any) -> Inventory:
        raise AssertionError("NVML read for a topology with nothing to place")

    monkeypatch.setattr(placement_module, "read_inventory", no)
    topology = _topology(tmp_path, {"device": ["cpu", "cuda:1"], "instances": 3})
    placed = place(topology, "t.yaml", environ={})
    assert placed.devices == [["cpu", "cuda:1", "cpu"]]
    assert placed.environment == {}


def test_auto_spreads_instances_by_the_free_memory_left(tmp_path: Path) -> None:
    # 10 and 8 GiB free, 3 GiB each: 10→7 on cuda:0, 8→5 on cuda:1, then 7→4 on cuda:0.
    placed = _place(_topology(tmp_path, {"device": "auto", "instances": 3, "gib": 3}))
    assert placed.devices == [["cuda:0", "cuda:1", "cuda:0"]]
    assert placed.environment == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert placed.notes[0][0].startswith("auto → cuda:0 (GPU-aaaa: 10.0 GiB free")
    assert any("cuda:1 (GPU-bbbb: 8.0 GiB" in n for n in placed.notes[0])


def test_auto_counts_what_the_topology_put_on_a_gpu_explicitly(tmp_path: Path) -> None:
    topology = _topology(tmp_path, {"device": "GPU-aaaa", "gib": 4}, {"device": "auto", "gib": 1})
    placed = _place(topology)
    assert placed.devices == [["cuda:0"], ["cuda:1"]]  # 10 - 4 = 6 GiB < 8 GiB free
    assert placed.notes[0] == ["GPU-aaaa is cuda:0 (PCI bus order)"]


def test_auto_never_lands_on_a_mig_gpu_without_a_slice(tmp_path: Path) -> None:
    placed = _place(_topology(tmp_path, {"device": "auto"}), {"CUDA_VISIBLE_DEVICES": "2"})
    assert placed.devices == [["auto"]]
    assert "MIG GPUs need a slice" in placed.notes[0][0]


def test_auto_without_nvml_is_left_to_the_runtime_and_says_why(tmp_path: Path) -> None:
    placed = place(
        _topology(tmp_path, {"device": "auto"}),
        "t.yaml",
        inventory=Inventory(problem="nvidia-ml-py is not installed"),
        environ={},
    )
    assert placed.devices == [["auto"]]
    assert placed.environment == {}
    assert placed.notes == [
        ["auto: left to the runtime (nvidia-ml-py is not installed): its first GPU, else the CPU"]
    ]


def test_gpu_uuids_become_the_index_cuda_will_give_them(tmp_path: Path) -> None:
    topology = _topology(tmp_path, {"device": ["GPU-bbbb", "GPU-aa"], "instances": 2})
    assert _place(topology).devices == [["cuda:1", "cuda:0"]]  # a unique prefix does
    reordered = _place(topology, {"CUDA_VISIBLE_DEVICES": "GPU-bbbb,0"})
    assert reordered.devices == [["cuda:0", "cuda:1"]]


def test_auto_inside_a_process_given_one_mig_slice_runs_on_it(tmp_path: Path) -> None:
    placed = _place(_topology(tmp_path, {"device": "auto"}), {"CUDA_VISIBLE_DEVICES": "MIG-2222"})
    assert placed.devices == [["cuda:0"]]
    assert placed.environment == {}
    # CUDA enumerates only the first MIG device listed, and nothing after it.
    two = _topology(tmp_path, {"device": "auto", "instances": 2, "gib": 15})
    assert _place(two, {"CUDA_VISIBLE_DEVICES": "MIG-2222,0"}).devices == [["cuda:0", "cuda:0"]]


@pytest.mark.parametrize(
    ("device", "env", "words"),
    [
        ("GPU-ffff", {}, "no GPU GPU-ffff here (NVML lists: GPU-aaaa, GPU-bbbb, GPU-cccc)"),
        ("GPU-cccc", {}, "is in MIG mode, where CUDA runs work only on its slices"),
        ("GPU-aaaa", {"CUDA_VISIBLE_DEVICES": "1"}, "hidden from this process by"),
        ("GPU-aaaa", {"CUDA_DEVICE_ORDER": "FASTEST_FIRST"}, "CUDA_DEVICE_ORDER=FASTEST_FIRST"),
        ("auto", {"CUDA_DEVICE_ORDER": "FASTEST_FIRST"}, "unset it or set PCI_BUS_ID"),
        ("MIG-9999", {}, "no MIG slice MIG-9999 here (NVML lists: MIG-1111, MIG-2222)"),
    ],
)
def test_devices_that_cannot_be_placed_are_refused_naming_the_field(
    tmp_path: Path, device: str, env: dict[str, str], words: str
) -> None:
    message = _refused(_topology(tmp_path, {"device": device}), env)
    assert message.startswith("t.yaml: models[0].device: ")
    assert words in message


def test_a_mig_slice_is_the_process_cuda_0_and_all_it_sees(tmp_path: Path) -> None:
    topology = _topology(
        tmp_path,
        {"device": "MIG-2222", "instances": 2},
        {"device": "auto"},
        {"device": "cpu"},
    )
    placed = _place(topology)
    assert placed.devices == [["cuda:0", "cuda:0"], ["cuda:0"], ["cpu"]]
    assert placed.environment == {"CUDA_VISIBLE_DEVICES": "MIG-2222"}
    assert placed.notes[0] == ["MIG-2222 (MIG slice of GPU 2) is cuda:0"]
    assert _place(topology, {"CUDA_VISIBLE_DEVICES": "MIG-2222"}).devices == placed.devices


def test_nothing_else_may_share_a_process_with_a_mig_slice(tmp_path: Path) -> None:
    beside = _refused(_topology(tmp_path, {"device": "MIG-1111"}, {"device": "cuda:1"}))
    assert beside.startswith("t.yaml: models[1].device: cuda:1 beside the MIG slice models[0]")
    mixed = _refused(_topology(tmp_path, {"device": ["MIG-1111", "cuda:0"]}))
    assert "MIG slices and other devices in one list" in mixed
    two = _refused(_topology(tmp_path, {"device": "MIG-1111"}, {"device": "MIG-2222"}))
    assert two.startswith("t.yaml: models[1].device: slice MIG-2222, but models[0] runs on")
    shown = _refused(_topology(tmp_path, {"device": "MIG-1111"}), {"CUDA_VISIBLE_DEVICES": "0"})
    assert "CUDA_VISIBLE_DEVICES=0 shows this process another device" in shown


def test_a_list_of_slices_is_shared_out_over_workers(tmp_path: Path) -> None:
    topology = _topology(tmp_path, {"device": ["MIG-1111", "MIG-2222"], "instances": 2})
    alone = _refused(topology)
    assert "run `kp-pipeline run --workers 2`, where worker I takes slice I mod 2" in alone
    for worker, uuid in [("0", "MIG-1111"), ("1", "MIG-2222"), ("2", "MIG-1111")]:
        placed = _place(topology, {"KP_WORKER": worker})
        assert placed.devices == [["cuda:0", "cuda:0"]]
        assert placed.environment == {"CUDA_VISIBLE_DEVICES": uuid}


def test_uuid_devices_pass_the_topology_check_and_junk_does_not(tmp_path: Path) -> None:
    _topology(tmp_path, {"device": ["GPU-8932f937-d72c", "MIG-GPU-8932f937/1/0"]})
    for junk in ("cuda:GPU-aaaa", "GPU-", "mig-1111", "MIG"):
        with pytest.raises(ValueError, match="is not a device"):
            _topology(tmp_path, {"device": junk})


def test_apply_sets_the_environment_and_refuses_once_cuda_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plan = Placement([["cuda:0"]], [[]], {"CUDA_VISIBLE_DEVICES": "MIG-1111"})
    env: dict[str, str] = {}
    apply_placement(plan, env)
    assert env == {"CUDA_VISIBLE_DEVICES": "MIG-1111"}
    monkeypatch.setattr(placement_module, "_cuda_started", lambda: True)
    apply_placement(plan, env)  # already so: nothing to change
    with pytest.raises(ConfigError, match="CUDA already started in this process"):
        apply_placement(plan, {})
