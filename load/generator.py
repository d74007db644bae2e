"""An open-loop load generator: end-to-end latency of a pipeline at a chosen arrival rate.

Closed-loop benchmarks (send, wait, send) hide queueing: when the pipeline slows down the
client slows down with it, and the latency a real producer would see never shows. Here
the send times are fixed before the run by the arrival process and the seed, and the
sender never waits for results; if it cannot keep up, its lateness is recorded, not
hidden. A reader started before the first send (assign(), no group join, 5 ms fetch wait)
takes each outcome's arrival time: latency = outcome read − ``produce()`` called.

    python -m load.generator load/topologies/tiny-mlp.yaml --embedded --rate 2000 \
        --duration 20 --arrival poisson --mix tiny --seed 7
    python -m load.generator topology.yaml --bootstrap 127.0.0.1:9092 \
        --metrics http://127.0.0.1:9464/metrics --rate 50 --mix image

Writes report.json, samples.csv and four PNGs (load/plots.py) under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from load import plots
from load import report as machine_report
from load.backlog import scrape, total
from load.plots import per_second, percentiles
from pipeline.app import OpenTopology, make_codec, open_topology
from pipeline.config.topology import ModelSettings, Topology
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.kafka.clients import admin_config, ensure_topics
from pipeline.kafka.preflight import check_access
from pipeline.tools.demo import BackgroundPipeline
from pipeline.tools.samples import mixed_texts, sample_jpegs
from pipeline.tools.traffic import image_request, tensor_request, text_request
from schemas.answers import read_result
from schemas.codec import AvroCodec
from schemas.errors import KpError
from schemas.messages import Request, Status
from schemas.tensors import DeclaredTensor

__all__ = ["LoadConfig", "LoadReport", "Samples", "main", "measure", "run_load", "schedule"]

ARRIVALS = ("constant", "poisson", "burst")
KINDS = ("tiny", "image", "text")
PREENCODED_LIMIT = 2 * 2**30  # bytes of requests held in memory before the clock starts
OK, ERROR, DEAD = 1, 2, 3  # Samples.outcome codes (0: none yet)
OUTCOMES = {"ok": OK, "error": ERROR, "dead_letter": DEAD}
DTYPES = {
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
    "INT32": "int32",
    "INT64": "int64",
}
Stats = dict[str, float | None]


@dataclass
class LoadConfig:
    """One run. ``mix`` None means the kind the topology's first model takes."""

    topology: Path
    rate: float = 1000.0
    duration: float = 10.0
    arrival: str = "constant"
    mix: str | None = None
    seed: int = 7
    burst_size: int | None = None
    burst_every: float | None = None
    bootstrap: str | None = None
    embedded: bool = False
    metrics_url: str | None = None
    out: Path | None = None
    drain_timeout: float = 30.0
    warmup: int = 16  # requests sent (and awaited) before the clock starts; not counted
    # The producer's linger.ms. Tansu's cost is per produce request and partition, so at
    # 1 ms it saturates near 5,000 requests/s over 4 partitions (acks p90 260-710 ms, the
    # produce -> consume floor p99 460 ms, measured here) while 5 ms holds p99 18 ms at
    # 40,000/s: a 1 ms linger measured the broker's request rate, not the pipeline.
    linger_ms: float = 5.0

    def __post_init__(self) -> None:
        self.topology = Path(self.topology)
        self.out = None if self.out is None else Path(self.out)
        if self.arrival not in ARRIVALS:
            raise ValueError(f"arrival {self.arrival!r}: one of {', '.join(ARRIVALS)}")
        if not (self.rate > 0 and self.duration > 0):
            raise ValueError("rate and duration must be positive")
        if self.arrival == "burst":
            burst_shape(self.rate, self.burst_size, self.burst_every)
        if self.mix is not None:
            parse_mix(self.mix)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (paths as strings)."""
        d = dataclasses.asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


# -- the schedule and the mix: pure functions of the config, so a run can be repeated ----


def burst_shape(rate: float, size: int | None, every: float | None) -> tuple[int, float]:
    """(requests per burst, seconds between bursts), keeping the mean rate at ``rate``.

    Give either; with neither, one burst a second. Both must agree with the rate: a burst
    pattern that changed the mean rate would compare two loads, not two arrival processes.
    """
    if size is None:
        size = max(1, round(rate * (1.0 if every is None else every)))
        return size, size / rate
    if size < 1:
        raise ValueError("burst size must be at least 1")
    if every is not None and abs(size / every - rate) > 0.01 * rate:
        raise ValueError(
            f"bursts of {size} every {every:g} s are {size / every:g}/s, not the rate "
            f"{rate:g}/s: give --burst-size or --burst-every, not both"
        )
    return size, size / rate


def schedule(
    arrival: str,
    rate: float,
    duration: float,
    seed: int = 7,
    burst_size: int | None = None,
    burst_every: float | None = None,
) -> np.ndarray[Any, np.dtype[np.float64]]:
    """Send times, seconds from the start, sorted, all before ``duration``."""
    if arrival == "constant":
        return np.arange(math.ceil(rate * duration - 1e-9), dtype=np.float64) / rate
    if arrival == "poisson":
        rng = np.random.default_rng(seed)
        expected = rate * duration
        times = np.cumsum(rng.exponential(1 / rate, int(expected + 8 * expected**0.5 + 16)))
        while times[-1] < duration:  # astronomically rare; same seed, same extension
            more = times[-1] + np.cumsum(rng.exponential(1 / rate, int(expected) + 16))
            times = np.concatenate([times, more])
        return times[times < duration]
    if arrival == "burst":
        size, every = burst_shape(rate, burst_size, burst_every)
        starts = np.arange(math.ceil(duration / every - 1e-9), dtype=np.float64) * every
        return np.repeat(starts, size)
    raise ValueError(f"arrival {arrival!r}: one of {', '.join(ARRIVALS)}")


def parse_mix(spec: str) -> dict[str, float]:
    """``tiny`` or ``image=0.7,text=0.3`` → weights by kind, summing to 1."""
    weights: dict[str, float] = {}
    for part in (p.strip() for p in spec.split(",")):
        name, _, w = part.partition("=")
        weight = float(w) if w else 1.0
        if name not in KINDS:
            raise ValueError(f"mix {spec!r}: {name!r} is not one of {', '.join(KINDS)}")
        if name in weights or not (weight > 0 and math.isfinite(weight)):
            raise ValueError(f"mix {spec!r}: {name!r} twice, or a weight that is not > 0")
        weights[name] = weight
    s = sum(weights.values())
    return {k: v / s for k, v in weights.items()}


def assign_kinds(n: int, mix: dict[str, float], seed: int) -> np.ndarray[Any, Any]:
    """Index into ``list(mix)`` for each of ``n`` requests, drawn with the mix's weights."""
    rng = np.random.default_rng([seed, 1])  # its own stream: the schedule stays the same
    return rng.choice(len(mix), size=n, p=list(mix.values()))


