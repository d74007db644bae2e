"""Turning a request's fate into the bytes that go to Kafka: a result or a dead letter.

Every consumed record ends as exactly one `Outcome`; the offset tracker counts a record
done only when its outcome is acknowledged by the broker. A request that reached its
model but was not run (its deadline had passed) gets a result too, with status EXPIRED:
the client asked a question and is owed an answer on its reply topic, while a dead letter
is for an operator.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.serving.batch_rows import outcomes as make_outcomes
from pipeline.serving.batch_rows import result_fields
from schemas import oip_json, oip_protobuf
from schemas.codec import AvroCodec
from schemas.errors import RequestIdentity
from schemas.messages import DeadLetter, Envelope, Request, Result, Status, Timings

__all__ = ["Outcome", "OutcomeEncoder"]

Headers = list[tuple[str, str | bytes | None]]

JSON_HEADER = ("content-type", oip_json.CONTENT_TYPE.encode())
"""On every JSON result, so a reader can tell the encodings apart on one topic."""

TRACE_HEADERS = frozenset({"traceparent", "tracestate"})
"""W3C trace context: every outcome carries its request's, so a trace spans the pipeline."""


@dataclass(slots=True)
class Outcome:
    """Bytes ready to produce for one consumed record."""

    envelope: Envelope
    topic: str
    value: bytes
    headers: Headers | None = None
    reason: str | None = None  # set for dead letters
    model: str = ""  # for metrics; "" when the request never reached a model
    status: str = "OK"  # of a result (OK, ERROR, EXPIRED)
    # (batch started, preprocess ms, compute ms, postprocess ms, batch size): for tracing
    phases: tuple[float, float, float, float, int] | None = None
    # The result's outputs, kept only for rows a shadow compares (`OutcomeEncoder.shadows`)
    outputs: dict[str, Any] | None = None


