"""The one exception tree of kp-pipeline.

::

    KpError                      root: catch this to catch anything kp-pipeline raises
    ├── ConfigError              topology.yaml is wrong; names the file and the field path
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
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BrokerError",
    "ConfigError",
    "DecodeError",
    "GraphError",
    "KpError",
    "RequestError",
    "RoutingError",
    "TensorError",
]


class KpError(Exception):
    """Root of every error kp-pipeline raises on purpose."""


class ConfigError(KpError):
    """A topology file is invalid. The message starts with ``file: field.path:``."""


class GraphError(KpError):
    """Stages, declared inputs and the loaded model's signature do not fit together."""


class BackendError(KpError):
    """A backend could not load or run its model."""


class BrokerError(KpError):
    """The embedded broker failed, or the Kafka cluster refused an operation."""


class RequestError(KpError):
    """One request cannot be served. ``reason`` is a short label used as a metric label."""

    reason = "bad_request"


class DecodeError(RequestError):
    """The message's bytes do not decode as a request."""

    reason = "undecodable"


class RoutingError(RequestError):
    """The request names a model or version that this topology does not serve."""

    reason = "unknown_model"


class TensorError(RequestError):
    """A tensor's datatype, shape or byte size does not fit what the model accepts."""

    reason = "bad_tensor"
