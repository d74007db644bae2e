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

    python -m load.scheduling [--seconds 10] [--device cuda:0]

``--device`` runs the same four runs with a real model on a real device instead of the
stand-in: both models are one TorchScript model (`busy_model`, a chain of matrix products
calibrated on that device to about 25 ms a batch of 8) served by the torch backend there,
each instance on its own CUDA stream, so the contention is the device's own. ``make
gpu-check`` runs it on the GPU machine (`load.gpu`'s ``scheduling`` part); on a GPU it has
NOT run yet (none was lent to this work); ``--device cpu`` runs it here.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    backend: {backend}
    artifact: {artifact}
    device: {device}
    instances: 3
    options: {options}
    inputs: [{{name: x, datatype: FP32, shape: [4]}}]
    batching: {{max_batch_size: 8, max_delay_ms: {delay_ms}}}
  - name: high
    backend: {backend}
    artifact: {artifact}
    device: {device}
    options: {options}{high}
    inputs: [{{name: x, datatype: FP32, shape: [4]}}]
    batching: {{max_batch_size: 8, max_delay_ms: {delay_ms}}}
"""
# The torch backend needs the signature of a TorchScript file, which carries none.
TORCH_OPTIONS = (
    "{format: torchscript, inputs: [{name: x, datatype: FP32, shape: [4]}], "
    "outputs: [{name: y, datatype: FP32, shape: [4]}]}"
)


def two_models(
    folder: Path,
    names: dict[str, str],
    scheduler: bool,
    batch_ms: float = BATCH_MS,
    delay_ms: float = 2,
    high_weight: float = 1.0,
    device: str | None = None,
) -> Path:
    """The topology of ``low`` (3 instances) and ``high`` on one device.

    ``names``: its ``input``, ``output``, ``dlq`` and ``group``. With ``scheduler`` the
    device scheduler is on (``concurrency: 1``) and ``high`` has priority 10 (and
    ``high_weight``: a small one leaves priority alone to keep it ahead). ``device``:
    None for the simulated one (a lock held ``batch_ms``), else a real device running
    `busy_model`. Written, with the artifact, into ``folder``.
    """
    if device is None:
        artifact = folder / "device.txt"
        artifact.write_text("one device\n")
        backend, options = "load.timed_backends:OneDeviceBackend", f"{{delay_ms: {batch_ms}}}"
    else:
        artifact = folder / "busy.pt"
        if not artifact.exists():
            busy_model(artifact, device, batch_ms)
        backend, options = "torch", TORCH_OPTIONS
    path = folder / f"two-models-{'scheduled' if scheduler else 'plain'}.yaml"
    high = f"\n    scheduling: {{priority: 10, weight: {high_weight:g}}}" if scheduler else ""
    path.write_text(
        TOPOLOGY.format(
            artifact=artifact,
            backend=backend,
            device=device or "cpu",
            options=options,
            enabled=str(scheduler).lower(),
            delay_ms=delay_ms,
            high=high,
            **names,
        )
    )
    return path


def busy_model(path: Path, device: str, batch_ms: float, batch: int = 8) -> float:
    """Save a TorchScript model that keeps ``device`` busy ~``batch_ms`` per batch.

    ``y = x`` through a chain of ``tanh(h @ W)`` products (W square, fixed), the chain's
    length measured here so that a batch of ``batch`` takes about ``batch_ms`` on
    ``device`` alone. Returns the measured milliseconds of one such batch.
    """
    import torch

    size = 2048 if device.startswith("cuda") else 512

    class Busy(torch.nn.Module):
        def __init__(self, steps: int) -> None:
            super().__init__()
            w = torch.randn(size, size, generator=torch.Generator().manual_seed(7))
            self.w = torch.nn.Parameter(w / size**0.5, requires_grad=False)
            self.steps = steps
            self.spread = size // 4

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x.repeat(1, self.spread)
            for _ in range(self.steps):
                h = torch.tanh(h @ self.w)
            return x + 0.0 * h[:, :4]

    def timed(steps: int) -> float:
        module = torch.jit.script(Busy(steps).to(device).eval())
        x = torch.ones(batch, 4, device=device)
        with torch.inference_mode():
            module(x)
            best = float("inf")
            for _ in range(5):
                if device.startswith("cuda"):
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                module(x)
                if device.startswith("cuda"):
                    torch.cuda.synchronize(device)
                best = min(best, (time.perf_counter() - start) * 1000)
        return best

    probe = 64
    steps = max(1, round(probe * batch_ms / max(timed(probe), 1e-3)))
    scripted: Any = torch.jit.script(Busy(steps).eval())
    scripted.save(str(path))
    return timed(steps)


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
    broker: EmbeddedBroker,
    senders: list[Sender],
    scheduler: bool,
    seconds: float,
    device: str | None = None,
    folder: Path | None = None,
) -> dict[str, float]:
    """The first sender's latency percentiles (ms) and the others' count served.

    ``device``: a real one (`two_models`); ``folder`` keeps its calibrated model between
    runs (a temporary folder per run otherwise).
    """
    tag = f"sched.{os.getpid()}.{time.monotonic_ns()}"
    address = broker.bootstrap_servers
    ensure_topics(AdminClient({"bootstrap.servers": address}), [f"{tag}.in", f"{tag}.out"], 4, 1)
    names = {"input": f"{tag}.in", "output": f"{tag}.out", "dlq": f"{tag}.dlq", "group": tag}
    with tempfile.TemporaryDirectory() as tmp:
        path = two_models(folder or Path(tmp), names, scheduler, device=device)
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


def runs() -> list[tuple[str, list[Sender], bool]]:
    """The four runs: (name, senders, whether the scheduler is on)."""
    high = Sender("high", "high", HIGH_RATE)
    flood = Sender("low", "low", HIGH_RATE * FLOOD)
    urgent = Sender("urgent", "low", HIGH_RATE, priority=9)  # low's model, its own priority
    return [
        ("high alone", [high], False),
        ("10x low flood, no scheduler", [high, flood], False),
        ("10x low flood, scheduler", [high, flood], True),
        ("priority-9 requests to low itself, in its 10x flood, scheduler", [urgent, flood], True),
    ]


def main(argv: list[str] | None = None) -> int:
    """The runs, one after the other; a table of the figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--device", default=None, help="a real device (cpu, cuda:0) and model")
    args = p.parse_args(argv)
    print("| run | watched served | p50 / p99 end to end (ms) | inside (ms) | others served |")
    print("|---|---:|---:|---:|---:|")
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        for name, senders, scheduler in runs():
            f = measure(broker, senders, scheduler, args.seconds, args.device, Path(tmp))
            print(
                f"| {name} | {f['watched']:.0f} | {f['e2e_p50']:.1f} / {f['e2e_p99']:.1f} | "
                f"{f['inside_p50']:.1f} / {f['inside_p99']:.1f} | {f['others']:.0f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