# -- requests --------------------------------------------------------------------------------


def kind_of(model: ModelSettings) -> str:
    """The mix kind a model takes: text if it tokenizes, image if it decodes, else tiny."""
    stages = {s.stage for s in model.preprocess}
    if "tokenize" in stages:
        return "text"
    if stages & {"decode_image", "dali_image"}:
        return "image"
    return "tiny" if all(i.datatype != "BYTES" for i in declared(model)) else "other"


def declared(model: ModelSettings) -> list[DeclaredTensor]:
    """The model's declared inputs; `KpError` where the topology leaves them to the model."""
    if model.inputs is None:
        raise KpError(
            f"model {model.name}: declare its inputs in the topology to generate requests for "
            "it (they are left to the model there)"
        )
    return model.inputs


def model_for(topology: Topology, kind: str) -> ModelSettings:
    """The first model that takes requests of ``kind`` (raises `KpError` if none does)."""
    model = next((m for m in topology.models if kind_of(m) == kind), None)
    if model is None:
        served = ", ".join(f"{m.name} ({kind_of(m)})" for m in topology.models)
        raise KpError(f"the topology serves no model for mix {kind!r}: {served}")
    return model


def request_maker(topology: Topology, kind: str, seed: int) -> Callable[[str, int], Request]:
    """A function (request id, index) → request of ``kind`` for the model that takes it."""
    model = model_for(topology, kind)
    name, first = model.name, declared(model)[0].name
    if kind == "image":
        photos = list(sample_jpegs().values())
        return lambda rid, i: image_request(rid, name, photos[i % len(photos)], first)
    if kind == "text":
        texts = mixed_texts(256, seed)
        return lambda rid, i: text_request(rid, name, texts[i % len(texts)], first)
    rng = np.random.default_rng(seed)
    pool = [
        {
            x.name: rng.standard_normal([max(d, 1) for d in x.shape]).astype(
                DTYPES.get(x.datatype, "float32")
            )
            for x in declared(model)
        }
        for _ in range(256)
    ]
    return lambda rid, i: tensor_request(rid, name, pool[i % len(pool)])


