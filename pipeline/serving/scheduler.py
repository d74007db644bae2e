"""The device scheduler: which waiting batch a shared device takes next.

Without it (``scheduling.enabled: false``, the default) every model sends its batches to
its own instances as they come, and models that share a device share it by whoever
submits first: a flood of one model's traffic fills the device's queues and every other
model's batches wait behind it. With it, each device admits at most
``scheduling.concurrency`` batches at once (preparing or running; `ModelRuntime` asks
before it hands a batch to an instance and gives the slot back when the batch's
inference is over), and when a slot frees, the device picks among the batches waiting
for it (every model offers all it has queued):

1. **Priority first**: a batch's priority is its requests' (``parameters.priority`` or a
   ``kp.priority`` header, 0–1000; the batcher never mixes priorities) or else its
   model's (``models[].scheduling.priority``); higher goes first, always. So a
   high-priority batch waits at most for the slots already taken: under a flood of
   lower-priority traffic its latency is bounded by the device's concurrency, not by
   the flood.
2. **Weighted fairness within a priority**: start-time fair queuing over the rows served,
   between *flows*: models (``weight``), or with ``fair_share: tenant`` tenants (a
   request's ``tenant`` parameter or ``kp.tenant`` header; ``scheduling.tenants``
   weighs them, others get ``default_tenant_weight``; requests without a tenant are the
   tenant ""). Each flow has a virtual finish time that grows by ``rows / weight`` per
   batch it is given; the device takes the flow whose next batch would start earliest in
   virtual time (an idle flow starts at the current virtual time, so idling earns no
   credit). Over any stretch in which flows stay backlogged each gets rows in proportion
   to its weight, within one batch; none of equal priority starves.
3. **Concurrency limits** (``max_concurrent``): a model at its limit is passed over until
   one of its batches is done.

Strict priority means a lower priority can wait as long as higher ones keep a device
busy: flows that must progress under load should share a priority and split by weight.
Lag-driven batch control (`pipeline.engine.batch_control`) keeps working per model: it
sets how batches form, the scheduler when they run. Decisions and depths are metrics:
``kp_scheduler_wait_seconds`` (per batch, by model), ``kp_scheduler_grants_total`` (by
model and device), ``kp_scheduler_running_batches`` (by device),
``kp_scheduler_queued_batches`` (by model: batches submitted and not yet admitted) and
``kp_scheduler_unlisted_tenants_total`` (requests naming a tenant ``tenants`` does not
list: served with the default weight).

The policy (`FairPolicy`) is plain code without threads, tested with hypothesis; the
`DeviceScheduler` is its thread-safe gate, one lane per device; `RequestClasses` reads a
request's priority and tenant at intake.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from pipeline.config.topology import ModelScheduling, SchedulingSettings
from pipeline.observability.metrics import Metrics
from pipeline.serving.graph import ServedModel
from schemas.errors import RequestError
from schemas.messages import Envelope, Request

__all__ = [
    "Batch",
    "Classed",
    "DeviceScheduler",
    "FairPolicy",
    "RequestClass",
    "RequestClasses",
]


class Batch(NamedTuple):
    """A batch waiting for a device: whose it is, who shares by it, its priority, rows."""

    model: str
    flow: str  # the model, or the tenant, with fair_share: tenant
    priority: int
    rows: int


class RequestClass(NamedTuple):
    """What a request asks of the scheduler: a priority, a tenant (None: not asked)."""

    priority: int | None
    tenant: str | None


class Classed(NamedTuple):
    """A batch key with its requests' class, so that the batcher never mixes classes."""

    key: Hashable
    cls: RequestClass


MAX_TENANT = 128
"""Characters a tenant name may have."""


