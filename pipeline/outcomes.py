"""Turning a request's fate into the bytes that go to Kafka: a result or a dead letter.

Every consumed record ends as exactly one `Outcome`; the offset tracker counts a record
done only when its outcome is acknowledged by the broker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.messages import DeadLetter, Envelope, Result, Status, Timings
from schemas.codec import AvroCodec

__all__ = ["Outcome", "OutcomeEncoder"]

Headers = list[tuple[str, str | bytes | None]]


@dataclass(slots=True)
class Outcome:
    """Bytes ready to produce for one consumed record."""

    envelope: Envelope
    topic: str
    value: bytes
    headers: Headers | None = None
    reason: str | None = None  # set for dead letters


class OutcomeEncoder:
    """Encodes results and dead letters for one topology (thread-safe: no shared state)."""

    def __init__(self, codec: AvroCodec, output_topic: str, dead_letter_topic: str) -> None:
        self.codec = codec
        self.output_topic = output_topic
        self.dead_letter_topic = dead_letter_topic

    def result(
        self,
        env: Envelope,
        model: str,
        version: str,
        outputs: dict[str, np.ndarray[Any, Any]],
        timings: Timings,
        batch_size: int,
    ) -> Outcome:
        """A successful result, sent to the request's reply topic or the output topic."""
        request = env.request
        assert request is not None
        timings.end_to_end_ms = time.time() * 1000.0 - env.timestamp_ms
        result = Result(
            id=request.id,
            model=model,
            model_version=version,
            status=Status.OK,
            outputs=outputs,
            timings=timings,
            batch_size=batch_size,
            topic=env.topic,
            partition=env.partition,
            offset=env.offset,
        )
        topic = request.reply_topic or self.output_topic
        return Outcome(env, topic, self.codec.encode_result(result))

    def dead_letter(self, env: Envelope, reason: str, error: str) -> Outcome:
        """A dead letter with the original bytes; the reason also travels in headers."""
        request = env.request
        letter = DeadLetter(
            reason=reason,
            error=error,
            topic=env.topic,
            partition=env.partition,
            offset=env.offset,
            payload=env.value,
            failed_at_ms=int(time.time() * 1000),
            id=None if request is None else request.id,
            model=None if request is None else request.model,
        )
        headers: Headers = [
            ("kp.reason", reason.encode()),
            ("kp.error", error.encode()[:1024]),
            ("kp.source", f"{env.topic}/{env.partition}/{env.offset}".encode()),
        ]
        return Outcome(
            env, self.dead_letter_topic, self.codec.encode_dead_letter(letter), headers, reason
        )