# -- what is measured ------------------------------------------------------------------------


@dataclass
class Samples:
    """Per-request arrays (index = request number) and the lag scrapes.

    Times are seconds from the start of the schedule (absolute monotonic while running);
    NaN where nothing happened. Kept out of the JSON: people read the summaries and the
    plots, and samples.csv holds these for anyone who wants the raw data.
    """

    mix: dict[str, float]  # weights by kind, as configured
    kind: np.ndarray[Any, Any]  # index into list(mix)
    due_s: np.ndarray[Any, Any]
    sent_s: np.ndarray[Any, Any]
    sent_wall: np.ndarray[Any, Any]  # time.time() at produce(), for joining with other logs
    recv_s: np.ndarray[Any, Any]
    pipeline_ms: np.ndarray[Any, Any]  # the result's own timings.end_to_end_ms
    work_ms: np.ndarray[Any, Any]  # the result's preprocess + compute + postprocess
    outcome: np.ndarray[Any, Any]  # 0 none, OK, ERROR, DEAD
    failed: np.ndarray[Any, Any]  # the broker refused the request
    lag: list[tuple[float, float, float]] = field(default_factory=list)  # t, records, s

    @classmethod
    def empty(
        cls, mix: dict[str, float], kind: np.ndarray[Any, Any], due: np.ndarray[Any, Any]
    ) -> Samples:
        """Nothing sent or received yet."""
        n, nan = len(due), np.nan
        sent, wall, recv, own, work = (np.full(n, nan) for _ in range(5))
        zeros = np.zeros(n, np.int8), np.zeros(n, bool)
        return cls(mix, kind, due, sent, wall, recv, own, work, *zeros)

    @property
    def latency_ms(self) -> np.ndarray[Any, Any]:
        """Outcome read − produce() called, per request (NaN: no outcome)."""
        out: np.ndarray[Any, Any] = (self.recv_s - self.sent_s) * 1000.0
        return out

    @property
    def overhead_ms(self) -> np.ndarray[Any, Any]:
        """Client latency − the result's preprocess, compute and postprocess (NaN: none).

        What the pipeline added around the model's work, the broker's round trip
        included: the benchmark measures that beside it and subtracts it.
        """
        out: np.ndarray[Any, Any] = self.latency_ms - self.work_ms
        return out


