"""Serving a kp-pipeline model from inside a Faust (faust-streaming) application.

For teams that already run Faust workers and want kp-pipeline's model handling without its
consumer loop: the same topology file, the same preprocess stages, backend and postprocess
stages, the same Avro requests, results and dead letters, with the same dead-letter reasons
(``undecodable``, ``unknown_model``, ``bad_tensor``, a stage's own reasons,
``preprocess_failed``, ``inference_failed``, ``undeliverable``). Faust owns the Kafka side:
connections, the consumer group, offsets. The model side is kp-pipeline's own serving core, the
one `pipeline.engine.loop` runs: `pipeline.serving.intake.Intake` decodes, routes and keys each
request, and each model's `pipeline.serving.runtime.ModelRuntime` runs its batches, so requests
past their ``deadline_ms`` get EXPIRED results, transient failures are retried, a poison request
is isolated by halving and the device scheduler picks batches, as in ``kp-pipeline run``.

Use::

    import faust
    from pipeline.integrations.faust import attach

    app = faust.App(
        "tiny-serving",
        broker="kafka://127.0.0.1:9092",
        broker_session_timeout=6.0,      # Tansu joins take half of it
        broker_commit_interval=0.5,
        topic_disable_leader=True,       # no leader topic: nothing here needs one
        web_enabled=False,
    )
    served = attach(app, "load/topologies/tiny-mlp.yaml")   # loads the model now

    # faust -A mymodule:app worker -l info   (or app.main())

`attach` defines one agent on the topology's input topics. It reads batches with
``stream.noack_take(take_size, within=max_delay_s)`` (sizes from the topology's
batching, see `KpFaustModel.take_size`), runs each through `KpFaustModel.handle` and
`KpFaustModel.publish`, then acks its events. An agent of your own does the same::

    model = KpFaustModel.from_topology("topology.yaml")

    @app.agent(app.topic(*model.input_topics, value_type=bytes, value_serializer="raw"))
    async def infer(stream):
        async for events in stream.noack_take(model.take_size, within=model.max_delay_s):
            await model.publish(app, await model.handle(events))
            for event in events:
                await stream.ack(event)

From the topology: the models, their batching, the topics, the Schema Registry and
``tracing`` (a span per request, as `pipeline.observability.tracing` makes them, ended
when the broker acknowledged its outcome). Not
from it: the ``kafka`` connection settings, ``flow`` and ``metrics`` (the Faust app has
its own), and lag-driven batching (``lag_control``): batch size and delay stay fixed.
The output and dead-letter topics must exist (``topics.create`` is ``kp-pipeline run``'s
job; Faust declares missing input topics itself, with its own partition count).

Delivery is at least once, as in kp-pipeline, with Faust's default
``processing_guarantee`` and an agent written as above. Faust commits an offset once
that event and every earlier one of its partition are acked, and flushes its producer
before each commit. `KpFaustModel.publish` returns only after the broker acknowledged
every result and dead letter of the batch (sent at once, never held back for the
commit), and the events are acked after that. So a crash, a rebalance or a stop at any
moment leaves the events whose outcomes were not acknowledged uncommitted, and they are
served again: duplicates are possible, losses are not. ``take`` and ``take_events``
would not do: they ack the batch in a ``finally`` clause when the loop body ends, also
when it ends with an exception (the agent is restarted and the batch is committed; seen
on Tansu with faust-streaming 0.15.3), so a failed publish would lose its requests.
``handle`` never raises for a bad request (that is a dead letter), and ``publish``
raises `DeliveryError` only for a failure a retry in place cannot fix (a result too
large or a topic that cannot be written becomes a dead letter instead, as in
kp-pipeline). `attach`'s agent crashes the app on any exception, so the worker stops
with the batch un-acked and a restart serves it again, as kp-pipeline stops.

Long because the adapter's at-least-once argument (acks after acknowledged outcomes, what
a crash leaves uncommitted) runs through its event handling, publishing and agent; split
up, the reasoning would span modules that must change together.

Versions: ``model.follow_control(bootstrap)`` makes the adapter follow the group's control
topic as ``kp-pipeline run`` replicas do, for splits (``versions promote``, ``canary``,
``rollback`` between the versions the topology loads); it loads no new artifact and does
not shadow (`pipeline.lifecycle.follower.follow_splits`).

The blocking work (decoding, stages, inference, encoding) runs on threads, so Faust's
event loop keeps fetching meanwhile: each model's runtime has a preprocess thread and a
thread per instance (``instances:``), and the model batches of one ``take`` batch go to
the least-busy instance. The agent serves one ``take`` batch at a time; Faust fills the
next one meanwhile.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import faust
from faust.types import AgentT, EventT, TopicT

from pipeline.app import OpenTopology, make_codec, open_topology
from pipeline.config.loader import load_topology
from pipeline.kafka.refusals import is_permanent
from pipeline.lifecycle.follower import ControlFollower, follow_splits
from pipeline.observability.metrics import Metrics
from pipeline.observability.tracing import make_tracing
from pipeline.serving.graph import ServedModel, build_graph, close_graph
from pipeline.serving.intake import Intake
from pipeline.serving.outcomes import Outcome, OutcomeEncoder
from pipeline.serving.runtime import ModelRuntime
from pipeline.serving.scheduler import Classed, DeviceScheduler
from schemas.codec import AvroCodec
from schemas.errors import BrokerError, KpError
from schemas.messages import Envelope

__all__ = ["DeliveryError", "FaustStats", "KpFaustModel", "attach"]

log = logging.getLogger(__name__)

_FATAL_CHECK_S = 0.5  # how often a waiting batch looks for a runtime that stopped for good


class DeliveryError(BrokerError):
    """An outcome the broker did not take, for a reason a retry in place cannot fix."""


@dataclass
class FaustStats:
    """What one `KpFaustModel` did, for logs and benchmarks (monotonic clock)."""

    consumed: int = 0
    results: int = 0
    dead_letters: int = 0
    batches: int = 0
    first_consumed: float | None = None
    last_delivered: float | None = None


class _Gathered:
    """Collects the outcomes the runtimes emit for one batch of events, from their threads."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.outcomes: list[Outcome] = []
        self._cond = threading.Condition()

    def emit(self, outcomes: list[Outcome]) -> None:
        with self._cond:
            self.outcomes.extend(outcomes)
            self._cond.notify_all()

    def wait(self, fatal: Callable[[], str | None]) -> list[Outcome]:
        """Every outcome (a runtime gives each submitted row exactly one), unless ``fatal``.

        A runtime that stopped for good (`ModelRuntime.fatal`) leaves rows without an
        outcome: raise then, so the agent crashes with the events un-acked instead of
        waiting forever.
        """
        with self._cond:
            while len(self.outcomes) < self.expected:
                why = fatal()
                if why is not None:
                    raise KpError(f"{why}; the batch stays unacknowledged")
                self._cond.wait(_FATAL_CHECK_S)
            return self.outcomes


