"""The one exception tree of kp-pipeline.

::

    KpError                      root: catch this to catch anything kp-pipeline raises
    ├── ConfigError              topology.yaml is wrong; names the file and the field path
    │   └── AccessError          the cluster refused our credentials or certificates
    ├── GraphError               stages and model signatures do not fit together
    ├── BackendError             a model could not be loaded or run
    ├── BrokerError              the embedded broker could not be started, or Kafka refused us
    └── RequestError             one request is unusable: it becomes a dead letter, never a crash
        ├── DecodeError          the bytes are not a request
        ├── RoutingError         the request names a model (or version) that is not served
        └── TensorError          a tensor's dtype, shape or size does not fit

`RequestError` is the only one the main loop expects while running: it travels as a value
to the dead-letter topic with ``reason`` (a short, stable word for dashboards) and the
message. Everything else stops the pipeline before (or instead of) consuming.

Every command exits with an `ExitCode`: 0 done, 1 a runtime failure (broker, delivery,
a declined prompt), 2 bad input (``ConfigError`` and ``GraphError``, a bad command line):
refused before anything was consumed or sent. `exit_code` maps an error to its code.

Errors read the same wherever they are shown: `describe` is the one "Type: message" form
(dead letters, logs, ``kp-pipeline backends``), and `format_path` with `error_message`
turn pydantic's validation errors into ``models[0].batching.max_batch_size: unknown key``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

__all__ = [
    "AccessError",
    "BackendError",
    "BrokerError",
    "ConfigError",
    "DecodeError",
    "ExitCode",
    "GraphError",
    "KpError",
    "RequestError",
    "RequestIdentity",
    "RoutingError",
    "TensorError",
    "describe",
    "error_message",
    "exit_code",
    "format_path",
]


class KpError(Exception):
    """Root of every error kp-pipeline raises on purpose."""


class ConfigError(KpError):
    """A topology file is invalid. The message starts with ``file: field.path:``."""


class AccessError(ConfigError):
    """The cluster refused this client: a wrong password, an untrusted certificate.

    A setting to fix, not a failure to retry: refused at start (exit 2).
    """


class GraphError(KpError):
    """Stages, declared inputs and the loaded model's signature do not fit together."""


class BackendError(KpError):
    """A backend could not load or run its model."""


class BrokerError(KpError):
    """The embedded broker failed, or the Kafka cluster refused an operation."""


class RequestError(KpError):
    """One request cannot be served. ``reason`` is a short label used as a metric label.

    ``whose`` is what did decode of the request (its id, model, version and reply topic)
    when the defect was found after its fields were read: the dead letter carries it, so
    the service that sent the request can tell which one failed.
    """

    reason = "bad_request"
    whose: RequestIdentity | None = None


@dataclass(frozen=True, slots=True)
class RequestIdentity:
    """The fields that name a request and where its answer goes, as they were sent."""

    id: str
    model: str
    model_version: str | None = None
    reply_topic: str | None = None


class DecodeError(RequestError):
    """The message's bytes do not decode as a request."""

    reason = "undecodable"


class RoutingError(RequestError):
    """The request names a model or version that this topology does not serve."""

    reason = "unknown_model"


class TensorError(RequestError):
    """A tensor's datatype, shape or byte size does not fit what the model accepts."""

    reason = "bad_tensor"


class ExitCode(IntEnum):
    """What every ``kp-pipeline`` command exits with."""

    OK = 0
    FAILED = 1  # a runtime failure: the broker, a delivery, a declined prompt
    BAD_INPUT = 2  # a bad topology, graph or command line: nothing was consumed or sent


def exit_code(error: KpError) -> ExitCode:
    """The exit code of a command that stopped with ``error``."""
    return ExitCode.BAD_INPUT if isinstance(error, ConfigError | GraphError) else ExitCode.FAILED


def describe(error: BaseException) -> str:
    """An exception as dead letters, logs and retry patterns see it: ``Type: message``."""
    return f"{type(error).__name__}: {error}"


def format_path(loc: tuple[Any, ...]) -> str:
    """``('models', 0, 'batching', 'max_batch_size')`` → ``models[0].batching.max_batch_size``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def error_message(err: Any, unknown: str = "unknown key") -> str:
    """One pydantic error as a user reads it; ``unknown`` names an extra key's kind."""
    if err["type"] == "extra_forbidden":
        return unknown
    if err["type"] == "missing":
        return "required, missing"
    return str(err["msg"]).removeprefix("Value error, ")
