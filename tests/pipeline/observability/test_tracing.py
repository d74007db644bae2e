"""Spans per request: children of the producer's trace, with the batch's phases as children."""

from __future__ import annotations

import builtins
import time
from typing import Any

import numpy as np
import pytest

pytest.importorskip("opentelemetry.sdk", reason="the tracing extra is a dev dependency")
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import StatusCode

from pipeline.config.topology import TracingSettings
from pipeline.observability.tracing import Tracing, make_tracing
from pipeline.serving.outcomes import OutcomeEncoder
from schemas.codec import AvroCodec
from schemas.errors import ConfigError
from schemas.messages import Envelope, Request

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def _setup() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider.get_tracer("test")), exporter


def _env(offset: int, headers: Any = None) -> Envelope:
    env = Envelope("in", 2, offset, None, b"", 0, time.monotonic() - 0.050, headers=headers)
    env.request = Request(f"r{offset}", "m", {"x": np.zeros(2, np.float32)})
    return env


def test_a_request_span_continues_the_producers_trace_with_its_phases() -> None:
    tracing, exporter = _setup()
    encoder = OutcomeEncoder(AvroCodec(), "out", "dlq")
    encoder.tracing = True
    traced = _env(7, [("traceparent", f"00-{TRACE_ID}-{PARENT}-01".encode())])
    plain = _env(8)
    started = time.monotonic() - 0.030
    outcomes = encoder.results(
        [traced, plain], "m", "1", {"y": np.zeros((2, 3), np.float32)}, started, (4.0, 6.0, 2.0), 2
    )
    letter = encoder.dead_letter(_env(9), "bad_tensor", "why")
    tracing.published([*outcomes, letter])
    by_parent: dict[int, list[Any]] = {}
    for s in exporter.get_finished_spans():
        if s.parent is not None:
            by_parent.setdefault(s.parent.span_id, []).append(s)
    requests = [s for s in exporter.get_finished_spans() if s.name.startswith("kp-pipeline")]
    assert len(requests) == 3
    first, second, dead = requests
    assert format(first.context.trace_id, "032x") == TRACE_ID
    assert format(first.parent.span_id, "016x") == PARENT
    assert second.parent is None  # no traceparent: a trace of its own
    assert second.context.trace_id != first.context.trace_id
    assert first.attributes["messaging.kafka.message.offset"] == 7
    assert first.attributes["kp.batch_size"] == 2
    phases = sorted(by_parent[first.context.span_id], key=lambda s: s.start_time)
    assert [p.name for p in phases] == ["queue", "preprocess", "infer", "postprocess", "publish"]
    durations = {p.name: (p.end_time - p.start_time) / 1e6 for p in phases}
    assert durations["preprocess"] == pytest.approx(4.0, abs=0.01)
    assert durations["infer"] == pytest.approx(6.0, abs=0.01)
    assert durations["queue"] == pytest.approx(20.0, abs=5.0)
    assert first.start_time <= phases[0].start_time
    assert phases[-1].end_time == first.end_time
    assert (dead.status.status_code, dead.status.description) == (StatusCode.ERROR, "bad_tensor")
    assert dead.context.span_id not in by_parent  # a dead letter ran no phases


def test_tracing_off_is_nothing_and_a_missing_sdk_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert make_tracing(TracingSettings(), "t.yaml") is None
    console = make_tracing(TracingSettings(enabled=True, exporter="console"), "t.yaml")
    assert isinstance(console, Tracing)
    console.close()
    real = builtins.__import__

    def no_otel(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("opentelemetry"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_otel)
    with pytest.raises(
        ConfigError, match=r"t\.yaml: tracing\.enabled: opentelemetry-sdk is not installed"
    ):
        make_tracing(TracingSettings(enabled=True), "t.yaml")


def test_a_sample_ratio_traces_a_fraction_but_always_a_sampled_parent() -> None:
    """A parent that says "not sampled" is respected by the SDK's parent-based sampler."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider.get_tracer("test"), sample_ratio=0.1)
    encoder = OutcomeEncoder(AvroCodec(), "out", "dlq")
    sampled = _env(1, [("traceparent", f"00-{TRACE_ID}-{PARENT}-01".encode())])
    unsampled = [_env(i) for i in range(2, 2002)]  # no trace context: the ratio decides
    tracing.published([encoder.dead_letter(e, "x", "y") for e in [sampled, *unsampled]])
    offsets = [
        s.attributes["messaging.kafka.message.offset"] for s in exporter.get_finished_spans()
    ]
    assert 1 in offsets
    assert 100 < len(offsets) < 320  # ~10% of 2,000, and the sampled one
