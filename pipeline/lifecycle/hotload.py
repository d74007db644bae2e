"""Versions loaded and retired while a replica serves: its side of ``versions load|unload``.

A control record lists the versions the group serves beyond its topology's (`Served`:
loads, each an artifact served with one topology version's settings, and topology
versions unloaded). Each replica makes its own served set match, without a restart:

- **Load** (a thread of its own, beside the live versions): the artifact is checked
  (present, its SHA-256 when the command pinned one), loaded on the devices the model's
  topology versions use, its signature compared with theirs (a new version must take and
  give what the live one does, or requests the split sends it would fail), and one
  warm-up batch run, which must succeed. Any failure refuses the version: the replica
  keeps serving what it served, logs why, counts ``kp_version_loads_total{result="failed"}``
  and says it on ``/readyz`` (``versions_behind``) until a record no longer asks for it.
- **Attach** (the loop thread, between two batches: `Replica.change`): the version gets
  its batcher, runtime and metrics, and a route; it takes no request naming no version
  until a split sends it some, which the follower applies once the load is attached.
- **Retire** (the loop thread): a version no record serves and no split of this replica
  sends traffic to stops being routed (requests naming it become ``unknown_model`` dead
  letters); its open batches are run, its outcomes delivered, then its instances unload.

So a swap is ``load`` (warm beside the live version), ``promote`` (traffic moves at a
batch boundary), ``unload`` of the old version (drained, then unloaded): nothing consumed
is lost or served twice, because every step happens between batches of one loop that
tracks every offset. A replica starting mid-swap loads what the topic asks before it
consumes (`pipeline.app.follow_control`). The Faust adapter neither loads nor retires.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config.topology import ModelSettings, Topology
from pipeline.lifecycle.commands import ControlRecord, Load, served_versions
from pipeline.serving.graph import ServedModel, build_model
from pipeline.serving.routing import ModelRoute
from schemas.errors import GraphError

if TYPE_CHECKING:
    from collections.abc import Callable

    from pipeline.engine.loop import Replica
    from pipeline.lifecycle.shadow import Shadows

__all__ = ["VersionLoader"]

log = logging.getLogger(__name__)

Version = tuple[str, str]  # (model name, version)


class VersionLoader:
    """Loads, attaches and retires one replica's model versions as the control topic says.

    `reconcile` and `retire_unused` run on the replica's loop thread (the follower calls
    them from there); loads run on threads of their own and hand the built model back
    through `Replica.change`. ``settled``: called on the loop thread with a model's name
    once one of its versions is attached or refused, so its split is tried again.
    """

    def __init__(
        self,
        topology: Topology,
        base_dir: Path,
        replica: Replica,
        graph: list[ServedModel],
        shadows: Shadows | None = None,
    ) -> None:
        self.topology, self.base_dir, self.replica = topology, base_dir, replica
        self.graph, self.shadows = graph, shadows  # graph: what `serve` closes at the end
        self.settled: Callable[[str], object] = lambda name: None
        self._settings = {(m.settings.name, m.settings.version): m.settings for m in graph}
        self._keys = {(m.settings.name, m.settings.version): m.name for m in graph}
        self._devices: dict[str, list[str]] = {}
        self._reference: dict[str, ServedModel] = {}  # the signature a new version must have
        for m in graph:
            self._devices.setdefault(m.settings.name, m.devices)
            self._reference.setdefault(m.settings.name, m)
        self.loading: dict[Version, Load | None] = {}
        self.failed: dict[Version, tuple[Load | None, str]] = {}
        self._threads: list[threading.Thread] = []
        self._built: dict[Version, ServedModel] = {}  # loaded, not yet attached
        self._lock = threading.Lock()
        self._closed = False
        for name in self._devices:
            for result in ("loaded", "failed", "unloaded"):
                replica.metrics.version_loads.labels(name, result)

    # -- on the loop thread ---------------------------------------------------------------

    def reconcile(self, record: ControlRecord) -> None:
        """Start loading each version ``record`` serves that this replica does not."""
        name = record.model
        served_now = self.replica.intake.router.traffic[name].keys
        wanted = served_versions(self.topology, name, record.served)
        for refused in list(self.failed):  # no longer asked for: no longer a failure
            if refused[0] == name and refused[1] not in wanted:
                del self.failed[refused]
        for version in wanted:
            at = (name, version)
            if version in served_now or at in self.loading:
                continue
            load = record.served.loads.get(version)  # None: a topology version back
            if at in self.failed and self.failed[at][0] == load:
                continue  # refused already; a new command (another artifact) tries again
            self.failed.pop(at, None)
            self.loading[at] = load
            thread = threading.Thread(
                target=self._load,
                args=(at, load, f"control record #{record.seq} ({record.command})"),
                name=f"load-{name}@{version}",
                daemon=True,
            )
            self._threads.append(thread)
            thread.start()

    def retire_unused(self, record: ControlRecord) -> None:
        """Retire each version no record serves once this replica's split sends it nothing."""
        name = record.model
        router = self.replica.intake.router
        traffic = router.traffic[name]
        wanted = set(served_versions(self.topology, name, record.served))
        in_use = {traffic.default, *dict(traffic.canary), *(traffic.shadow or ())[:1]}
        for version, key in list(traffic.keys.items()):
            if version in wanted:
                continue
            if version in in_use:
                log.warning(
                    "model %s: version %s is to be unloaded but this replica's split still "
                    "sends it requests; kept until its split moves",
                    name,
                    version,
                )
                continue
            self._retire(name, version, key)

    def why_missing(self, name: str, versions: list[str]) -> str:
        """Why this replica does not serve ``versions`` of ``name`` (loading, or refused)."""
        parts = []
        for version in versions:
            at = (name, version)
            if at in self.loading:
                parts.append(f"version {version} is still loading")
            elif at in self.failed:
                parts.append(f"version {version} was refused: {self.failed[at][1]}")
            else:
                parts.append(f"version {version} is not served here")
        return "; ".join(parts)

    def refused(self, name: str) -> str | None:
        """The refusals of ``name``'s versions this replica was asked to load, if any."""
        found = [f"v{v}: {why}" for (n, v), (_, why) in self.failed.items() if n == name]
        return "; ".join(found) or None

    def _attach(self, at: Version, model: ServedModel) -> None:
        name, version = at
        replica = self.replica
        with self._lock:
            self._built.pop(at, None)
        self.loading.pop(at, None)
        if replica.scheduler is not None:
            replica.scheduler.add(model.name, model.settings.scheduling, model.devices)
        runtime = replica.serve_model(model)
        replica.accounting.declare_model(model)
        ordering = model.settings.ordering
        if not replica.exactly_once and ordering != "none":
            replica.sequencer.orderings[model.name] = ordering
        route = ModelRoute(name, version, model.inputs, model.bucketer, key=model.name)
        replica.intake.router.add_route(route)
        self.graph.append(model)
        if self.shadows is not None:
            self.shadows.attach()  # its desk pairs this version's answers too
        if replica.running:
            runtime.start()
        replica.metrics.version_loads.labels(name, "loaded").inc()
        replica.metrics.version_traffic.labels(name, version).set(0)
        log.info(
            "model %s: version %s loaded from %s, warmed, serving as %s on %s",
            name,
            version,
            model.settings.artifact,
            model.name,
            ", ".join(model.devices),
        )
        self.settled(name)

    def _refuse(self, at: Version, load: Load | None, why: str) -> None:
        self.loading.pop(at, None)
        self.failed[at] = (load, why)
        self.replica.metrics.version_loads.labels(at[0], "failed").inc()
        log.error("model %s: version %s refused, still serving the others: %s", *at, why)
        self.settled(at[0])

    def _retire(self, name: str, version: str, key: str) -> None:
        replica = self.replica
        replica.intake.router.remove_route(key)
        for flushed in replica.batchers[key].drain():
            replica.submit(key, flushed)
        with_prefix = f"model {name}: version {version}"
        log.info("%s no longer served: running its open batches, then unloading it", with_prefix)
        started = time.monotonic()

        def finish() -> None:
            runtime = replica.runtimes[key]
            if runtime.busy:
                replica.change(finish)  # the next turn of the loop looks again
                return
            del replica.batchers[key], replica.runtimes[key]
            replica.controls.pop(key, None)
            model = next(m for m in self.graph if m.name == key)
            self.graph.remove(model)

            def unload() -> None:
                runtime.stop(timeout=10)
                model.close()
                log.info("%s unloaded (%.2f s after it stopped taking requests)",
                         with_prefix, time.monotonic() - started)  # fmt: skip

            threading.Thread(target=unload, name=f"unload-{key}", daemon=True).start()
            replica.metrics.version_loads.labels(name, "unloaded").inc()
            with contextlib.suppress(KeyError):  # its series goes with it
                replica.metrics.version_traffic.remove(name, version)

        finish()

    # -- on a thread of its own -----------------------------------------------------------

    def _load(self, at: Version, load: Load | None, command: str) -> None:
        name, version = at
        where = f"{command}: {name} v{version}"
        try:
            settings, key = self._settings_of(at, load)
            model = build_model(
                settings, where, self.base_dir, devices=self._devices[name], strict_warm_up=True
            )
            model.key = key
            self._check_signature(model, where)
            if self.shadows is not None:
                self.shadows.prepare()  # the comparison topic, off the loop thread
        except Exception as e:
            why = str(e)
            self.replica.change(lambda: self._refuse(at, load, why))
            return
        with self._lock:
            if self._closed:
                model.close()
                return
            self._built[at] = model
        self.replica.change(lambda: self._attach(at, model))

    def _settings_of(self, at: Version, load: Load | None) -> tuple[ModelSettings, str]:
        """A version's settings and served key: the topology's, or a load's over its base."""
        if load is None:
            return self._settings[at], self._keys[at]
        base = self._settings[(at[0], load.settings_of)]
        artifact = Path(load.artifact)
        if not artifact.is_absolute():
            artifact = self.base_dir / artifact
        update = {"version": at[1], "artifact": artifact, "sha256": load.sha256}
        return base.model_copy(update=update), f"{at[0]}@{at[1]}"

    def _check_signature(self, model: ServedModel, where: str) -> None:
        live = self._reference[model.settings.name]
        mine, theirs = model.info, live.info
        if (mine.inputs, mine.outputs) != (theirs.inputs, theirs.outputs):
            model.close()

            def show(specs: dict[str, object]) -> str:
                return ", ".join(f"{k} {v}" for k, v in specs.items())

            raise GraphError(
                f"{where}: its signature (inputs {show(dict(mine.inputs))}; outputs "
                f"{show(dict(mine.outputs))}) is not version {live.settings.version}'s "
                f"(inputs {show(dict(theirs.inputs))}; outputs {show(dict(theirs.outputs))})"
            )

    # -- the end --------------------------------------------------------------------------

    def wait(self, timeout: float) -> None:
        """Wait for the loads started so far (a replica starting mid-swap, before it serves)."""
        deadline = time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        """Release models loaded but never attached (the replica stopped meanwhile)."""
        with self._lock:
            self._closed = True
            built, self._built = list(self._built.values()), {}
        for model in built:
            model.close()