class OutcomeEncoder:
    """Encodes results and dead letters for one topology (thread-safe: no shared state)."""

    def __init__(
        self,
        codec: AvroCodec,
        output_topic: str,
        dead_letter_topic: str,
        reply_topics: bool = True,
        propagate_headers: Iterable[str] = (),
        result_encoding: str = "request",
        tracing: bool = False,
    ) -> None:
        self.codec = codec
        self.output_topic = output_topic
        self.dead_letter_topic = dead_letter_topic
        # A replay writes every result to its own output, never to a live reply topic.
        self.reply_topics = reply_topics
        self._carry = TRACE_HEADERS | {name.lower() for name in propagate_headers}
        # "request": each result in its request's encoding; "avro"/"json": all in that one.
        self.result_encoding = result_encoding
        self.tracing = tracing  # a replica that makes spans: results keep their phase times
        self.shadows = False  # set by the shadow desk: shadowed rows keep their outputs
        self._prefixes = codec.result_prefixes  # registry framing of JSON/protobuf results

    def _encoding(self, env: Envelope) -> str | None:
        """The request's result encoding when not Avro: "json" or "protobuf"."""
        if self.result_encoding == "request":
            return env.encoding
        return None if self.result_encoding == "avro" else self.result_encoding

    def carried(self, headers: list[tuple[str, bytes | None]] | None) -> Headers | None:
        """The request's headers that its outcome carries: trace context and named ones."""
        if not headers:
            return None
        carry = self._carry
        kept: Headers = [(k, v) for k, v in headers if k.lower() in carry]
        return kept or None

    def results(
        self,
        rows: Sequence[Envelope],
        model: str,
        version: str,
        columns: dict[str, Any],
        started: float,
        phase_ms: tuple[float, float, float],
        batch_size: int,
    ) -> list[Outcome]:
        """OK results for every row of a batch, encoded in one codec call (the hot path).

        The rows' fields are read, and their outcomes made, in one pass each
        (`pipeline.serving.batch_rows`, compiled where pip built it). ``started`` is the
        monotonic time the batch left the batcher; ``phase_ms`` are its preprocess,
        compute and postprocess times.
        """
        encoder = self.codec.result_batch(model, version, columns)
        now_ms = time.time() * 1000.0
        pre_ms, compute_ms, post_ms = phase_ms
        fields = result_fields(rows, started, now_ms, pre_ms, compute_ms, post_ms)
        values = encoder.encode_all(
            fields.ids,
            fields.timings,
            batch_size,
            fields.topics,
            fields.partitions,
            fields.offsets,
        )
        outcomes, headed = make_outcomes(
            Outcome, rows, values, self.output_topic, self.reply_topics, model
        )
        for i in headed:
            outcomes[i].headers = self.carried(rows[i].headers)
        if self.tracing:
            phases = (started, pre_ms, compute_ms, post_ms, batch_size)
            for out in outcomes:
                out.phases = phases
        if self.shadows:
            for i, env in enumerate(rows):
                if env.shadow:
                    outcomes[i].outputs = {k: np.asarray(v[i]) for k, v in columns.items()}
        if self.result_encoding not in ("request", "avro") or fields.other_encoding:
            self._re_encode(outcomes, version, columns, started, phase_ms, batch_size, now_ms)
        return outcomes

    def _re_encode(
        self,
        outcomes: list[Outcome],
        version: str,
        columns: dict[str, Any],
        started: float,
        phase_ms: tuple[float, float, float],
        batch_size: int,
        now_ms: float,
    ) -> None:
        """Re-encode the outcomes whose results go out as v2 JSON or protobuf (slower)."""
        pre_ms, compute_ms, post_ms = phase_ms
        for i, out in enumerate(outcomes):
            env = out.envelope
            encoding = self._encoding(env)
            if encoding is None:
                continue
            request = env.request
            assert request is not None
            result = Result(
                id=request.id,
                model=out.model,
                model_version=version,
                status=Status.OK,
                outputs={name: col[i] for name, col in columns.items()},
                timings=Timings(
                    queue_ms=(started - env.consumed_at) * 1000.0,
                    preprocess_ms=pre_ms,
                    compute_ms=compute_ms,
                    postprocess_ms=post_ms,
                    end_to_end_ms=now_ms - env.timestamp_ms,
                ),
                batch_size=batch_size,
                topic=env.topic,
                partition=env.partition,
                offset=env.offset,
            )
            out.value, out.headers = _other_outcome(
                encoding, result, request, out.headers, self._prefixes
            )

    def expired(
        self,
        env: Envelope,
        model: str,
        version: str,
        now_ms: float,
        started: float,
        max_age_ms: float | None = None,
        late_topic: str | None = None,
    ) -> Outcome:
        """An EXPIRED result for a request past its deadline at ``now_ms``.

        The deadline is the request's ``deadline_ms``, or its record's timestamp plus the
        model's ``max_age_ms``, whichever comes first. ``started`` is the monotonic time
        its batch reached preprocessing: the queue time it spent. It carries no outputs
        and a batch size of 0 (no model ran it); the error says which deadline passed and
        by how much. One expired by age goes to ``late_topic`` when the model names one.
        """
        request = env.request
        assert request is not None
        aged = None if max_age_ms is None else env.timestamp_ms + max_age_ms
        by_age = aged is not None and (request.deadline_ms is None or aged < request.deadline_ms)
        if by_age:
            assert aged is not None
            error = (
                f"older than max_age_ms {max_age_ms:g} when its batch formed "
                f"(record timestamp {env.timestamp_ms}, age {now_ms - env.timestamp_ms:.0f} ms)"
            )
        else:
            assert request.deadline_ms is not None
            missed = now_ms - request.deadline_ms
            error = (
                f"deadline passed {missed:.0f} ms before preprocessing "
                f"(deadline_ms {request.deadline_ms})"
            )
        result = Result(
            id=request.id,
            model=model,
            model_version=version,
            status=Status.EXPIRED,
            outputs={},
            timings=Timings(
                queue_ms=max(0.0, (started - env.consumed_at) * 1000.0),
                end_to_end_ms=now_ms - env.timestamp_ms,
            ),
            batch_size=0,
            topic=env.topic,
            partition=env.partition,
            offset=env.offset,
            error=error,
        )
        topic = (self.reply_topics and request.reply_topic) or self.output_topic
        if by_age and late_topic is not None and self.reply_topics:
            topic = late_topic
        headers = self.carried(env.headers)
        encoding = self._encoding(env)
        if encoding is not None:
            value, headers = _other_outcome(encoding, result, request, headers, self._prefixes)
        else:
            value = self.codec.encode_result(result)
        return Outcome(env, topic, value, headers, model=model, status=Status.EXPIRED.value)

    def stand_in(self, out: Outcome, cause: str) -> Outcome | None:
        """The dead letter to send instead of an outcome the broker refused for good.

        A result becomes an ``undeliverable`` dead letter; a dead letter goes again
        without the request's bytes. None when even that is impossible (a dead letter
        already without them): the caller must stop rather than lose the record.
        """
        env = out.envelope
        if out.reason is None:
            error = f"its result cannot be written to {out.topic}: {cause}"
            return self.dead_letter(env, "undeliverable", error)
        if env.value:
            trimmed = dataclasses.replace(env, value=b"")
            error = f"{cause}; the request's bytes were dropped from this dead letter"
            return self.dead_letter(trimmed, out.reason, error, self._whose(out))
        return None

    def _whose(self, letter: Outcome) -> RequestIdentity | None:
        """The request a dead letter named (rare path: read back from its bytes)."""
        dead = self.codec.decode_dead_letter(letter.value)
        if dead.id is None or dead.model is None:
            return None
        return RequestIdentity(dead.id, dead.model, dead.model_version, dead.reply_topic)

    def dead_letter(
        self, env: Envelope, reason: str, error: str, whose: RequestIdentity | None = None
    ) -> Outcome:
        """A dead letter with the original bytes; the reason also travels in headers.

        It names the request (id, model, version, reply topic) whenever those decoded: from
        ``env.request``, or from ``whose`` when the request was refused after its fields
        were read (a tensor that does not fit, an illegal reply topic).
        """
        request = env.request
        if request is not None:
            whose = RequestIdentity(
                request.id, request.model, request.model_version, request.reply_topic
            )
        # Capped, so a dead letter always fits where its request did (a request whose
        # bytes are mostly a 1 MB id would otherwise have a dead letter just as large).
        letter = DeadLetter(
            reason=reason,
            error=_cap(error, MAX_ERROR),
            topic=env.topic,
            partition=env.partition,
            offset=env.offset,
            payload=env.value,
            failed_at_ms=int(time.time() * 1000),
        )
        headers: Headers = [
            ("kp.reason", reason.encode()),
            ("kp.error", error.encode()[:1024]),
            ("kp.source", f"{env.topic}/{env.partition}/{env.offset}".encode()),
        ]
        if whose is not None:
            letter.id = _cap(whose.id, MAX_NAME)
            letter.model = _cap(whose.model, MAX_NAME)
            letter.model_version = whose.model_version and _cap(whose.model_version, MAX_NAME)
            letter.reply_topic = whose.reply_topic and _cap(whose.reply_topic, MAX_NAME)
            headers += [("kp.id", letter.id.encode()), ("kp.model", letter.model.encode())]
        headers += self.carried(env.headers) or ()
        return Outcome(
            env,
            self.dead_letter_topic,
            self.codec.encode_dead_letter(letter),
            headers,
            reason,
            model=letter.model or "",
        )


MAX_NAME = 256
"""Characters of a request's id or model name kept in its dead letter."""
MAX_ERROR = 4096
"""Characters of an error kept in a dead letter."""


def _cap(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _other_outcome(
    encoding: str,
    result: Result,
    request: Request,
    headers: Headers | None,
    prefixes: Mapping[str, bytes],
) -> tuple[bytes, Headers]:
    """A result's bytes and headers in ``encoding`` (json: binary outputs where asked).

    ``prefixes``: the registry's wire-format header per encoding, where one is set. The
    JSON length header then still counts the JSON alone, as the binary-data extension
    defines it; a reader strips the 5-byte header first.
    """
    prefix = prefixes.get(encoding, b"")
    if encoding == "protobuf":
        type_header = ("content-type", oip_protobuf.CONTENT_TYPE.encode())
        return prefix + oip_protobuf.encode_result(result), [*(headers or ()), type_header]
    binary = request.parameters.get("binary_data_output") == "true"
    value, length = oip_json.encode_result(result, binary)
    value = prefix + value
    out = [*(headers or ()), JSON_HEADER]
    if length is not None:
        out.append((oip_json.HEADER_LENGTH, str(length).encode()))
    return value, out
