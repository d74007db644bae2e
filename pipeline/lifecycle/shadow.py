"""Shadow comparison: a candidate version's answers lined up with the live ones, by offset.

With ``versions.<model>.shadow`` (or ``kp-pipeline versions shadow``), a request that
meets its model's default is also copied, for a key-hash share of keys, to the shadow
version (`pipeline.serving.intake`); both copies are batched and served as usual. The
live outcome goes to the output at once, as ever; the shadow's never does. This desk
takes both outcomes of one record (same topic, partition and offset), compares them and
publishes one comparison record per request on the comparison topic
(``topics.comparisons``, by default ``<output>.comparisons``), keyed like the request:

    {"model": "tiny", "live": "1", "shadow": "2", "topic": "requests", "partition": 3,
     "offset": 1041, "id": "order-17", "verdict": "differs", "live_status": "OK",
     "shadow_status": "OK", "max_abs_diff": 0.31, "differing": ["scores"]}

``verdict``: ``same`` (both answered alike: integer outputs equal, float outputs within
``versions.<model>.tolerance``, or both failed for the same reason), ``differs`` (both
answered, differently: ``differing`` names the outputs) or ``status`` (one answered and
the other did not, or they failed differently). Counted in ``kp_shadow_comparisons_total``
by the shadow's model key and verdict; every record carries the live request's topic,
partition and offset, so ``kp-pipeline replay --from-offset`` can serve exactly the
disagreeing requests again.

Bounded: copies outstanding (sent to the shadow, its outcome not back) are capped per
shadow (``limit``, the flow's in-flight window); past it requests are not copied and
``kp_shadow_skipped_total`` counts them, so a slow candidate never holds memory or
delays live answers. An outcome whose partner never comes (the live one's replica lost
the partition, the shadow's failed to be made) is dropped once ``limit`` others wait.
The Faust adapter does not shadow.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from pipeline.config.topology import Topology
from pipeline.kafka.clients import admin_config, close_producer, ensure_topics, producer_config
from pipeline.observability.metrics import Metrics
from pipeline.serving.outcomes import Outcome
from schemas.messages import SHADOW, SHADOWED

__all__ = [
    "Comparison",
    "ShadowDesk",
    "Shadows",
    "attach_shadows",
    "compare",
    "comparison_topic",
]

Emit = Callable[[list[Outcome]], None]


@dataclass(frozen=True)
class Comparison:
    """One request's two answers, compared (the comparison topic's record)."""

    model: str
    live: str
    shadow: str
    topic: str
    partition: int
    offset: int
    id: str | None
    verdict: str  # same | differs | status
    live_status: str
    shadow_status: str
    max_abs_diff: float | None = None
    differing: list[str] = field(default_factory=list)

    def encode(self) -> bytes:
        """The record's value (JSON)."""
        return json.dumps(asdict(self), separators=(",", ":")).encode()


def _status(o: Outcome) -> str:
    return f"dead_letter:{o.reason}" if o.reason is not None else o.status


def compare(
    live: Outcome, shadow: Outcome, tolerance: float
) -> tuple[str, float | None, list[str]]:
    """``(verdict, largest float difference, outputs that differ)`` of two outcomes."""
    if _status(live) != _status(shadow):
        return "status", None, []
    if live.outputs is None or shadow.outputs is None:
        return "same", None, []  # both failed alike (or neither kept outputs)
    differing, largest = [], None
    for name in sorted(live.outputs.keys() | shadow.outputs.keys()):
        a, b = live.outputs.get(name), shadow.outputs.get(name)
        if a is None or b is None or a.shape != b.shape:
            differing.append(name)
            continue
        if np.issubdtype(a.dtype, np.floating) or np.issubdtype(b.dtype, np.floating):
            diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0))
            largest = diff if largest is None else max(largest, diff)
            if not diff <= tolerance:  # NaN differs too
                differing.append(name)
        elif not np.array_equal(a, b):
            differing.append(name)
    return ("differs" if differing else "same"), largest, differing