class KpFaustModel:
    """A topology's models, ready to serve batches of Faust events.

    Build it with `from_topology` (or `from_opened`); it loads every model now, so a bad
    topology or model fails before the worker consumes anything, with the same messages
    as ``kp-pipeline validate``. Close it (or use it as a context manager) to unload.
    """

    def __init__(
        self,
        opened: OpenTopology,
        graph: Sequence[ServedModel],
        codec: AvroCodec | None = None,
    ) -> None:
        if not graph:
            raise KpError(f"{opened.source}: no model to serve")
        self.opened = opened
        self.graph = {m.name: m for m in graph}
        topics = opened.topology.topics
        self.codec = codec or make_codec(opened.topology)
        # Spans per request, as the Kafka loop makes them, ended when the broker acked.
        self.tracing = make_tracing(opened.topology.tracing, opened.source)
        self.encoder = OutcomeEncoder(
            self.codec,
            topics.output,
            topics.dead_letter,
            propagate_headers=topics.propagate_headers,
            result_encoding=topics.result_encoding,
            tracing=self.tracing is not None,
        )
        self.stats = FaustStats()
        # The Faust app exports its own metrics; the runtimes' stay in this registry.
        self.metrics = Metrics()
        self.intake = Intake.for_topology(
            graph, self.codec, self.encoder, opened.topology, self.metrics
        )
        scheduler = DeviceScheduler.for_graph(opened.topology.scheduling, graph, self.metrics)
        self.runtimes = {
            m.name: ModelRuntime(m, self.encoder, _nowhere, self.metrics, scheduler) for m in graph
        }
        for runtime in self.runtimes.values():
            runtime.start()
        # Decoding and routing, off the event loop; waits on the runtimes' threads.
        self._intake = concurrent.futures.ThreadPoolExecutor(4, "kp-faust-intake")
        self._topics: dict[str, TopicT] = {}  # of `_topics_app`
        self._topics_app: faust.App | None = None
        self._lock = threading.Lock()
        self._follower: ControlFollower | None = None

    def follow_control(self, bootstrap: str) -> None:
        """Apply the group's version splits from its control topic, as replicas do."""
        self._follower = follow_splits(
            self.opened.topology, bootstrap, self.intake.router, self.metrics
        )

    @classmethod
    def from_topology(
        cls,
        path: str | Path,
        model: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> KpFaustModel:
        """Load a topology file and build its models (``model``: only that one).

        ``env`` replaces the process environment for the file's ``${VAR}``s.
        """
        if env is None:
            opened = open_topology(path)
        else:
            opened = OpenTopology(load_topology(path, env), str(path), Path(path).resolve().parent)
        return cls.from_opened(opened, model)

    @classmethod
    def from_opened(cls, opened: OpenTopology, model: str | None = None) -> KpFaustModel:
        """Build the models of an already loaded topology (``model``: only that one)."""
        topology = opened.topology
        if model is not None:
            chosen = [m for m in topology.models if m.name == model]
            if not chosen:
                served = ", ".join(m.name for m in topology.models)
                raise KpError(f"{opened.source}: no model {model!r} (it has {served})")
            topology = topology.model_copy(update={"models": chosen})
            opened = dataclasses.replace(opened, topology=topology)
        graph = build_graph(topology, opened.source, opened.base_dir)
        try:
            return cls(opened, graph)
        except BaseException:  # e.g. the Schema Registry refused: unload what was loaded
            close_graph(graph)
            raise

    # -- what the agent needs ---------------------------------------------------------

    @property
    def input_topics(self) -> list[str]:
        """The topology's input topics: the agent's channel."""
        return list(self.opened.topology.topics.input)

    @property
    def take_size(self) -> int:
        """The default events per ``take``: enough for a full batch on every instance.

        The agent serves one ``take`` batch at a time, so a batch of one model's
        ``max_batch_size`` would leave all but one of its instances idle: the default
        is the largest ``max_batch_size × instances`` among the models served.
        """
        return max(
            m.settings.batching.max_batch_size * len(m.instances) for m in self.graph.values()
        )

    @property
    def max_delay_s(self) -> float:
        """The shortest ``batching.max_delay_ms`` served, in seconds: the default ``within``."""
        return min(m.settings.batching.max_delay_ms for m in self.graph.values()) / 1000.0

    # -- one batch ----------------------------------------------------------------------

    @staticmethod
    def envelope(event: EventT[Any]) -> Envelope:
        """The consumed record behind a Faust event, from its raw message bytes.

        Works whatever the topic's value type is: the raw key and value are used, not
        what Faust deserialized. ``consumed_at`` is when Faust's monitor saw the message
        (its ``time_in``, on the same monotonic clock) when it has one.
        """
        msg = event.message
        timestamp_ms = int(msg.timestamp * 1000.0)
        if timestamp_ms <= 0:  # no timestamp on the record: date it by its arrival
            timestamp_ms = int(time.time() * 1000)
        consumed_at = msg.time_in if msg.time_in is not None else time.monotonic()
        return Envelope(
            msg.topic,
            msg.partition,
            msg.offset,
            msg.key,
            msg.value or b"",
            timestamp_ms,
            consumed_at,
            headers=_header_list(msg.headers),
        )

    async def handle(self, events: Sequence[EventT[Any]]) -> list[Outcome]:
        """Serve one batch of events: exactly one outcome per event, in event order.

        Runs on worker threads (`process`), so the event loop is free meanwhile. Never
        raises for a request's own problem: that is a dead letter among the outcomes.
        """
        tombstones = frozenset(i for i, e in enumerate(events) if e.message.value is None)
        return await self.handle_envelopes([self.envelope(e) for e in events], tombstones)

    async def handle_envelopes(
        self, rows: list[Envelope], tombstones: frozenset[int] = frozenset()
    ) -> list[Outcome]:
        """`handle` for records already turned into envelopes (tests, other clients).

        ``tombstones``: the positions of records that had no value at all.
        """
        if not rows:
            return []
        now = time.monotonic()
        with self._lock:
            self.stats.consumed += len(rows)
            self.stats.batches += 1
            if self.stats.first_consumed is None:
                self.stats.first_consumed = min(now, *(r.consumed_at for r in rows))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._intake, self.process, rows, tombstones)

    def process(
        self, rows: list[Envelope], tombstones: frozenset[int] = frozenset()
    ) -> list[Outcome]:
        """The blocking part of `handle`: decode, route, group, run, encode.

        Requests are grouped by their batch key (`pipeline.serving.intake`), so a model
        batch never mixes shapes, and each group is cut to the model's
        ``max_batch_size``. The batches go to their model's runtime, which spreads them
        over its instances; this returns once every row has its outcome.
        """
        groups, letters = self.intake.admit_batch(rows, tombstones)
        gathered = _Gathered(len(rows) - len(letters))
        for (name, key), members in groups.items():
            cls = key.cls if type(key) is Classed else None
            size = self.graph[name].settings.batching.max_batch_size
            for start in range(0, len(members), size):
                self.runtimes[name].submit(members[start : start + size], gathered.emit, cls)
        outcomes = letters + gathered.wait(self._fatal)
        order = {id(r): i for i, r in enumerate(rows)}
        outcomes.sort(key=lambda o: order[id(o.envelope)])
        return outcomes

    def _fatal(self) -> str | None:
        """Why a model's runtime stopped for good, if one did."""
        return next((r.fatal for r in self.runtimes.values() if r.fatal is not None), None)

    # -- publishing -----------------------------------------------------------------------

    async def publish(self, app: faust.App, outcomes: Sequence[Outcome]) -> None:
        """Send every outcome to its topic with its request's key; wait for the broker.

        Results go to the output topic (or the request's reply topic), dead letters to
        the dead-letter topic with the ``kp.reason``/``kp.error``/``kp.source`` headers,
        as kp-pipeline produces them. Returns once the broker acknowledged all of them:
        ack the events only after that. A result the broker refuses for good (too large,
        a topic that cannot be written) is sent as an ``undeliverable`` dead letter
        instead, and a dead letter that is too large is sent without the request's
        bytes; any other failure raises `DeliveryError`.
        """
        pending, delivered = list(outcomes), []
        while pending:
            # Concurrently: aiokafka makes a send wait while its partition's batch is
            # full, and one send at a time would wait a round trip for each batch.
            sends = [self._deliver(app, out) for out in pending]
            done = await asyncio.gather(*sends, return_exceptions=True)
            retry: list[Outcome] = []
            for out, error in zip(pending, done, strict=True):
                if error is None:
                    self._count(out)
                    delivered.append(out)
                elif isinstance(error, Exception):
                    retry.append(self._refused(out, error))
                else:
                    raise error
            pending = retry
        if self.tracing is not None:
            self.tracing.published(delivered)

    async def _deliver(self, app: faust.App, out: Outcome) -> None:
        """Send one outcome through Faust's producer and wait for the broker's ack."""
        topic = self._topic(app, out.topic)
        headers = [
            (k, v.encode() if isinstance(v, str) else v or b"") for k, v in out.headers or []
        ]
        fut = await topic.send(
            key=out.envelope.key, value=out.value, headers=headers or None, force=True
        )
        await fut

    def _topic(self, app: faust.App, name: str) -> TopicT:
        if app is not self._topics_app:  # a topic object belongs to one app
            self._topics, self._topics_app = {}, app
        topic = self._topics.get(name)
        if topic is None:
            topic = app.topic(
                name,
                key_type=bytes,
                value_type=bytes,
                key_serializer="raw",
                value_serializer="raw",
            )
            self._topics[name] = topic
        return topic

    def _count(self, out: Outcome) -> None:
        with self._lock:
            if out.reason is None:
                self.stats.results += 1
            else:
                self.stats.dead_letters += 1
            self.stats.last_delivered = time.monotonic()

    def _refused(self, out: Outcome, err: Exception) -> Outcome:
        """What to send instead of an outcome the broker refused, or raise."""
        env = out.envelope
        where = f"{env.topic}/{env.partition}@{env.offset}"
        cause = err.__cause__ if err.__cause__ is not None else err  # Faust wraps send errors
        if not is_permanent(getattr(cause, "errno", None)):  # aiokafka: the protocol code
            raise DeliveryError(f"delivery to {out.topic} failed for {where}: {cause!r}") from err
        stand_in = self.encoder.stand_in(out, repr(cause))
        if stand_in is not None:
            return stand_in
        raise DeliveryError(f"dead letter for {where} cannot be written to {out.topic}: {cause!r}")

    # -- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the threads and unload the models."""
        if self._follower is not None:
            self._follower.stop()
        self._intake.shutdown(wait=True)
        for runtime in self.runtimes.values():
            runtime.stop(timeout=60.0)
        close_graph(list(self.graph.values()))
        if self.tracing is not None:
            self.tracing.close()

    def __enter__(self) -> KpFaustModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attach(
    app: faust.App,
    model: KpFaustModel | str | Path,
    *,
    batch_size: int | None = None,
    within: float | None = None,
    name: str = "kp-inference",
) -> KpFaustModel:
    """Define the agent that serves ``model`` (a topology file, or a built model) on ``app``.

    The agent reads the topology's input topics in batches of up to ``batch_size``
    events, waiting at most ``within`` seconds for a batch to fill (default:
    `KpFaustModel.take_size` and the topology's ``max_delay_ms``), and acks each
    batch's events only after all of its outcomes are acknowledged by the broker (see
    the module's docstring for the delivery semantics). An exception (a `DeliveryError`)
    crashes the app, so the worker stops with the batch un-acked. Returns the model,
    whose ``stats`` count what the agent did; a model built here from a path stays
    loaded until its ``close()``.
    """
    served = model if isinstance(model, KpFaustModel) else KpFaustModel.from_topology(model)
    size = batch_size or served.take_size
    delay = served.max_delay_s if within is None else within
    channel = app.topic(
        *served.input_topics,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )

    async def serve(stream: faust.StreamT[bytes]) -> None:
        batches = cast(faust.Stream[bytes], stream).noack_take(size, within=delay)
        async for batch in batches:
            # noack_take yields the events themselves (it buffers `current_event`).
            events = cast(Sequence[EventT[bytes]], batch)
            try:
                await served.publish(app, await served.handle(events))
            except Exception as e:  # DeliveryError, or a bug: never ack what was not served
                log.exception("%s; stopping the worker, the batch stays uncommitted", e)
                await app.crash(e)
                return
            for event in events:
                await stream.ack(event)

    agent: AgentT[bytes] = app.agent(channel, name=name)(serve)
    log.debug("attached agent %s to %s", agent.name, ", ".join(served.input_topics))
    return served


def _nowhere(outcomes: list[Outcome]) -> None:
    """The runtimes' default emit: never used, every batch names its own."""
    raise AssertionError(f"{len(outcomes)} outcomes of a batch submitted without an emit")


def _header_list(headers: Any) -> list[tuple[str, bytes | None]] | None:
    """A Faust message's headers (a list of pairs or a mapping) as the client gives them."""
    if not headers:
        return None
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    return [(str(k), v) for k, v in pairs]