class RequestClasses:
    """Reads each request's class at intake, with the scheduler on.

    A request's ``priority`` and ``tenant`` parameters win over its record's
    ``kp.priority`` and ``kp.tenant`` headers. A tenant is read only with ``fair_share:
    tenant``; one that ``tenants`` does not list is served with the default weight and
    counted. A priority that is not a whole number from 0 to 1000, or a tenant longer
    than `MAX_TENANT`, is a `RequestError`: the request becomes a dead letter naming it.
    """

    def __init__(self, settings: SchedulingSettings, metrics: Metrics | None = None) -> None:
        self.by_tenant = settings.fair_share == "tenant"
        self.enabled = settings.enabled
        self.listed = settings.tenants
        self.metrics = metrics

    def __bool__(self) -> bool:
        return self.enabled

    def of(self, env: Envelope, request: Request, model: str) -> RequestClass | None:
        """The request's class, or None when it asks nothing of the scheduler."""
        params = request.parameters
        priority, tenant = params.get("priority"), params.get("tenant")
        for key, value in env.headers or ():
            name = key.lower()
            if name == "kp.priority" and priority is None:
                priority = (value or b"").decode(errors="replace")
            elif name == "kp.tenant" and tenant is None:
                tenant = (value or b"").decode(errors="replace")
        if not self.by_tenant:
            tenant = None
        if priority is None and tenant is None:
            return None
        return RequestClass(_priority(priority), self._tenant(tenant, model))

    def _tenant(self, tenant: str | None, model: str) -> str | None:
        if tenant is None:
            return None
        if len(tenant) > MAX_TENANT:
            raise RequestError(f"parameters.tenant: longer than {MAX_TENANT} characters")
        if self.listed and tenant not in self.listed and self.metrics is not None:
            self.metrics.scheduler_unlisted_tenants.labels(model).inc()
        return tenant