class Reader(threading.Thread):
    """Reads the results and dead-letter topics; stamps each of our outcomes on arrival.

    assign() at the current end (no group join to wait for), ``fetch.wait.max.ms`` 5 so
    the broker answers at once, and poll() for the first record (a batch consume() waits
    out its whole timeout), stamped before decoding: the reader adds as little as it can
    to what it measures.
    """

    def __init__(
        self,
        conf: dict[str, Any],
        output: str,
        dead_letter: str,
        codec: AvroCodec,
        prefix: str,
        samples: Samples,
    ) -> None:
        super().__init__(name="load-reader", daemon=True)
        self.received = self.duplicates = self.warm = 0
        self._output, self._codec, self._prefix, self._s = output, codec, prefix, samples
        self._halt = threading.Event()
        self._consumer = Consumer(
            {
                **conf,
                "group.id": f"{prefix}reader",
                "enable.auto.commit": False,
                "enable.partition.eof": False,
                "fetch.wait.max.ms": 5,
                "fetch.error.backoff.ms": 5,
                "socket.nagle.disable": True,
            }
        )
        parts = []
        for topic in (output, dead_letter):
            meta = self._consumer.list_topics(topic, timeout=10).topics.get(topic)
            if meta is None or meta.error is not None:
                raise KpError(f"topic {topic!r} does not exist on the cluster")
            for p in meta.partitions:  # from the end; older records fail the id check anyway
                high = self._consumer.get_watermark_offsets(TopicPartition(topic, p), 10)[1]
                parts.append(TopicPartition(topic, p, high))
        self._consumer.assign(parts)
        self._consumer.poll(0.2)  # connected and fetching before the first request is sent

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                first = self._consumer.poll(0.05)
                if first is None:
                    continue
                now = time.monotonic()
                for msg in [first, *self._consumer.consume(1000, 0)]:
                    value = msg.value()
                    if msg.error() is None and value is not None:
                        self._record(msg.topic() == self._output, value, msg.headers(), now)
        finally:
            self._consumer.close()

    def _record(self, result: bool, value: bytes, headers: Any, now: float) -> None:
        try:  # results in any encoding the topology answers in, as the client reads them
            out = read_result(self._codec, value, headers) if result else None
            rid = out.id if out is not None else self._codec.decode_dead_letter(value).id
        except Exception:  # someone else's record in a shared topic
            return
        if not rid or not rid.startswith(self._prefix):
            return
        if rid[len(self._prefix)] == "w":
            self.warm += 1
        elif not np.isnan(self._s.recv_s[i := int(rid[len(self._prefix) :])]):
            self.duplicates += 1
        else:
            self._s.recv_s[i] = now
            self._s.outcome[i] = DEAD if out is None else OK if out.status == Status.OK else ERROR
            if out is not None:
                t = out.timings
                self._s.pipeline_ms[i] = t.end_to_end_ms
                self._s.work_ms[i] = t.preprocess_ms + t.compute_ms + t.postprocess_ms
            self.received += 1

    def stop(self) -> None:
        """Stop reading and close the consumer."""
        self._halt.set()
        self.join(10)


class Monitor(threading.Thread):
    """Scrapes a pipeline's /metrics every ``interval``: total lag in records, worst in s."""

    def __init__(self, url: str, interval: float = 0.5) -> None:
        super().__init__(name="load-metrics", daemon=True)
        self.url, self.interval = url, interval
        self.rows: list[tuple[float, float, float]] = []  # monotonic t, records, seconds
        self.errors = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while True:
            t = time.monotonic()
            try:
                s = scrape(self.url)
                secs = [v for k, v in s.items() if k.startswith("kp_consumer_lag_seconds{")]
                self.rows.append((t, total(s, "kp_consumer_lag_messages"), max(secs, default=0)))
            except (OSError, ValueError):
                self.errors += 1
            if self._halt.wait(self.interval):
                return

    def stop(self) -> None:
        """Stop scraping."""
        self._halt.set()
        self.join(10)


