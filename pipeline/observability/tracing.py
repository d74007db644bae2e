"""OpenTelemetry spans per request, made when its outcome is handed to the producer.

A request's span (``kp-pipeline <model>``) runs from its consumption to that hand-off; it
is a child of the trace its ``traceparent``/``tracestate`` headers name (the producer's
span), or a new trace when they name none. Its children are the phases its batch went
through, with the batch's own times: ``queue`` (consumed → the batch left the batcher),
``preprocess``, ``infer``, ``postprocess``, and ``publish`` (→ the hand-off). A dead
letter's span has no phases and an error status with the reason. Attributes follow
OpenTelemetry's messaging conventions for Kafka (topic, partition, offset) plus the
model, status and batch size.

Spans are made on the serving loop in one call per published batch, only when
``tracing.enabled``; otherwise the loop holds no `Tracing` and pays one ``is None``.
Enabled, each traced request costs ~100 µs of that loop with OpenTelemetry's Python SDK
(6 spans, measured here): ``tracing.sample_ratio`` traces a fraction of the requests,
and a request whose ``traceparent`` says sampled is always traced.
Timestamps come from the monotonic clock the engine uses, mapped to wall time once per
call. `opentelemetry-sdk` (and the OTLP exporter) are optional: ``pip install
'kp-pipeline[tracing]'``; asking for tracing without them is refused at start.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any

from pipeline.config.topology import TracingSettings
from pipeline.serving.outcomes import Outcome
from schemas.errors import ConfigError

__all__ = ["Tracing", "make_tracing"]


class Tracing:
    """Makes the spans of published outcomes with one tracer."""

    def __init__(self, tracer: Any, provider: Any | None = None, sample_ratio: float = 1.0) -> None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._tracer = tracer
        self._ratio = sample_ratio
        self._random = random.Random()
        self._provider = provider  # ours to flush and shut down; None for the global one
        self._propagator = TraceContextTextMapPropagator()

    def published(self, outcomes: Sequence[Outcome]) -> None:
        """One span (and its phases) per outcome just handed to the producer."""
        from opentelemetry.trace import SpanKind, Status, StatusCode

        now_ns = time.time_ns()
        mono = time.monotonic()

        def wall(at: float) -> int:  # a monotonic instant as epoch nanoseconds
            return now_ns - int((mono - at) * 1e9)

        ratio, draw = self._ratio, self._random.random
        for out in outcomes:
            env = out.envelope
            carrier = {k.lower(): v.decode("latin-1") for k, v in env.headers or () if v}
            sampled = carrier.get("traceparent", "").endswith("-01")
            if ratio < 1.0 and not sampled and draw() >= ratio:
                continue
            parent = self._propagator.extract(carrier) if carrier else None
            attributes = {
                "messaging.system": "kafka",
                "messaging.destination.name": env.topic,
                "messaging.destination.partition.id": str(env.partition),
                "messaging.kafka.message.offset": env.offset,
                "kp.model": out.model,
                "kp.outcome": out.reason or out.status,
            }
            span = self._tracer.start_span(
                f"kp-pipeline {out.model or 'request'}",
                context=parent,
                kind=SpanKind.CONSUMER,
                attributes=attributes,
                start_time=wall(env.consumed_at),
            )
            if out.reason is not None:
                span.set_status(Status(StatusCode.ERROR, out.reason))
            phases = out.phases
            if phases is not None:
                started, pre_ms, compute_ms, post_ms, batch_size = phases
                span.set_attribute("kp.batch_size", batch_size)
                times = (wall(env.consumed_at), wall(started), pre_ms, compute_ms, post_ms)
                self._phases(span, times, now_ns)
            span.end(end_time=now_ns)

    def _phases(self, span: Any, times: tuple[int, int, float, float, float], now: int) -> None:
        from opentelemetry import trace

        consumed, at, pre_ms, compute_ms, post_ms = times
        context = trace.set_span_in_context(span)
        marks = [("queue", consumed, at)]
        for name, ms in (("preprocess", pre_ms), ("infer", compute_ms), ("postprocess", post_ms)):
            end = at + int(ms * 1e6)
            marks.append((name, at, end))
            at = end
        marks.append(("publish", min(at, now), now))
        for name, start, end in marks:
            child = self._tracer.start_span(name, context=context, start_time=start)
            child.end(end_time=max(end, start))

    def close(self) -> None:
        """Export what is buffered (the SDK's batch processor) and stop our provider."""
        if self._provider is not None:
            self._provider.force_flush()
            self._provider.shutdown()


def make_tracing(settings: TracingSettings, source: str) -> Tracing | None:
    """The `Tracing` a topology asks for, or None when it does not; refuses what cannot run."""
    if not settings.enabled:
        return None
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SpanExporter,
        )
    except ImportError:
        raise ConfigError(
            f"{source}: tracing.enabled: opentelemetry-sdk is not installed "
            "(pip install 'kp-pipeline[tracing]')"
        ) from None
    if settings.exporter == "global":
        return Tracing(trace.get_tracer("kp-pipeline"), sample_ratio=settings.sample_ratio)
    exporter: SpanExporter
    if settings.exporter == "console":
        exporter = ConsoleSpanExporter()
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise ConfigError(
                f"{source}: tracing.exporter: otlp needs opentelemetry-exporter-otlp-proto-http "
                "(pip install 'kp-pipeline[tracing]')"
            ) from None
        exporter = (
            OTLPSpanExporter(endpoint=settings.endpoint)
            if settings.endpoint
            else (OTLPSpanExporter())
        )
    provider = TracerProvider(resource=Resource.create({"service.name": settings.service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracing(provider.get_tracer("kp-pipeline"), provider, settings.sample_ratio)
