"""The values that flow through the pipeline: a consumed record, its request, its outcome.

`Envelope` is the Kafka side (where a record came from, its raw bytes, its tracker ticket);
`Request` is what the record says. Keeping them apart lets a record that does not decode
still travel to the dead-letter topic with everything needed to find and replay it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, TypeAlias

import numpy as np

__all__ = [
    "SHADOW",
    "SHADOWED",
    "DeadLetter",
    "Envelope",
    "Partition",
    "Request",
    "Result",
    "Status",
    "Timings",
    "partition_of",
]

Partition: TypeAlias = tuple[str, int]
"""A Kafka partition as (topic, number): the key of everything kept per partition."""


class _Placed(Protocol):
    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...


def partition_of(placed: _Placed) -> Partition:
    """The `Partition` of a client's TopicPartition, an `Envelope` or a dead letter."""
    return (placed.topic, placed.partition)


@dataclass(slots=True)
class Request:
    """A decoded inference request; ``inputs`` hold one item each, without a batch dim."""

    id: str
    model: str
    inputs: dict[str, np.ndarray[Any, Any]]
    model_version: str | None = None
    parameters: dict[str, str] = field(default_factory=dict)
    deadline_ms: int | None = None
    reply_topic: str | None = None


@dataclass(slots=True)
class Envelope:
    """One consumed record and what is known about it so far.

    ``generation`` is the offset tracker's assignment epoch for the partition: an outcome
    that arrives after the partition was revoked and re-assigned must not mark offsets of
    the new assignment.
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp_ms: int
    consumed_at: float
    generation: int = 0
    request: Request | None = None
    headers: list[tuple[str, bytes | None]] | None = None  # the record's, when it had any
    encoding: str | None = None  # of the request, when not Avro ("json")
    # 0; SHADOWED: served by its version and also copied to a shadow; SHADOW: that copy,
    # whose outcome is compared, never published (`pipeline.lifecycle.shadow`)
    shadow: int = 0


SHADOWED = 1
SHADOW = 2


class Status(StrEnum):
    """Outcome of a request that reached a model."""

    OK = "OK"
    ERROR = "ERROR"
    EXPIRED = "EXPIRED"


@dataclass(slots=True)
class Timings:
    """Milliseconds spent in each phase, as published in the result."""

    queue_ms: float = 0.0
    preprocess_ms: float = 0.0
    compute_ms: float = 0.0
    postprocess_ms: float = 0.0
    end_to_end_ms: float = 0.0


@dataclass(slots=True)
class Result:
    """One result, published with the request's key."""

    id: str
    model: str
    model_version: str
    status: Status
    outputs: dict[str, np.ndarray[Any, Any]]
    timings: Timings
    batch_size: int
    topic: str
    partition: int
    offset: int
    error: str | None = None


@dataclass(slots=True)
class DeadLetter:
    """A request that cannot be served, with its reason and original bytes."""

    reason: str
    error: str
    topic: str
    partition: int
    offset: int
    payload: bytes
    failed_at_ms: int
    id: str | None = None
    model: str | None = None
    model_version: str | None = None
    reply_topic: str | None = None