@dataclass
class LoadReport:
    """What a run measured; ``to_json``/``from_json`` round-trip all but the raw samples.

    Times in ms unless named ``_s``. The achieved rate is requests sent ÷ the send window
    (the duration, or longer when the sender fell behind), from the recorded send times;
    ``lateness_ms`` is how far sends trailed their schedule. ``latency_ms`` is the
    client's view, ``pipeline_e2e_ms`` the results' own ``timings.end_to_end_ms``.
    """

    config: LoadConfig
    target: dict[str, Any]  # bootstrap, where, topics, models, metrics URL
    mix: dict[str, float]
    started_at: str
    counts: dict[str, int]  # scheduled, sent, send_failures, ok, error, dead_letter, ...
    rates: dict[str, float]  # target, scheduled, achieved (per second)
    lateness_ms: Stats
    latency_ms: Stats
    pipeline_e2e_ms: Stats
    by_kind: dict[str, Stats]
    drain_s: float  # last outcome − last send
    series: dict[str, list[float | None]]
    lag: dict[str, Any]
    machine: dict[str, Any]
    # Client latency − the result's preprocess + compute + postprocess (older reports: {}).
    overhead_ms: Stats = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    samples: Samples | None = field(default=None, compare=False, repr=False)

    @property
    def missing(self) -> int:
        """Requests the broker took that got no outcome before the drain timeout."""
        return self.counts["missing"]

    @property
    def achieved_rate(self) -> float:
        """Requests sent per second, measured from the send times."""
        return self.rates["achieved"]

    def to_json(self) -> str:
        """The report as JSON (strict: missing values are null, never NaN)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del d["samples"]
        d["config"] = self.config.to_dict()
        return json.dumps(d, indent=1, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> LoadReport:
        """Read back what ``to_json`` wrote."""
        d = json.loads(text)
        return cls(**{**d, "config": LoadConfig(**d["config"])})


def _send(
    producer: Producer,
    topic: str,
    payloads: list[bytes],
    keys: list[bytes],
    due: list[float],
    s: Samples,
) -> None:
    """Produce each request at its due time (absolute monotonic); never wait for results.

    Behind schedule, the next request goes at once: falling behind shows as lateness and
    a lower achieved rate instead of a quietly stretched schedule.
    """

    def on_delivery(err: Any, msg: Any) -> None:
        if err is not None:
            key = msg.key().decode()
            s.failed[int(key[key.rindex("-") + 1 :])] = True

    for i, value in enumerate(payloads):
        pause = due[i] - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        while True:
            now, wall = time.monotonic(), time.time()
            try:
                producer.produce(topic, value, keys[i], on_delivery=on_delivery)
                break
            except BufferError:  # the client's queue is full: counts as lateness
                producer.poll(0.005)
        s.sent_s[i], s.sent_wall[i] = now, wall
        producer.poll(0)


def _measure(
    cfg: LoadConfig,
    opened: OpenTopology,
    bootstrap: str,
    metrics_url: str | None,
    where: str,
    events: Sequence[tuple[float, Callable[[], Any]]] = (),
) -> LoadReport:
    """Encode, warm up, send on schedule, drain: everything but starting a pipeline."""
    topology, topics = opened.topology, opened.topology.topics
    mix = parse_mix(cfg.mix or kind_of(topology.models[0]))
    due = schedule(cfg.arrival, cfg.rate, cfg.duration, cfg.seed, cfg.burst_size, cfg.burst_every)
    kind = assign_kinds(len(due), mix, cfg.seed)
    codec, makers = make_codec(topology), [request_maker(topology, k, cfg.seed) for k in mix]
    prefix = f"lg{cfg.seed}-{os.getpid()}-{time.time_ns() % 10**10}-"
    payloads, size = [], 0
    for i, k in enumerate(kind.tolist()):  # all encoded before the clock starts
        payloads.append(codec.encode_request(makers[k](f"{prefix}{i}", i)))
        size += len(payloads[-1])
        if size > PREENCODED_LIMIT:
            raise KpError(f"over {PREENCODED_LIMIT >> 30} GiB of requests: lower rate×duration")
    s = Samples.empty(mix, kind, due)
    check_access(topology.kafka, bootstrap, where)
    conf = {**admin_config(topology.kafka, bootstrap), "client.id": "kp-load"}
    reader = Reader(conf, topics.output, topics.dead_letter, codec, prefix, s)
    reader.start()
    monitor = Monitor(metrics_url) if metrics_url else None
    producer = Producer(
        {
            **conf,
            "linger.ms": cfg.linger_ms,
            "socket.nagle.disable": True,
            "queue.buffering.max.messages": 2_000_000,
            "queue.buffering.max.kbytes": 2**21,
        }
    )
    try:
        for j in range(cfg.warmup):  # connections open, model warm, the path checked
            rid = f"{prefix}w{j}"
            warm = codec.encode_request(makers[j % len(makers)](rid, j))
            producer.produce(topics.input[0], warm, rid.encode())
        producer.flush(30)
        deadline = time.monotonic() + 60
        while reader.warm < cfg.warmup and time.monotonic() < deadline:
            time.sleep(0.01)
        if cfg.warmup and not reader.warm:
            raise KpError(
                f"no outcome for {cfg.warmup} warm-up requests in 60 s: is a pipeline serving "
                f"{topics.input[0]} → {topics.output} on {bootstrap}?"
            )
        if monitor is not None:
            monitor.start()
        t0, t0_wall = time.monotonic() + 0.05, time.time() + 0.05
        if events:
            threading.Thread(target=_on_schedule, args=(t0, events), daemon=True).start()
        keys = [f"{prefix}{i}".encode() for i in range(len(due))]
        _send(producer, topics.input[0], payloads, keys, (t0 + due).tolist(), s)
        producer.flush(cfg.drain_timeout)
        deadline = max(time.monotonic(), t0 + cfg.duration) + cfg.drain_timeout
        while reader.received < len(due) - s.failed.sum() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        reader.stop()
        if monitor is not None:
            monitor.stop()
    s.sent_s -= t0
    s.recv_s -= t0
    s.lag = [(t - t0, m, sec) for t, m, sec in (monitor.rows if monitor else [])]
    return _report(cfg, opened, s, reader, monitor, bootstrap, metrics_url, where, t0_wall)


def _on_schedule(t0: float, events: Sequence[tuple[float, Callable[[], Any]]]) -> None:
    for at, action in sorted(events, key=lambda e: e[0]):
        time.sleep(max(0.0, t0 + at - time.monotonic()))
        action()


def _report(
    cfg: LoadConfig,
    opened: OpenTopology,
    s: Samples,
    reader: Reader,
    monitor: Monitor | None,
    bootstrap: str,
    metrics_url: str | None,
    where: str,
    t0_wall: float,
) -> LoadReport:
    """The summaries of the samples (times already relative to the start)."""
    topics, lat = opened.topology.topics, s.latency_ms
    sent, failed = int(np.count_nonzero(~np.isnan(s.sent_s))), int(s.failed.sum())
    counts = {"scheduled": len(s.due_s), "sent": sent, "send_failures": failed}
    counts |= {k: int(np.count_nonzero(s.outcome == c)) for k, c in OUTCOMES.items()}
    counts |= {"received": reader.received, "duplicates": reader.duplicates}
    counts["missing"] = sent - failed - reader.received
    window = max(cfg.duration, float(np.nanmax(s.sent_s, initial=0.0)))
    target: dict[str, Any] = {"bootstrap": bootstrap, "where": where, "input": topics.input[0]}
    target |= {"output": topics.output, "dead_letter": topics.dead_letter, "metrics": metrics_url}
    target["models"] = [m.name for m in opened.topology.models]
    return LoadReport(
        config=cfg,
        target=target,
        mix=s.mix,
        started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0_wall)),
        counts=counts,
        rates={
            "target": cfg.rate,
            "scheduled": len(s.due_s) / cfg.duration,
            "achieved": sent / window,
        },
        lateness_ms=percentiles((s.sent_s - s.due_s) * 1000.0),
        latency_ms=percentiles(lat),
        pipeline_e2e_ms=percentiles(s.pipeline_ms),
        by_kind={
            k: {"sent": float(np.count_nonzero(s.kind == j)), **percentiles(lat[s.kind == j])}
            for j, k in enumerate(s.mix)
        },
        drain_s=float(np.nanmax(s.recv_s, initial=0.0) - np.nanmax(s.sent_s, initial=0.0)),
        series=per_second(s, cfg.duration),
        lag={"scrapes": [list(r) for r in s.lag], "errors": monitor.errors if monitor else 0},
        machine={**machine_report.machine(), "broker": where},
        overhead_ms=percentiles(s.overhead_ms),
        samples=s,
    )


def fresh_topics(opened: OpenTopology, tag: str) -> OpenTopology:
    """The topology with its own topics and group, so a run never sees another's records."""
    t = opened.topology
    topics = t.topics.model_copy(
        update={
            "input": [f"{tag}.requests"],
            "output": f"{tag}.results",
            "dead_letter": f"{tag}.dead-letters",
        }
    )
    kafka = t.kafka.model_copy(update={"group_id": f"{tag}.group"})
    return dataclasses.replace(
        opened, topology=t.model_copy(update={"topics": topics, "kafka": kafka})
    )