def _priority(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        priority = int(value.strip())
    except ValueError:
        priority = -1
    if not 0 <= priority <= 1000:
        raise RequestError(
            f"parameters.priority: {value[:40]!r} is not a whole number from 0 to 1000"
        )
    return priority


class FairPolicy:
    """Strict priority, then start-time fair queuing by rows/weight, under limits.

    One device's: ``concurrency`` slots; ``models`` maps each model that may use the
    device to its scheduling settings; ``weight(flow)`` is a flow's weight.
    """

    def __init__(
        self,
        concurrency: int,
        models: Mapping[str, ModelScheduling],
        weight: Callable[[str], float] | None = None,
    ) -> None:
        self.concurrency = concurrency
        self.models = dict(models)
        self.weight = weight or (lambda flow: self.models[flow].weight)
        self.running: dict[str, int] = dict.fromkeys(models, 0)
        self.total = 0  # slots taken
        self._finish: dict[str, float] = {}  # flows' virtual finish times, while ahead
        self._now = 0.0  # the virtual time: the start of the batch last given a slot

    def start_tag(self, flow: str) -> float:
        """Where ``flow``'s next batch would start in virtual time."""
        return max(self._finish.get(flow, 0.0), self._now)

    def pick(self, waiting: Sequence[Batch]) -> int | None:
        """The index of the waiting batch that gets a slot now.

        None when every slot is taken, or no waiting batch's model is under its limit.
        Ties go to the earliest in ``waiting``. The pick is counted as running until
        `done`.
        """
        if self.total >= self.concurrency:
            return None
        eligible = [i for i, b in enumerate(waiting) if self._under_limit(b.model)]
        if not eligible:
            return None
        top = max(waiting[i].priority for i in eligible)
        chosen = min(
            (i for i in eligible if waiting[i].priority == top),
            key=lambda i: (self.start_tag(waiting[i].flow), i),
        )
        batch = waiting[chosen]
        start = self.start_tag(batch.flow)
        if start > self._now:
            self._now = start
            # Flows whose finish the virtual time passed start from it anyway: forget them
            # (tenants come and go; this keeps the table to the ones ahead).
            self._finish = {f: t for f, t in self._finish.items() if t > start}
        self._finish[batch.flow] = start + max(1, batch.rows) / self.weight(batch.flow)
        self.running[batch.model] += 1
        self.total += 1
        return chosen

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
    waiting: list[tuple[int, int, Batch]] = field(default_factory=list)  # ticket, offer, batch
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
        self.settings = settings
        self.metrics = metrics
        users: dict[str, dict[str, ModelScheduling]] = {}
        for model, (sched, devices) in models.items():
            for device in devices:
                users.setdefault(device, {})[model] = sched
        self._priority = {m: sched.priority for m, (sched, _) in models.items()}
        tenants, default = settings.tenants, settings.default_tenant_weight
        by_tenant = settings.fair_share == "tenant"
        self._weight = (lambda flow: tenants.get(flow, default)) if by_tenant else None
        self._lanes = {
            device: _Lane(FairPolicy(settings.concurrency_of(device), members, self._weight))
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

    def add(self, model: str, sched: ModelScheduling, devices: Iterable[str]) -> None:
        """Schedule one more model (a version loaded while serving) on ``devices``."""
        with self._cond:
            self._priority[model] = sched.priority
            for device in devices:
                lane = self._lanes.get(device)
                if lane is None:
                    policy = FairPolicy(self.settings.concurrency_of(device), {}, self._weight)
                    lane = self._lanes[device] = _Lane(policy)
                lane.policy.models[model] = sched
                lane.policy.running.setdefault(model, 0)
                if self.metrics is not None:
                    self.metrics.scheduler_running.labels(device).set(0)
                    self.metrics.scheduler_grants.labels(model, device)

    def devices(self) -> list[str]:
        """The devices it schedules."""
        return list(self._lanes)

    def batch(self, model: str, rows: int, cls: RequestClass | None = None) -> Batch:
        """How a batch of ``model`` waits: its flow and priority (its requests' class)."""
        priority = self._priority[model]
        tenant = ""
        if cls is not None:
            priority = cls.priority if cls.priority is not None else priority
            tenant = cls.tenant or ""
        flow = tenant if self.settings.fair_share == "tenant" else model
        return Batch(model, flow, priority, rows)

    def acquire(
        self, device: str, batches: Sequence[Batch], timeout: float | None = None
    ) -> int | None:
        """Wait until ``device`` admits one of ``batches`` (one model's); its index.

        None when none was admitted within ``timeout`` seconds (None: wait for one). The
        others are withdrawn either way: the caller offers them again, with anything new.
        """
        lane = self._lanes[device]
        started = time.monotonic()
        with self._cond:
            tickets = [next(self._tickets) for _ in batches]
            offer = tickets[0] if tickets else -1
            lane.waiting.extend((t, offer, b) for t, b in zip(tickets, batches, strict=True))
            self._grant(device, lane)
            deadline = None if timeout is None else started + timeout
            chosen = self._granted_one(lane, tickets)
            while chosen is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(left)
                chosen = self._granted_one(lane, tickets)
            lane.waiting = [w for w in lane.waiting if w[1] != offer]
        if chosen is not None and self.metrics is not None:
            waited = time.monotonic() - started
            self.metrics.scheduler_wait.labels(batches[chosen].model).observe(waited)
        return chosen

    @staticmethod
    def _granted_one(lane: _Lane, tickets: list[int]) -> int | None:
        for i, ticket in enumerate(tickets):
            if ticket in lane.granted:
                lane.granted.discard(ticket)
                return i
        return None

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
        """Give every free slot of ``lane`` to the batch the policy picks; wake the waiters.

        At most one batch per `acquire` call is granted: the rest of its offer is
        withdrawn with it.
        """
        granted = False
        while lane.waiting:
            picked = lane.policy.pick([b for _, _, b in lane.waiting])
            if picked is None:
                break
            ticket, offer, batch = lane.waiting[picked]
            lane.granted.add(ticket)
            granted = True
            if self.metrics is not None:
                self.metrics.scheduler_grants.labels(batch.model, device).inc()
                self.metrics.scheduler_running.labels(device).set(lane.policy.total)
            lane.waiting = [w for w in lane.waiting if w[1] != offer]  # one per offer
        if granted:
            self._cond.notify_all()
