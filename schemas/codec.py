"""Avro encoding of requests, results and dead letters, with fastavro.

Plain Avro (schemaless: the schemas in this folder are the contract) is the default. With
a Schema Registry configured, every value carries the Confluent wire format's 5-byte
header (magic byte 0, 4-byte big-endian schema id); requests may then have been written
with any registered schema that resolves to ours, so the writer schema is looked up by id.

The batch entry points (`AvroCodec.decode_requests`, `ResultBatch.encode_all`) run in the
compiled codec (schemas/_codec_fast.pyx, built by pip with the machine's C compiler)
when it was built, and in the pure-Python reference (schemas.binary) otherwise: `COMPILED`
says which. Both give the same values, requests and errors (tests/schemas/
test_codec_compiled.py). Requests framed for a Schema Registry keep the fastavro path.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import fastavro

from schemas import SCHEMA_DIR
from schemas.binary import MAX_PARAMETERS, MAX_TENSORS, ResultBatchEncoder, read_request
from schemas.errors import DecodeError, RequestError, RequestIdentity, describe
from schemas.messages import DeadLetter, Request, Result, Status, Timings
from schemas.tensors import array_to_bytes, bytes_to_array
from schemas.wire import frame, unframe

try:
    from schemas import _codec_fast
except ImportError:  # not built (no C compiler at install): the pure-Python codec serves
    _codec_fast = None  # type: ignore[assignment]

__all__ = [
    "COMPILED",
    "MAX_TENSORS",
    "AvroCodec",
    "ResultBatch",
    "SchemaLookup",
    "load_schema",
    "request_from_record",
]

COMPILED: bool = _codec_fast is not None
"""Whether the compiled codec was built and is used by the batch entry points."""

# Kafka's rule for topic names; anything else cannot be produced to, so a reply topic
# that breaks it would fail the outcome after the model ran (or the producer call itself).
_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


def load_schema(name: str) -> dict[str, Any]:
    """The parsed JSON of ``schemas/<name>.avsc``."""
    with open(SCHEMA_DIR / f"{name}.avsc", encoding="utf-8") as f:
        schema: dict[str, Any] = json.load(f)
    return schema


class SchemaLookup(Protocol):
    """The part of a Schema Registry client the codec needs."""

    def schema_by_id(self, schema_id: int) -> dict[str, Any]:
        """The writer schema registered under ``schema_id``."""
        ...


class AvroCodec:
    """Encodes and decodes the three message kinds.

    ``registry`` and the ``*_id`` arguments switch on the Schema Registry wire format: the
    ids are the registered ids of our result and dead-letter schemas, written into every
    value we produce. ``compiled=False`` keeps the batch entry points on the pure-Python
    reference even where the compiled codec is built (benchmarks and tests compare both).
    ``result_prefixes``: under the same registry, the wire-format header written before a
    result in another encoding ("json", "protobuf"), by encoding (`pipeline.app`).
    """

    def __init__(
        self,
        registry: SchemaLookup | None = None,
        result_schema_id: int | None = None,
        dead_letter_schema_id: int | None = None,
        request_schema_id: int | None = None,
        *,
        compiled: bool = True,
        result_prefixes: Mapping[str, bytes] | None = None,
    ) -> None:
        self.request_schema = fastavro.parse_schema(load_schema("request"))
        self.result_schema = fastavro.parse_schema(load_schema("result"))
        self.dead_letter_schema = fastavro.parse_schema(load_schema("dead_letter"))
        # Dead letters written before they carried the version and reply topic: their
        # schema, for reading a dead-letter topic that older replicas wrote to.
        self._dead_letter_v1 = fastavro.parse_schema(_without(load_schema("dead_letter"), _DL_V2))
        self._registry = registry
        self._result_id = result_schema_id
        self._dead_letter_id = dead_letter_schema_id
        self._request_id = request_schema_id
        self._writers: dict[int, Any] = {}
        self._compiled = compiled and COMPILED
        self.result_prefixes: Mapping[str, bytes] = dict(result_prefixes or {})

    @property
    def compiled(self) -> bool:
        """Whether this codec uses the compiled codec (built, and not turned off)."""
        return self._compiled

    # -- requests -------------------------------------------------------------------------

    def encode_request(self, request: Request) -> bytes:
        """Avro bytes of a request (producers and tests use this)."""
        record = {
            "id": request.id,
            "model": request.model,
            "model_version": request.model_version,
            "inputs": [_tensor_record(name, arr) for name, arr in request.inputs.items()],
            "parameters": dict(request.parameters),
            "deadline_ms": request.deadline_ms,
            "reply_topic": request.reply_topic,
        }
        payload = self._write(self.request_schema, record)
        return payload if self._request_id is None else frame(self._request_id, payload)

    def decode_request(self, data: bytes) -> Request:
        """Decode and check a request; any defect raises a `RequestError` subclass."""
        return request_from_record(self._read_request(data))

    def decode_requests(self, values: Sequence[bytes]) -> list[Request | RequestError]:
        """Decode a consumed batch in one call (the hot path): one entry per value.

        Entry ``i`` is what `decode_request` returns for ``values[i]``, or the
        `RequestError` it raises: the same request, or the same error with the same
        reason and message. The compiled codec decodes plain Avro and hands any value it
        does not accept to `decode_request`, so errors are the reference's own.
        """
        if self._compiled and self._registry is None:
            out: list[Request | RequestError] = _codec_fast.decode_requests(
                values, self._decode_or_error
            )
            return out
        return [self._decode_or_error(data) for data in values]

    def _decode_or_error(self, data: bytes) -> Request | RequestError:
        """`decode_request`, with its `RequestError` returned instead of raised."""
        try:
            return self.decode_request(data)
        except RequestError as e:
            return e

    def _read_request(self, data: bytes) -> Any:
        try:
            if self._registry is None:
                # Our exact schema: the specialised reader (schemas.binary), ~3x fastavro.
                return read_request(data)
            schema_id, payload = unframe(data)
            writer = self._writer_schema(schema_id)
            buf = io.BytesIO(payload)
            record = fastavro.schemaless_reader(buf, writer, self.request_schema)
        except RequestError:
            raise
        except Exception as e:  # garbage raises many types; all mean "not a request"
            raise DecodeError(f"not an InferenceRequest: {describe(e)}") from None
        if buf.tell() != len(payload):
            raise DecodeError(
                f"not an InferenceRequest: {len(payload) - buf.tell()} bytes after the record"
            )
        return record

    def result_batch(self, model: str, version: str, columns: dict[str, Any]) -> ResultBatch:
        """An encoder for the OK results of one batch (the hot path; see schemas.binary)."""
        cells = _codec_fast.bytes_cells if self._compiled else None
        return ResultBatch(
            ResultBatchEncoder(model, version, columns, cells),
            self._result_id,
            compiled=self._compiled,
        )

    def _writer_schema(self, schema_id: int) -> Any:
        writer = self._writers.get(schema_id)
        if writer is None:
            assert self._registry is not None
            try:
                raw = self._registry.schema_by_id(schema_id)
            except Exception as e:
                raise DecodeError(f"schema id {schema_id} not resolvable: {e}") from None
            writer = fastavro.parse_schema(raw)
            self._writers[schema_id] = writer
        return writer

    # -- results --------------------------------------------------------------------------

    def encode_result(self, result: Result) -> bytes:
        """Avro bytes of any result, through fastavro.

        OK results of a batch take the fast path (`result_batch`); this one serves the
        rare ones that never ran (EXPIRED) and tests.
        """
        record = {
            "id": result.id,
            "model": result.model,
            "model_version": result.model_version,
            "status": result.status.value,
            "outputs": [_tensor_record(name, arr) for name, arr in result.outputs.items()],
            "error": result.error,
            "timings": dataclasses.asdict(result.timings),
            "batch_size": result.batch_size,
            "source": {
                "topic": result.topic,
                "partition": result.partition,
                "offset": result.offset,
            },
        }
        payload = self._write(self.result_schema, record)
        return payload if self._result_id is None else frame(self._result_id, payload)

    def decode_result(self, data: bytes) -> Result:
        """Decode a result (the `results` command and tests use this)."""
        record = self._read(self.result_schema, data)
        outputs = {
            t["name"]: bytes_to_array(t["datatype"], t["shape"], t["data"])
            for t in record["outputs"]
        }
        source = record["source"]
        return Result(
            id=record["id"],
            model=record["model"],
            model_version=record["model_version"],
            status=Status(record["status"]),
            outputs=outputs,
            timings=Timings(**record["timings"]),
            batch_size=record["batch_size"],
            topic=source["topic"],
            partition=source["partition"],
            offset=source["offset"],
            error=record["error"],
        )

    # -- dead letters ---------------------------------------------------------------------

    def encode_dead_letter(self, letter: DeadLetter) -> bytes:
        """Avro bytes of a dead letter."""
        record = {
            "id": letter.id,
            "model": letter.model,
            "reason": letter.reason,
            "error": letter.error,
            "source": {
                "topic": letter.topic,
                "partition": letter.partition,
                "offset": letter.offset,
            },
            "payload": letter.payload,
            "failed_at_ms": letter.failed_at_ms,
            "model_version": letter.model_version,
            "reply_topic": letter.reply_topic,
        }
        payload = self._write(self.dead_letter_schema, record)
        return payload if self._dead_letter_id is None else frame(self._dead_letter_id, payload)

    def decode_dead_letter(self, data: bytes) -> DeadLetter:
        """Decode a dead letter, also one written before the version and reply topic were."""
        try:
            r = self._read(self.dead_letter_schema, data)
        except Exception:
            if self._registry is not None:  # the registry names the writer's own schema
                raise
            r = dict(
                fastavro.schemaless_reader(
                    io.BytesIO(data), self._dead_letter_v1, self.dead_letter_schema
                )  # type: ignore[arg-type]
            )
        src = r["source"]
        return DeadLetter(
            reason=r["reason"],
            error=r["error"],
            topic=src["topic"],
            partition=src["partition"],
            offset=src["offset"],
            payload=r["payload"],
            failed_at_ms=r["failed_at_ms"],
            id=r["id"],
            model=r["model"],
            model_version=r["model_version"],
            reply_topic=r["reply_topic"],
        )

    # -- helpers --------------------------------------------------------------------------

    @staticmethod
    def _write(schema: Any, record: Mapping[str, Any]) -> bytes:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, schema, record)
        return buf.getvalue()

    def _read(self, schema: Any, data: bytes) -> dict[str, Any]:
        if self._registry is not None:
            schema_id, data = unframe(data)
            writer = self._writer_schema(schema_id)
            out: Any = fastavro.schemaless_reader(io.BytesIO(data), writer, schema)
            return dict(out)
        plain: Any = fastavro.schemaless_reader(io.BytesIO(data), schema)
        return dict(plain)


class ResultBatch:
    """Encodes the rows of one batch, framed for the Schema Registry when configured.

    ``compiled`` lets `encode_all` use the compiled codec where it was built.
    """

    def __init__(
        self, encoder: ResultBatchEncoder, schema_id: int | None, *, compiled: bool = True
    ) -> None:
        self._encoder = encoder
        self._schema_id = schema_id
        self._compiled = compiled and COMPILED

    def encode(
        self,
        index: int,
        rid: str,
        timings: tuple[float, float, float, float, float],
        batch_size: int,
        topic: str,
        partition: int,
        offset: int,
    ) -> bytes:
        """Bytes of row ``index``'s result; timings in the schema's field order."""
        payload = self._encoder.encode(index, rid, timings, batch_size, topic, partition, offset)
        return payload if self._schema_id is None else frame(self._schema_id, payload)

    def encode_all(
        self,
        rids: Sequence[str],
        timings: Sequence[tuple[float, float, float, float, float]],
        batch_size: int,
        topics: Sequence[str],
        partitions: Sequence[int],
        offsets: Sequence[int],
    ) -> list[bytes]:
        """Bytes of every row's result in one call (the hot path); row ``i`` as `encode`.

        The compiled codec writes the rows; a row whose arguments it does not take as
        they are (see schemas/_codec_fast.pyx) is written, or refused, by `encode`.
        """
        n = len(rids)
        if self._compiled and n == len(timings) == len(topics) == len(partitions) == len(offsets):
            try:
                header = b"" if self._schema_id is None else frame(self._schema_id, b"")
            except Exception:  # an id the header cannot hold: `encode` raises it per row
                pass
            else:
                head, tensors = self._encoder.parts
                rows: list[bytes] = _codec_fast.encode_results(
                    header,
                    head,
                    tensors,
                    rids,
                    timings,
                    batch_size,
                    topics,
                    partitions,
                    offsets,
                    lambda i: self.encode(
                        i, rids[i], timings[i], batch_size, topics[i], partitions[i], offsets[i]
                    ),
                )
                return rows
        return [
            self.encode(i, rid, t, batch_size, topic, partition, offset)
            for i, (rid, t, topic, partition, offset) in enumerate(
                zip(rids, timings, topics, partitions, offsets, strict=True)
            )
        ]


_DL_V2 = frozenset({"model_version", "reply_topic"})
"""The dead letter's fields added in its second version, at its end."""


