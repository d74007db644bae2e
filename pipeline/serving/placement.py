"""Which device each model instance runs on: ``auto`` by free memory, GPUs and MIG slices by UUID.

The topology may name devices by what an operator reads in ``nvidia-smi -L`` (UUIDs) or
leave the choice to the pipeline (``auto``). Placement decides, before any model loads,
from NVML's inventory (`backends.inventory`), and hands each backend a plain ``cpu`` or
``cuda:N``; what it chose and why is printed by ``kp-pipeline validate``. The rules:

- ``cpu``, ``cuda`` and ``cuda:N`` stay as written.
- ``GPU-<uuid>`` becomes the ``cuda:N`` CUDA will number that GPU as in this process.
  CUDA numbers fastest first by default, NVML and nvidia-smi by PCI bus: placement sets
  ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (when the process has not set an order) so both agree,
  and maps through ``CUDA_VISIBLE_DEVICES`` when that is set (integer entries read as
  nvidia-smi's numbers). A GPU in MIG mode is refused by its GPU UUID: CUDA runs work only
  on its slices, so name one.
- ``MIG-<uuid>``: a CUDA process enumerates one MIG device (NVIDIA's MIG user guide), so
  a process serving a slice gets ``CUDA_VISIBLE_DEVICES=<slice>``, the slice is its
  ``cuda:0``, and no other GPU can be used beside it in that process. A model's list of
  slices is shared out over ``kp-pipeline run --workers N`` replicas: replica I
  (``KP_WORKER=I``) runs all that model's instances on slice I mod k. A single process
  naming two slices is refused with that advice.
- ``auto``: each instance goes to the visible GPU (or the process's one MIG slice) with
  the most free memory left, where "left" is NVML's free memory now less the artifact's
  size for each instance this plan already put there. Weights are what an instance keeps
  resident; activations and workspaces are not counted, so spreading is by what is known.
  Where NVML lists no GPU, ``auto`` is left to the runtime (its first GPU, else the CPU).

The environment is set before any CUDA context exists (`apply`); a process whose CUDA
already started cannot change what it sees, and is refused rather than mis-placed.
Tested with a fake inventory; NOT RUN on a multi-GPU or MIG machine (none was lent).
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from backends.inventory import GIB, Gpu, Inventory, MigSlice, read_inventory
from pipeline.config.topology import ModelSettings, Topology
from schemas.devices import is_uuid_device
from schemas.errors import ConfigError

__all__ = ["Placement", "apply_placement", "place"]

Unit = Gpu | MigSlice  # what CUDA enumerates as one device


@dataclass(frozen=True)
class Placement:
    """Per model (in topology order): each instance's device, and why, for people."""

    devices: list[list[str]]
    notes: list[list[str]] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)  # set before CUDA starts


def place(
    topology: Topology,
    source: str,
    *,
    inventory: Inventory | None = None,
    environ: MutableMapping[str, str] | None = None,
) -> Placement:
    """Decide every instance's device (raises `ConfigError` naming the field)."""
    env = os.environ if environ is None else environ
    models = topology.models
    wanted = [m.instance_devices() for m in models]
    if not any(d == "auto" or is_uuid_device(d) for ds in wanted for d in ds):
        return Placement(wanted, [[] for _ in models])  # nothing to decide: no NVML asked
    return _Planner(models, source, inventory or read_inventory(), env).plan()


def apply_placement(placement: Placement, environ: MutableMapping[str, str] | None = None) -> None:
    """Set the environment placement needs, refusing where CUDA already started."""
    env = os.environ if environ is None else environ
    for name, value in placement.environment.items():
        if env.get(name) == value:
            continue
        if _cuda_started():
            raise ConfigError(
                f"placement needs {name}={value}, but CUDA already started in this process; "
                "set it in the environment that starts kp-pipeline"
            )
        env[name] = value


def _cuda_started() -> bool:
    torch = sys.modules.get("torch")
    try:
        return bool(torch is not None and torch.cuda.is_initialized())
    except Exception:  # a torch without a cuda module: nothing started
        return False