def measure(
    config: LoadConfig,
    opened: OpenTopology,
    bootstrap: str,
    metrics_url: str | None,
    events: Sequence[tuple[float, Callable[[], Any]]] = (),
) -> LoadReport:
    """Run the load against a pipeline already serving ``opened`` (its topics) at ``bootstrap``.

    ``events``: (seconds into the schedule, action) run on a thread of their own at those
    moments, e.g. a command whose effect on latency the run measures (`load.lifecycle`).
    """
    report = _measure(config, opened, bootstrap, metrics_url, bootstrap, events)
    if config.out is not None:
        plots.write_all(report, config.out)
    return report


def run_load(config: LoadConfig) -> LoadReport:
    """Run the load; with ``config.out``, write report.json, samples.csv and the PNGs.

    ``embedded``: a Tansu broker and the topology's pipeline are started here (the
    pipeline on a thread of this process, so both share its GIL) and stopped after.
    Otherwise the pipeline must be running already, reachable at ``bootstrap``.
    """
    opened = open_topology(config.topology)
    for kind in parse_mix(config.mix or kind_of(opened.topology.models[0])):
        model_for(opened.topology, kind)  # refused before a broker or a model is started
    if config.embedded:
        opened = fresh_topics(opened, f"load-{os.getpid()}-{time.time_ns() % 10**10}")
        t = opened.topology.topics
        with EmbeddedBroker() as broker:
            address = broker.bootstrap_servers
            ensure_topics(  # the admin client goes at once: none may outlive the broker
                AdminClient({"bootstrap.servers": address}),
                [*t.input, t.output, t.dead_letter],
                t.partitions,
                1,
            )
            served = BackgroundPipeline(opened, address).start()
            try:
                url = config.metrics_url
                if url is None and served.pipeline is not None:
                    url = served.pipeline.metrics_url
                where = f"embedded Tansu on {address}, pipeline in this process"
                report = _measure(config, opened, address, url, where)
            finally:
                served.stop()
    else:
        address = config.bootstrap or opened.topology.kafka.bootstrap_servers
        if address == "embedded":
            raise KpError("the topology says 'embedded': give --bootstrap HOST:PORT or --embedded")
        report = _measure(config, opened, address, config.metrics_url, address)
    if config.out is not None:
        plots.write_all(report, config.out)
    return report


