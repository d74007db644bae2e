"""The device scheduler: which model's waiting batch a shared device takes next.

Without it (``scheduling.enabled: false``, the default) every model sends its batches to
its own instances as they come, and models that share a device share it by whoever
submits first: a flood of one model's traffic fills the device's queues and every other
model's batches wait behind it. With it, each device admits at most
``scheduling.concurrency`` batches at once (preparing or running; `ModelRuntime` asks
before it hands a batch to an instance and gives the slot back when the batch's
inference is over), and when a slot frees, the device picks among the models waiting
for it:

1. **Priority first** (``models[].scheduling.priority``, higher first): a waiting batch of
   a higher-priority model is always taken before any of a lower one. So a high-priority
   batch waits at most for the slots already taken: under a flood of low-priority
   traffic, its latency is bounded by the device's concurrency, not by the flood.
2. **Weighted fairness within a priority** (``weight``): start-time fair queuing over the
   rows served. Each model has a virtual finish time that grows by ``rows / weight`` per
   batch it is given; the device takes the model whose next batch would start earliest
   in virtual time (a model that was idle starts at the current virtual time, so idling
   earns no credit). Over any stretch in which models stay backlogged each gets rows in
   proportion to its weight, within one batch per model; none of equal priority starves.
3. **Concurrency limits** (``max_concurrent``): a model at its limit is passed over until
   one of its batches is done.

Strict priority means a lower priority can wait as long as higher ones keep a device
busy: give models that must progress under load the same priority and weights instead.
Lag-driven batch control (`pipeline.engine.batch_control`) keeps working per model: it
sets how batches form, the scheduler when they run. Decisions and depths are metrics:
``kp_scheduler_wait_seconds`` (per batch, by model), ``kp_scheduler_grants_total`` (by
model and device), ``kp_scheduler_running_batches`` (by device) and
``kp_scheduler_queued_batches`` (by model: batches submitted and not yet admitted).

The policy (`FairPolicy`) is plain code without threads, tested with hypothesis; the
`DeviceScheduler` is its thread-safe gate, one lane per device.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pipeline.config.topology import ModelScheduling, SchedulingSettings
from pipeline.observability.metrics import Metrics
from pipeline.serving.graph import ServedModel

__all__ = ["DeviceScheduler", "FairPolicy"]


class FairPolicy:
    """Strict priority, then start-time fair queuing by rows/weight, under limits.

    One device's: ``concurrency`` slots; ``models`` maps each model that may use the
    device to its scheduling settings.
    """

    def __init__(self, concurrency: int, models: Mapping[str, ModelScheduling]) -> None:
        self.concurrency = concurrency
        self.models = dict(models)
        self.running: dict[str, int] = dict.fromkeys(models, 0)
        self.total = 0  # slots taken
        self._finish: dict[str, float] = dict.fromkeys(models, 0.0)  # virtual finish times
        self._now = 0.0  # the virtual time: the start of the batch last given a slot
        self._order = {m: i for i, m in enumerate(models)}  # ties: topology order

    def start_tag(self, model: str) -> float:
        """Where ``model``'s next batch would start in virtual time."""
        return max(self._finish[model], self._now)

    def pick(self, waiting: Mapping[str, int]) -> str | None:
        """The model whose waiting batch (of ``waiting[model]`` rows) gets a slot now.

        None when every slot is taken, or no waiting model is under its limit. The pick
        is counted as running until `done`.
        """
        if self.total >= self.concurrency:
            return None
        eligible = [m for m in waiting if self._under_limit(m)]
        if not eligible:
            return None
        top = max(self.models[m].priority for m in eligible)
        model = min(
            (m for m in eligible if self.models[m].priority == top),
            key=lambda m: (self.start_tag(m), self._order[m]),
        )
        start = self.start_tag(model)
        self._now = start
        self._finish[model] = start + max(1, waiting[model]) / self.models[model].weight
        self.running[model] += 1
        self.total += 1
        return model

    def done(self, model: str) -> None:
        """One of ``model``'s batches gave its slot back."""
        self.running[model] -= 1
        self.total -= 1

    def _under_limit(self, model: str) -> bool:
        limit = self.models[model].max_concurrent
        return limit is None or self.running[model] < limit


@dataclass(slots=True)
class _Lane:
    """One device: its policy, the batches waiting for it, and the grants not yet taken."""

    policy: FairPolicy
    waiting: dict[str, deque[tuple[int, int]]] = field(default_factory=dict)  # (ticket, rows)
    granted: set[int] = field(default_factory=set)


class DeviceScheduler:
    """The gate every model's batches pass on their way to an instance, per device.

    ``models`` maps each model to its settings and the devices its instances use.
    Thread-safe: each model's dispatch thread calls `acquire` and its infer threads
    `release`.
    """

    def __init__(
        self,
        settings: SchedulingSettings,
        models: Mapping[str, tuple[ModelScheduling, Iterable[str]]],
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics
        users: dict[str, dict[str, ModelScheduling]] = {}
        for model, (sched, devices) in models.items():
            for device in devices:
                users.setdefault(device, {})[model] = sched
        self._lanes = {
            device: _Lane(FairPolicy(settings.concurrency_of(device), members))
            for device, members in users.items()
        }
        self._cond = threading.Condition()
        self._tickets = itertools.count()

    @classmethod
    def for_graph(
        cls, settings: SchedulingSettings, graph: Iterable[ServedModel], metrics: Metrics
    ) -> DeviceScheduler | None:
        """The scheduler of a topology's models, or None when it is not enabled.

        Its series are made at zero either way, so dashboards show 0, not "no data".
        """
        models = {m.name: (m.settings.scheduling, set(m.devices)) for m in graph}
        for model, (_, devices) in models.items():
            for device in devices:
                metrics.scheduler_running.labels(device).set(0)
                metrics.scheduler_grants.labels(model, device)
        return cls(settings, models, metrics) if settings.enabled else None

    def devices(self) -> list[str]:
        """The devices it schedules."""
        return list(self._lanes)

    def acquire(self, model: str, device: str, rows: int) -> float:
        """Wait until ``device`` admits a batch of ``rows`` rows of ``model``; seconds waited."""
        lane = self._lanes[device]
        started = time.monotonic()
        with self._cond:
            ticket = next(self._tickets)
            lane.waiting.setdefault(model, deque()).append((ticket, rows))
            self._grant(device, lane)
            while ticket not in lane.granted:
                self._cond.wait()
            lane.granted.discard(ticket)
        waited = time.monotonic() - started
        if self.metrics is not None:
            self.metrics.scheduler_wait.labels(model).observe(waited)
        return waited

    def release(self, model: str, device: str) -> None:
        """A batch of ``model`` admitted to ``device`` is done with it."""
        lane = self._lanes[device]
        with self._cond:
            lane.policy.done(model)
            self._grant(device, lane)
            running = lane.policy.total
        if self.metrics is not None:
            self.metrics.scheduler_running.labels(device).set(running)

    def _grant(self, device: str, lane: _Lane) -> None:
        """Give every free slot of ``lane`` to the batch the policy picks; wake the waiters."""
        granted = False
        while True:
            heads = {m: q[0][1] for m, q in lane.waiting.items() if q}
            model = lane.policy.pick(heads) if heads else None
            if model is None:
                break
            ticket, _ = lane.waiting[model].popleft()
            lane.granted.add(ticket)
            granted = True
            if self.metrics is not None:
                self.metrics.scheduler_grants.labels(model, device).inc()
                self.metrics.scheduler_running.labels(device).set(lane.policy.total)
        if granted:
            self._cond.notify_all()