def _without(schema: dict[str, Any], names: frozenset[str]) -> dict[str, Any]:
    return {**schema, "fields": [f for f in schema["fields"] if f["name"] not in names]}


def request_from_record(record: dict[str, Any]) -> Request:
    """The `Request` of a decoded request record (Avro's, or another encoding's in its shape).

    Every field is checked; a defect raises its `RequestError`, which says whose request
    it was (the record's id, model, version and reply topic all decoded).
    """
    try:
        return _checked_request(record)
    except RequestError as e:
        e.whose = RequestIdentity(
            record["id"],
            record["model"],
            record["model_version"] or None,
            record["reply_topic"] or None,
        )
        raise


def _checked_request(record: dict[str, Any]) -> Request:
    """The `Request` of a decoded record, each field checked; a defect raises."""
    inputs = record["inputs"]
    if len(inputs) > MAX_TENSORS:
        raise DecodeError(f"request has more than {MAX_TENSORS} tensors")
    if len(record["parameters"]) > MAX_PARAMETERS:
        raise DecodeError(f"request has more than {MAX_PARAMETERS} parameters")
    reply = record["reply_topic"]
    if reply and not _TOPIC.match(reply):  # "" means none, as an absent one does
        raise RequestError(f"reply_topic {reply[:80]!r} is not a legal Kafka topic name")
    arrays = {}
    for t in inputs:
        name = t["name"]
        if name in arrays:
            raise DecodeError(f"input {name!r} appears twice")
        try:
            arrays[name] = bytes_to_array(t["datatype"], t["shape"], t["data"])
        except RequestError as e:
            raise type(e)(f"input {name!r}: {e}") from None
    return Request(
        id=record["id"],
        model=record["model"],
        model_version=record["model_version"],
        inputs=arrays,
        parameters=record["parameters"],
        deadline_ms=record["deadline_ms"],
        reply_topic=record["reply_topic"],
    )


def _tensor_record(name: str, array: Any) -> dict[str, Any]:
    datatype, shape, data = array_to_bytes(array)
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}