class ShadowDesk:
    """Pairs live and shadow outcomes by offset; publishes and counts the comparisons."""

    def __init__(
        self,
        versions_of: Mapping[str, tuple[str, str]],
        tolerances: Mapping[str, float],
        publish: Callable[[bytes | None, bytes], None],
        metrics: Metrics,
        limit: int,
    ) -> None:
        """``versions_of``: each served key's (model name, version)."""
        self.versions_of, self.tolerances = dict(versions_of), dict(tolerances)
        self.publish, self.metrics, self.limit = publish, metrics, limit
        self._lock = threading.Lock()
        self._outstanding: dict[str, int] = {}
        # (topic, partition, offset) -> (outcome, its runtime's key, is the shadow's)
        self._waiting: OrderedDict[tuple[str, int, int], tuple[Outcome, str, bool]] = OrderedDict()

    def admit(self, shadow_key: str) -> bool:
        """Whether one more copy may go to the shadow served under ``shadow_key`` now."""
        with self._lock:
            n = self._outstanding.get(shadow_key, 0)
            if n >= self.limit:
                self.metrics.shadow_skipped.labels(shadow_key).inc()
                return False
            self._outstanding[shadow_key] = n + 1
            return True

    def tee(self, emit: Emit, key: str) -> Emit:
        """The emit of the runtime serving ``key``, keeping shadow outcomes from the output.

        Both kinds of a shadowed record's outcomes are paired here; the live one also
        goes on to ``emit`` at once.
        """

        def teed(outcomes: list[Outcome]) -> None:
            if not any(o.envelope.shadow for o in outcomes):  # the usual batch
                emit(outcomes)
                return
            live = []
            for o in outcomes:
                if o.envelope.shadow == SHADOW:
                    self._arrive(o, key, True)
                    continue
                if o.envelope.shadow == SHADOWED:
                    self._arrive(o, key, False)
                live.append(o)
            if live:
                emit(live)

        return teed

    def _arrive(self, outcome: Outcome, key: str, is_shadow: bool) -> None:
        env = outcome.envelope
        where = (env.topic, env.partition, env.offset)
        with self._lock:
            if is_shadow:
                self._outstanding[key] = max(0, self._outstanding.get(key, 0) - 1)
            partner = self._waiting.pop(where, None)
            if partner is None or partner[2] == is_shadow:
                self._waiting[where] = (outcome, key, is_shadow)
                while len(self._waiting) > self.limit * max(1, len(self.versions_of)):
                    self._waiting.popitem(last=False)  # its partner is not coming
                return
        if is_shadow:
            self._compare(partner[0], partner[1], outcome, key)
        else:
            self._compare(outcome, key, partner[0], partner[1])

    def _compare(self, live: Outcome, live_key: str, shadow: Outcome, shadow_key: str) -> None:
        name, live_version = self.versions_of.get(live_key, (live_key, ""))
        shadow_version = self.versions_of.get(shadow_key, (shadow_key, ""))[1]
        verdict, largest, differing = compare(live, shadow, self.tolerances.get(name, 1e-4))
        env = live.envelope
        request = env.request
        record = Comparison(
            name, live_version, shadow_version, env.topic, env.partition, env.offset,
            request.id if request is not None else None, verdict, _status(live),
            _status(shadow), largest, differing,
        )  # fmt: skip
        self.metrics.shadow_comparisons.labels(shadow_key, verdict).inc()
        self.publish(env.key, record.encode())


def comparison_topic(topology: Topology) -> str:
    """``topics.comparisons``, else ``<output>.comparisons``."""
    return topology.topics.comparisons or f"{topology.topics.output}.comparisons"


class Shadows:
    """A replica's shadow desk, made when it first serves a model in two versions.

    At start where the topology lists two versions of a model, else when a second one is
    loaded while serving (`pipeline.lifecycle.hotload`): a desk costs a producer and a
    comparison topic, which a replica serving one version of each model never needs.
    """

    def __init__(self, topology: Topology, bootstrap: str, replica: Any) -> None:
        self.topology, self.bootstrap, self.replica = topology, bootstrap, replica
        self.desk: ShadowDesk | None = None
        self._producer: Producer | None = None
        self._teed: set[str] = set()
        self._lock = threading.Lock()

    def prepare(self) -> None:
        """Create the comparison topic and the producer (blocking: not on the loop thread)."""
        with self._lock:
            if self._producer is not None:
                return
            topology = self.topology
            if topology.topics.create:
                admin = AdminClient(admin_config(topology.kafka, self.bootstrap))
                ensure_topics(
                    admin,
                    [comparison_topic(topology)],
                    topology.topics.partitions,
                    topology.topics.replication_factor,
                )
            self._producer = Producer(producer_config(topology.kafka, self.bootstrap))

    def attach(self) -> None:
        """Pair the answers of every runtime of the replica (again after one is added)."""
        replica = self.replica
        routes = replica.intake.router.routes
        if self.desk is None:
            if all(len(t.keys) == 1 for t in replica.intake.router.traffic.values()):
                return  # nothing to shadow yet
            self.prepare()
            topology = self.topology
            tolerances = {name: v.tolerance for name, v in topology.versions.items()}
            self.desk = ShadowDesk(
                {}, tolerances, self._publish, replica.metrics, topology.flow.max_in_flight
            )
            replica.encoder.shadows = True
            replica.intake.shadow_gate = self.desk.admit
        for key, runtime in replica.runtimes.items():
            if key not in self._teed and key in routes:
                self.desk.versions_of[key] = (routes[key].name, routes[key].version)
                runtime.emit = self.desk.tee(runtime.emit, key)
                self._teed.add(key)

    def _publish(self, key: bytes | None, value: bytes) -> None:
        producer, topic = self._producer, comparison_topic(self.topology)
        assert producer is not None
        while True:
            try:
                producer.produce(topic, value, key)
                break
            except BufferError:  # a full queue: let it drain, never drop a comparison
                producer.poll(0.05)
        producer.poll(0)

    def close(self) -> None:
        """Deliver the comparisons still queued (for up to 10 s), then close the producer."""
        if self._producer is not None:
            close_producer(self._producer, 10.0)
            self._producer = None


def attach_shadows(topology: Topology, bootstrap: str, replica: Any) -> Shadows:
    """The replica's `Shadows`, attached now where the topology serves a model twice.

    Every such replica gets a desk, shadow or not: ``kp-pipeline versions shadow`` may
    start one while it serves.
    """
    shadows = Shadows(topology, bootstrap, replica)
    shadows.attach()
    return shadows
