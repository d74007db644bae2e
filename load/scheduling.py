"""A high-priority model's latency alone and under a 10x low-priority flood, scheduled or not.

Two models share one device that runs one batch at a time, 25 ms a batch
(`load.timed_backends.OneDeviceBackend`: a stand-in for a GPU, which this machine does
not have; the device is a lock, so the figures are the scheduler's and the pipeline's,
not a model's). ``high`` (1 instance) gets 20 requests/s; ``low`` (3 instances) gets
10x that, 200 requests/s, in batches of up to 8: even in full batches, with high's own
that is more than the device runs (45 batches/s against 40), so low's backlog grows, as
floods do. Four runs of 10 s each in one process, one broker: high alone; with the flood
and no scheduler; with the flood and ``scheduling: {enabled: true, concurrency: 1}``,
high at priority 10; and, scheduled, 20 requests/s with ``parameters.priority: 9`` sent
to ``low`` itself inside its flood (a request's own priority within one model). Printed
per run: the watched requests' (high's, then the priority-9 ones') p50 and p99 end to
end (record timestamp to result encoded, from each result's own timings) and inside the
pipeline (consumed to encoded), and how many others were served (each run waits until
every request has its answer).

    python -m load.scheduling [--seconds 10]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from pipeline.app import open_topology
from pipeline.config.topology import KafkaSettings
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.kafka.clients import ensure_topics
from pipeline.tools.demo import BackgroundPipeline
from pipeline.tools.traffic import read_topic, tensor_request
from schemas.codec import AvroCodec
from schemas.messages import Result

__all__ = ["main", "measure", "two_models"]

BATCH_MS = 25
HIGH_RATE = 20.0
FLOOD = 10  # low's rate, as a multiple of high's

TOPOLOGY = """
kafka: {{bootstrap_servers: embedded, group_id: {group}}}
topics: {{input: [{input}], output: {output}, dead_letter: {dlq}, create: false}}
flow: {{max_in_flight: 4096, commit_interval_ms: 100}}
scheduling: {{enabled: {enabled}, concurrency: 1}}
models:
  - name: low
    backend: load.timed_backends:OneDeviceBackend
    artifact: {artifact}
    instances: 3
    options: {{delay_ms: {batch_ms}}}
    inputs: [{{name: x, datatype: FP32, shape: [4]}}]
    batching: {{max_batch_size: 8, max_delay_ms: {delay_ms}}}
  - name: high
    backend: load.timed_backends:OneDeviceBackend
    artifact: {artifact}
    options: {{delay_ms: {batch_ms}}}{high}
    inputs: [{{name: x, datatype: FP32, shape: [4]}}]
    batching: {{max_batch_size: 8, max_delay_ms: {delay_ms}}}
"""


def two_models(
    folder: Path,
    names: dict[str, str],
    scheduler: bool,
    batch_ms: float = BATCH_MS,
    delay_ms: float = 2,
    high_weight: float = 1.0,
) -> Path:
    """The topology of ``low`` (3 instances) and ``high`` on one simulated device.

    ``names``: its ``input``, ``output``, ``dlq`` and ``group``. With ``scheduler`` the
    device scheduler is on (``concurrency: 1``) and ``high`` has priority 10 (and
    ``high_weight``: a small one leaves priority alone to keep it ahead). Written,
    with the device's artifact, into ``folder``.
    """
    artifact = folder / "device.txt"
    artifact.write_text("one device\n")
    path = folder / f"two-models-{'scheduled' if scheduler else 'plain'}.yaml"
    high = f"\n    scheduling: {{priority: 10, weight: {high_weight:g}}}" if scheduler else ""
    path.write_text(
        TOPOLOGY.format(
            artifact=artifact,
            enabled=str(scheduler).lower(),
            batch_ms=batch_ms,
            delay_ms=delay_ms,
            high=high,
            **names,
        )
    )
    return path


def _paced(address: str, topic: str, sender: Sender, seconds: float) -> None:
    """The sender's requests, ``rate`` a second for ``seconds``, evenly spaced."""
    codec = AvroCodec()
    producer = Producer({"bootstrap.servers": address, "linger.ms": 1, "log_level": 3})
    x = np.ones(4, np.float32)
    start, n = time.monotonic(), int(sender.rate * seconds)
    params = {} if sender.priority is None else {"priority": str(sender.priority)}
    for i in range(n):
        time.sleep(max(0.0, start + i / sender.rate - time.monotonic()))
        request = tensor_request(f"{sender.name}-{i}", sender.model, {"x": x})
        request.parameters = params
        producer.produce(topic, codec.encode_request(request), sender.name.encode())
        producer.poll(0)
    producer.flush(30)