def main(argv: list[str] | None = None) -> int:
    """The CLI: exit 0 when every request got an outcome, 1 if some are missing, 2 on errors."""
    ap = argparse.ArgumentParser(
        prog="python -m load.generator", description=__doc__.split("\n")[0]
    )
    ap.add_argument("topology", type=Path)
    ap.add_argument("--rate", type=float, default=1000.0, help="requests per second (mean)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of sending")
    ap.add_argument("--arrival", choices=ARRIVALS, default="constant")
    ap.add_argument("--mix", help="tiny, image, text, or weights: image=0.7,text=0.3")
    ap.add_argument("--seed", type=int, default=7, help="fixes the schedule and the mix")
    ap.add_argument("--burst-size", type=int, help="requests per burst (--arrival burst)")
    ap.add_argument("--burst-every", type=float, help="seconds between bursts (default 1)")
    ap.add_argument("--bootstrap", help="a running cluster (default: the topology's)")
    ap.add_argument("--embedded", action="store_true", help="start a broker and pipeline here")
    ap.add_argument("--metrics", dest="metrics_url", help="the pipeline's /metrics, for lag")
    ap.add_argument("--out", type=Path, default=Path("load/results/generator"))
    ap.add_argument("--drain-timeout", type=float, default=30.0, help="s to wait for outcomes")
    ap.add_argument("--warmup", type=int, default=16, help="requests before the clock starts")
    ap.add_argument("--linger-ms", type=float, default=5.0, help="the producer's linger.ms")
    try:
        report = run_load(LoadConfig(**vars(ap.parse_args(argv))))
    except (KpError, ValueError) as e:
        print(f"load.generator: {e}", file=sys.stderr)
        return 2
    print(plots.summary(report))
    return 1 if report.missing else 0


if __name__ == "__main__":
    sys.exit(main())
