"""Triton's own generated v2 protobuf messages (``tritonclient.grpc.service_pb2``), for tests.

`tritonclient.grpc`'s package imports grpcio, which this project does not install (its
gRPC extra would also pin protobuf below the version onnx and TensorFlow bring). The
generated module itself needs only protobuf: it is loaded from the installed
``tritonclient`` wheel without running that package's ``__init__``.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any


def service_pb2() -> Any:
    """The module, or None where tritonclient is not installed."""
    try:
        import tritonclient
    except ImportError:
        return None
    name = "tritonclient.grpc"
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [str(Path(tritonclient.__file__).parent / "grpc")]
        sys.modules[name] = package
    from tritonclient.grpc import service_pb2 as pb  # type: ignore[attr-defined]

    return pb
