"""kp-pipeline's own CPU per request on the Kafka hot path, with Kafka, codec and model out.

    python -m load.engine_path [--requests 200000]

The tiny scenario's records, built in memory as confluent ``Message`` objects, go
through a `Replica`'s real loop steps: `Consumed.take` (tracking), `Intake.admit_batch`
(routing, batch keys), the micro-batchers, `OutcomeEncoder.results` (the Outcomes),
`AtLeastOnce.publish` and its commit points (``done_many``), accounting and the metrics
flush. What is not kp-pipeline's own is taken out: the Avro codec answers from a table
(the request decoded beforehand; results encoded as empty bytes), the model's outputs
are a fixed array (no preprocessing or inference threads), the producer's ``produce``
does nothing and Kafka is not involved. Prints the process CPU per request of what is
left: the figure the issue's "kp-pipeline's own code ≤ 3 µs" is about.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from confluent_kafka import TIMESTAMP_CREATE_TIME, Message

from load.bench import ROOT, SEED
from pipeline.config.loader import load_topology
from pipeline.engine.collector import serving_collector
from pipeline.engine.loop import Replica
from pipeline.serving.graph import build_graph
from pipeline.tools.traffic import tensor_request
from schemas.codec import AvroCodec, ResultBatch
from schemas.errors import RequestError
from schemas.messages import Envelope, Request

PARTITIONS = 4
CHUNK = 2000  # the tiny topology's consume_batch


class TableCodec(AvroCodec):
    """Decodes from a table of requests decoded beforehand; encodes results as b""."""

    def __init__(self, table: dict[bytes, Request]) -> None:
        super().__init__()
        self.table = table

    def decode_requests(self, values: Sequence[bytes]) -> list[Request | RequestError]:
        """The table's requests (copies: the pipeline sets fields of its own)."""
        table = self.table
        return [table[v] for v in values]

    def result_batch(self, model: str, version: str, columns: dict[str, Any]) -> ResultBatch:
        """A batch encoder that writes nothing."""
        return _NoResults()  # type: ignore[return-value]


class _NoResults:
    def encode_all(self, rids: Sequence[str], *_: Any) -> list[bytes]:
        return [b""] * len(rids)


class NullConsumer:
    """Takes every commit."""

    def commit(self, *_: Any, **__: Any) -> None:
        """Nothing to store."""


class NullProducer:
    """Takes every record, acknowledges at once, reports nothing."""

    def produce(self, *_: Any, **__: Any) -> None:
        """Nothing to send."""

    def poll(self, _: float = 0) -> int:
        """No reports: nothing fails."""
        return 0

    def flush(self, _: float = 0) -> int:
        """Nothing is ever held."""
        return 0

    def __len__(self) -> int:
        return 0


def main(argv: list[str] | None = None) -> int:
    """Serve the records through the loop's steps; print CPU per request."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=200_000)
    args = p.parse_args(argv)
    n = args.requests
    path = ROOT / "load/topologies/tiny-mlp.yaml"
    topology = load_topology(path, env={"KP_BOOTSTRAP": "unused:9092"})
    model = topology.models[0]
    x = np.random.default_rng(SEED).standard_normal((n, 64), dtype=np.float32)
    real = AvroCodec()
    values = [
        real.encode_request(tensor_request(f"tiny-{i:06d}", model.name, {"x": x[i]}))
        for i in range(n)
    ]
    table = {v: real.decode_request(v) for v in values}
    codec = TableCodec(table)
    graph = build_graph(topology, str(path), path.parent)
    replica = Replica(
        topology,
        graph,
        "unused:9092",
        codec=codec,
        consumer=NullConsumer(),  # type: ignore[arg-type]
        producer=NullProducer(),  # type: ignore[arg-type]
    )
    # As with the producer a replica builds itself: failures go to its default callback,
    # so records are produced without one (this one reports nothing anyway).
    replica.delivery.default_reports = True
    topic = topology.topics.input[0]
    outputs: dict[str, Any] = {
        "classes": np.zeros((model.batching.max_batch_size, 3), np.int64),
        "scores": np.zeros((model.batching.max_batch_size, 3), np.float32),
    }

    def run_model(rows: list[Envelope], emit: Any = None, cls: Any = None) -> None:
        """What the runtime hands back for a batch: its results' Outcomes."""
        columns = {k: v[: len(rows)] for k, v in outputs.items()}
        out = replica.encoder.results(
            rows, model.name, model.version, columns, time.monotonic(), (0, 0, 0), len(rows)
        )
        replica._completed.put(out)

    for runtime in replica.runtimes.values():
        runtime.submit = run_model  # type: ignore[method-assign]
    for partition in range(PARTITIONS):
        replica.tracker.assign((topic, partition))
    per = n // PARTITIONS
    msgs = [
        Message(
            topic=topic,
            partition=i // per,
            offset=i % per,
            key=f"tiny-{i:06d}".encode(),
            value=values[i],
            timestamp=(TIMESTAMP_CREATE_TIME, 1_700_000_000_000 + i),
        )
        for i in range(per * PARTITIONS)
    ]
    with serving_collector():  # as `kp-pipeline run` serves
        cpu = _serve(replica, msgs)
    served = replica.stats.results
    assert served == len(msgs), (served, len(msgs))
    assert replica.tracker.in_flight == 0
    print(
        f"kp-pipeline's own hot path (consumed runs, tracking, routing, batching, outcomes, "
        f"publish, commit points, accounting): {cpu / served * 1e6:.2f} µs CPU per request "
        f"({served:,} requests, Kafka, codec and model taken out)"
    )
    return 0


def _serve(replica: Replica, msgs: list[Message]) -> float:
    """The loop's steps over ``msgs``, a consumed batch at a time; CPU seconds taken."""
    cpu0 = time.process_time()
    for start in range(0, len(msgs), CHUNK):
        now = time.monotonic()
        replica._accept(msgs[start : start + CHUNK], now)
        replica._dispatch(now + 1.0)
        replica._publish()
        replica.producer.poll(0)
        replica.delivery.confirm(force=False)
        replica.delivery.commit(force=False)
        replica.accounting.flush(replica.delivery.transactions)  # _observe less lag
    for name, batcher in replica.batchers.items():
        for flushed in batcher.drain():
            replica.submit(name, flushed)
    replica._publish()
    replica.delivery.confirm(force=True)
    replica.accounting.flush(replica.delivery.transactions)
    return time.process_time() - cpu0


if __name__ == "__main__":
    raise SystemExit(main())