class _Planner:
    """One pass over the models: MIG slices first (they decide what the process sees)."""

    def __init__(
        self,
        models: Sequence[ModelSettings],
        source: str,
        inventory: Inventory,
        env: MutableMapping[str, str],
    ) -> None:
        self.models, self.source, self.inv, self.env = models, source, inventory, env
        self.devices = [m.instance_devices() for m in models]
        self.notes: list[list[str]] = [[] for _ in models]
        self.environment: dict[str, str] = {}

    def where(self, i: int) -> str:
        return f"{self.source}: models[{i}].device"

    def plan(self) -> Placement:
        mig = self._mig_slice()
        visible: list[Unit] = [mig[1]] if mig else self._visible()
        free = {n: u.memory_free for n, u in enumerate(visible)}
        autos: list[tuple[int, int]] = []
        for i, model in enumerate(self.models):
            size = _artifact_bytes(model.artifact)
            for k, d in enumerate(self.devices[i]):
                if d == "auto":
                    autos.append((i, k))
                elif d.startswith("GPU-"):
                    n = self._gpu_position(i, d, visible, mig)
                    self.devices[i][k] = f"cuda:{n}"
                    self._note(i, f"{d} is cuda:{n} (PCI bus order)")
                    free[n] -= size
                elif mig is not None and d.startswith("MIG-"):
                    self.devices[i][k] = "cuda:0"
                    self._note(i, f"{mig[1].uuid} (MIG slice of GPU {mig[1].gpu}) is cuda:0")
                    free[0] -= size
                elif d.startswith("cuda"):
                    self._not_beside_a_slice(i, d, mig)
                    n = int(d.partition(":")[2] or 0)
                    if n in free:
                        free[n] -= size
        for i, k in autos:
            self.devices[i][k] = self._auto(i, visible, free)
        return Placement(self.devices, self.notes, self.environment)

    def _note(self, i: int, text: str) -> None:
        if text not in self.notes[i]:
            self.notes[i].append(text)

    # -- MIG ---------------------------------------------------------------------------

    def _mig_slice(self) -> tuple[int, MigSlice] | None:
        """The one slice this process serves, (the first model naming it, the slice)."""
        chosen: tuple[int, MigSlice] | None = None
        for i, model in enumerate(self.models):
            written = model.device if isinstance(model.device, list) else [model.device]
            named = [d for d in written if d.startswith("MIG-")]
            if not named:
                continue
            if len(named) != len(written):
                raise ConfigError(
                    f"{self.where(i)}: MIG slices and other devices in one list; a process "
                    "that uses a MIG slice sees no other GPU (CUDA's rule), so list only slices"
                )
            slices = [self._slice(i, d) for d in dict.fromkeys(named)]
            if len(slices) > 1 and "KP_WORKER" not in self.env:
                raise ConfigError(
                    f"{self.where(i)}: {len(slices)} MIG slices, but one process can use one "
                    f"(CUDA enumerates one MIG device per process): run `kp-pipeline run "
                    f"--workers {len(slices)}`, where worker I takes slice I mod {len(slices)}"
                )
            mine = slices[int(self.env.get("KP_WORKER", "0")) % len(slices)]
            if chosen is not None and chosen[1].uuid != mine.uuid:
                raise ConfigError(
                    f"{self.where(i)}: slice {mine.uuid}, but models[{chosen[0]}] runs on "
                    f"{chosen[1].uuid}; one process can use one MIG slice: give both models "
                    "the same slice, or serve them from separate replicas"
                )
            chosen = chosen or (i, mine)
        if chosen is not None:
            self._see_only(chosen[1].uuid, chosen[0])
        return chosen

    def _slice(self, i: int, uuid: str) -> MigSlice:
        found = self.inv.slice(uuid)
        if found is None:
            listed = ", ".join(s.uuid for s in self.inv.slices) or self.inv.problem or "none"
            raise ConfigError(f"{self.where(i)}: no MIG slice {uuid} here (NVML lists: {listed})")
        return found

    def _see_only(self, uuid: str, i: int) -> None:
        current = self.env.get("CUDA_VISIBLE_DEVICES")
        if current not in (None, "") and current.split(",")[0].strip() != uuid:
            raise ConfigError(
                f"{self.where(i)}: the model runs on MIG slice {uuid}, but "
                f"CUDA_VISIBLE_DEVICES={current} shows this process another device"
            )
        self.environment["CUDA_VISIBLE_DEVICES"] = uuid

    def _not_beside_a_slice(self, i: int, device: str, mig: tuple[int, MigSlice] | None) -> None:
        if mig is not None:
            raise ConfigError(
                f"{self.where(i)}: {device} beside the MIG slice models[{mig[0]}] uses; a "
                "process that uses a MIG slice sees no other GPU (CUDA's rule): serve this "
                "model from another replica, or on the same slice"
            )

    # -- whole GPUs --------------------------------------------------------------------

    def _visible(self) -> list[Unit]:
        """The devices CUDA will number 0, 1, ... in this process, in that order."""
        listed = self.env.get("CUDA_VISIBLE_DEVICES")
        if listed is None:
            return list(self.inv.gpus)
        out: list[Unit] = []
        for entry in (e.strip() for e in listed.split(",") if e.strip()):
            unit: Unit | None
            if entry.isdigit():
                unit = next((g for g in self.inv.gpus if g.index == int(entry)), None)
            elif entry.startswith("MIG-"):
                unit = self.inv.slice(entry)
            else:
                unit = self.inv.gpu(entry)
            if unit is None:
                break  # CUDA too stops at the first entry it cannot find
            out.append(unit)
            if isinstance(unit, MigSlice):
                break  # and enumerates one MIG device
        return out

    def _gpu_position(
        self, i: int, uuid: str, visible: list[Unit], mig: tuple[int, MigSlice] | None
    ) -> int:
        self._not_beside_a_slice(i, uuid, mig)
        gpu = self.inv.gpu(uuid)
        if gpu is None:
            listed = ", ".join(g.uuid for g in self.inv.gpus) or self.inv.problem or "none"
            raise ConfigError(f"{self.where(i)}: no GPU {uuid} here (NVML lists: {listed})")
        if gpu.mig:
            slices = ", ".join(s.uuid for s in gpu.slices) or "none made yet"
            raise ConfigError(
                f"{self.where(i)}: GPU {gpu.uuid} is in MIG mode, where CUDA runs work only "
                f"on its slices: name one (MIG-...; it has {slices})"
            )
        for n, unit in enumerate(visible):
            if unit.uuid == gpu.uuid:
                self._pci_order(i)
                return n
        raise ConfigError(
            f"{self.where(i)}: GPU {gpu.uuid} is hidden from this process by "
            f"CUDA_VISIBLE_DEVICES={self.env.get('CUDA_VISIBLE_DEVICES')}"
        )

    def _pci_order(self, i: int) -> None:
        order = self.env.get("CUDA_DEVICE_ORDER")
        if order not in (None, "", "PCI_BUS_ID"):
            raise ConfigError(
                f"{self.where(i)}: placing by UUID or auto numbers GPUs as NVML does (PCI bus "
                f"order), but CUDA_DEVICE_ORDER={order}: unset it or set PCI_BUS_ID"
            )
        self.environment["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"

    def _auto(self, i: int, visible: list[Unit], free: dict[int, int]) -> str:
        size = _artifact_bytes(self.models[i].artifact)
        usable = [n for n, u in enumerate(visible) if not (isinstance(u, Gpu) and u.mig)]
        if not usable:
            why = self.inv.problem or "no GPU this process can use whole (MIG GPUs need a slice)"
            self._note(i, f"auto: left to the runtime ({why}): its first GPU, else the CPU")
            return "auto"
        best = max(usable, key=lambda n: (free[n], -n))
        left = free[best]
        free[best] -= size
        if isinstance(visible[best], Gpu):
            self._pci_order(i)
        self._note(
            i,
            f"auto → cuda:{best} ({visible[best].uuid}: {left / GIB:.1f} GiB free after this "
            "topology's instances placed before it, the most)",
        )
        return f"cuda:{best}"


def _artifact_bytes(path: Path) -> int:
    """What an instance's weights take, as the artifact's size on disk (0 if unreadable)."""
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size
    except OSError:  # a missing artifact is refused by the graph with its own message
        return 0
