"""In-memory doubles of Kafka for the ``dlq`` tests: a consumer over lists of records,
dead letters, and a topology and command line that use them.

test_reading.py, test_inspect.py and test_redrive.py share them; the real broker is in
tests/e2e/test_dlq_pipe.py.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

from pipeline.cli import main
from pipeline.tools.dlq.reading import Letter
from schemas.codec import AvroCodec
from schemas.messages import DeadLetter

ROOT = Path(__file__).resolve().parents[4]
CODEC = AvroCodec()
T0 = 1_795_132_800_000  # 2026-11-20T00:00Z
DLQ, IN, OUT = "dlq", "in", "out"


# -- doubles ------------------------------------------------------------------------------


class FakeError:
    def __init__(self, code: int, text: str = "") -> None:
        self._code, self._text = code, text

    def code(self) -> int:
        return self._code

    def fatal(self) -> bool:
        return False

    def str(self) -> str:
        return self._text or f"error {self._code}"


class FakeMessage:
    def __init__(
        self,
        topic: str,
        partition: int,
        offset: int,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        error: FakeError | None = None,
    ) -> None:
        self._t, self._p, self._o = topic, partition, offset
        self._v, self._k, self._h, self._e = value, key, headers, error

    def topic(self) -> str:
        return self._t

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def value(self) -> bytes | None:
        return self._v

    def key(self) -> bytes | None:
        return self._k

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self._h

    def error(self) -> FakeError | None:
        return self._e


class FakeConsumer:
    """Topics as {topic: {partition: [records]}}; offsets may have gaps (compaction)."""

    def __init__(self, topics: dict[str, dict[int, list[FakeMessage]]]) -> None:
        self.topics = topics
        self.assigned: list[tuple[str, int, int]] = []
        self._queue: list[FakeMessage] = []
        self.closed = False

    def list_topics(self, topic: str, timeout: float) -> Any:
        parts = self.topics.get(topic)
        info = (
            None if parts is None else SimpleNamespace(partitions=dict.fromkeys(parts), error=None)
        )
        return SimpleNamespace(topics={} if info is None else {topic: info})

    def assign(self, tps: list[TopicPartition]) -> None:
        (tp,) = tps  # the reader reads one partition at a time
        start = 0 if tp.offset == OFFSET_BEGINNING else tp.offset
        self.assigned.append((tp.topic, tp.partition, start))
        records = [m for m in self.topics[tp.topic][tp.partition] if m.offset() >= start]
        self._queue = [
            *records,
            FakeMessage(tp.topic, tp.partition, -1, error=FakeError(KafkaError._PARTITION_EOF)),
        ]

    def consume(self, n: int, timeout: float) -> list[FakeMessage]:
        out, self._queue = self._queue[: min(n, 2)], self._queue[min(n, 2) :]  # small batches
        return out

    def poll(self, timeout: float) -> FakeMessage | None:
        return None

    def close(self) -> None:
        self.closed = True


def letter(
    reason: str = "unknown_model",
    rid: str | None = "r-1",
    model: str | None = "tiny-mlp",
    source: tuple[str, int, int] = (IN, 0, 0),
    payload: bytes = b"request-bytes",
    failed_at_ms: int = T0,
    error: str = "unknown model",
) -> DeadLetter:
    return DeadLetter(reason, error, *source, payload, failed_at_ms, rid, model)


def dlq_record(partition: int, offset: int, d: DeadLetter, headers: Any = None) -> FakeMessage:
    key = None if d.id is None else d.id.encode()
    return FakeMessage(DLQ, partition, offset, CODEC.encode_dead_letter(d), key, headers)


def wrap(
    partition: int, offset: int, d: DeadLetter, headers: dict[str, bytes] | None = None
) -> Letter:
    return Letter(
        partition,
        offset,
        None if d.id is None else d.id.encode(),
        headers or {},
        d,
        size=len(d.payload),
    )


# -- a topology and the command -----------------------------------------------------------


TOPOLOGY = f"""
kafka: {{bootstrap_servers: "broker:9092"}}
topics: {{input: [{IN}], output: {OUT}, dead_letter: {DLQ}}}
models:
  - name: tiny-mlp
    backend: onnxruntime
    artifact: {ROOT}/models/tiny_mlp.onnx
    inputs: [{{name: x, datatype: FP32, shape: [64]}}]
"""


def fake_kafka() -> SimpleNamespace:
    """Three dead letters, two of them unknown_model, and the topics the commands look up."""
    records = {
        0: [
            dlq_record(0, 0, letter("unknown_model", rid="a", source=(IN, 0, 3))),
            dlq_record(0, 1, letter("undecodable", rid=None, model=None, source=(IN, 0, 4))),
        ],
        1: [
            dlq_record(
                1, 0, letter("unknown_model", rid="b", source=(IN, 1, 2), error="line\nbreak")
            )
        ],
    }
    return SimpleNamespace(consumer=FakeConsumer({DLQ: records, IN: {0: [], 1: []}, OUT: {0: []}}))


def run_dlq(tmp_path: Path, *argv: str, text: str = TOPOLOGY) -> int:
    path = tmp_path / "topology.yaml"
    path.write_text(text)
    return main(["dlq", argv[0], str(path), *argv[1:]])