@dataclass(frozen=True)
class Sender:
    """A stream of requests: its name (the ids' prefix), model, rate, their priority."""

    name: str
    model: str
    rate: float
    priority: int | None = None


def measure(
    broker: EmbeddedBroker, senders: list[Sender], scheduler: bool, seconds: float
) -> dict[str, float]:
    """The first sender's latency percentiles (ms) and the others' count served."""
    tag = f"sched.{os.getpid()}.{time.monotonic_ns()}"
    address = broker.bootstrap_servers
    ensure_topics(AdminClient({"bootstrap.servers": address}), [f"{tag}.in", f"{tag}.out"], 4, 1)
    names = {"input": f"{tag}.in", "output": f"{tag}.out", "dlq": f"{tag}.dlq", "group": tag}
    with tempfile.TemporaryDirectory() as tmp:
        path = two_models(Path(tmp), names, scheduler)
        served = BackgroundPipeline(open_topology(path), address).start(120)
    assert served.pipeline is not None
    threads = [
        threading.Thread(target=_paced, args=(address, f"{tag}.in", s, seconds)) for s in senders
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = sum(int(s.rate * seconds) for s in senders)
    deadline = time.monotonic() + 120
    stats = served.pipeline.stats
    while stats.results + stats.dead_letters < expected and time.monotonic() < deadline:
        time.sleep(0.05)  # every request answered (the flood's backlog drains after it)
    served.stop()
    watched, others = _read(address, f"{tag}.out", f"{senders[0].name}-")
    end_to_end = [r.timings.end_to_end_ms for r in watched]
    inside = [
        r.timings.queue_ms + r.timings.preprocess_ms + r.timings.compute_ms
        + r.timings.postprocess_ms
        for r in watched
    ]  # fmt: skip
    return {
        "watched": len(watched),
        "e2e_p50": float(np.percentile(end_to_end, 50)),
        "e2e_p99": float(np.percentile(end_to_end, 99)),
        "inside_p50": float(np.percentile(inside, 50)),
        "inside_p99": float(np.percentile(inside, 99)),
        "others": len(others),
    }


def _read(address: str, topic: str, prefix: str) -> tuple[list[Result], list[Result]]:
    """The results on ``topic``: those whose ids start with ``prefix``, the others."""
    codec = AvroCodec()
    records = read_topic(KafkaSettings(), address, topic, timeout=30, idle=3)
    results = [codec.decode_result(m.value()) for m in records]
    watched = [r for r in results if r.id.startswith(prefix)]
    return watched, [r for r in results if not r.id.startswith(prefix)]


def main(argv: list[str] | None = None) -> int:
    """The runs, one after the other; a table of the figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0)
    args = p.parse_args(argv)
    high = Sender("high", "high", HIGH_RATE)
    flood = Sender("low", "low", HIGH_RATE * FLOOD)
    urgent = Sender("urgent", "low", HIGH_RATE, priority=9)  # low's model, its own priority
    runs = [
        ("high alone", [high], False),
        ("10x low flood, no scheduler", [high, flood], False),
        ("10x low flood, scheduler", [high, flood], True),
        ("priority-9 requests to low itself, in its 10x flood, scheduler", [urgent, flood], True),
    ]
    print("| run | watched served | p50 / p99 end to end (ms) | inside (ms) | others served |")
    print("|---|---:|---:|---:|---:|")
    with EmbeddedBroker() as broker:
        for name, senders, scheduler in runs:
            f = measure(broker, senders, scheduler, args.seconds)
            print(
                f"| {name} | {f['watched']:.0f} | {f['e2e_p50']:.1f} / {f['e2e_p99']:.1f} | "
                f"{f['inside_p50']:.1f} / {f['inside_p99']:.1f} | {f['others']:.0f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
