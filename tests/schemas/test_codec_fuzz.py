"""Fuzzing the request decoder: any bytes at all are a `Request` or a `RequestError`.

Plain Avro (the specialised reader, schemas.binary) and the Schema Registry wire format
(fastavro, the writer schema looked up by id in a stub registry) are fed random bytes and
valid requests mutated the ways a broken or hostile producer would: bit flips,
truncations, insertions, deletions, splices of two requests, and forged lengths and counts
that claim gigabytes. Nothing may raise anything else, and decoding may not allocate much
more than the record's own size. What decodes then goes through a real topology's router
and tensor checks, as `Replica._accept` does.

Every test is derandomized (no example database), so a run is the same run every time.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import io
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline.config.loader import parse_topology
from pipeline.serving.graph import build_graph
from pipeline.serving.routing import ModelRoute, Router
from pipeline.tools.traffic import image_request, tensor_request, text_request
from schemas.binary import decode_long, encode_long
from schemas.codec import AvroCodec, load_schema
from schemas.errors import RequestError
from schemas.messages import Request
from schemas.wire import frame

ROOT = Path(__file__).resolve().parents[2]


def fuzz(examples: int) -> settings:
    """Same examples every run, no deadline (pytest-timeout catches a hang)."""
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# -- codecs: plain, and the wire format through a stub registry -------------------------

REQUEST_SCHEMA = load_schema("request")
# A later version of the request schema, as another producer may have registered it: an
# extra field we ignore, and no parameters / deadline / reply topic (ours has defaults).
EVOLVED_SCHEMA: dict[str, Any] = copy.deepcopy(REQUEST_SCHEMA)
EVOLVED_SCHEMA["fields"] = [
    *(f for f in REQUEST_SCHEMA["fields"] if f["name"] in {"id", "model", "inputs"}),
    {"name": "trace", "type": "string"},
]
OURS, EVOLVED, FOREIGN, BROKEN, MISSING = 1, 2, 3, 4, 5


class StubRegistry:
    """Schema id → writer schema; unknown ids raise, as an HTTP 404 would."""

    def __init__(self) -> None:
        self.schemas: dict[int, dict[str, Any]] = {
            OURS: REQUEST_SCHEMA,
            EVOLVED: EVOLVED_SCHEMA,
            FOREIGN: load_schema("result"),  # parses, but does not resolve to a request
            BROKEN: {"type": "record", "name": "Broken", "fields": [{"name": "x"}]},
        }

    def schema_by_id(self, schema_id: int) -> dict[str, Any]:
        return self.schemas[schema_id]


PLAIN = AvroCodec()
REGISTRY = AvroCodec(StubRegistry(), request_schema_id=OURS)


def _evolved(record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(EVOLVED_SCHEMA), record)
    return buf.getvalue()


# -- valid requests, built the way producers build them ------------------------------------


def _bytes_array(items: list[bytes]) -> np.ndarray[Any, Any]:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


def _seed_requests() -> list[Request]:
    rng = np.random.default_rng(0)
    return [
        tensor_request("r-1", "tiny-mlp", {"x": rng.standard_normal(64).astype(np.float32)}),
        text_request("t-1", "minilm-l6", "The quick brown fox jumps over the lazy dog."),
        image_request("i-1", "efficientnet-lite0", b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(40)),
        Request(
            id="full",
            model="tiny-mlp",
            model_version="1",
            inputs={
                "a": np.arange(6, dtype=np.int64).reshape(2, 3),
                "b": np.array([True, False, True, True]),
                "c": np.array(1.5, dtype=np.float16),
                "s": _bytes_array([b"hello", b""]),
            },
            parameters={"k": "v", "trace": "abc"},
            deadline_ms=1_900_000_000_000,
            reply_topic="replies",
        ),
    ]


SEEDS = [PLAIN.encode_request(r) for r in _seed_requests()]
EVOLVED_SEEDS = [
    _evolved({"id": "e-1", "model": "tiny-mlp", "inputs": [], "trace": "t"}),
    _evolved(
        {
            "id": "e-2",
            "model": "tiny-mlp",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [64], "data": bytes(256)}],
            "trace": "",
        }
    ),
]

NUMERIC = [np.bool_, np.uint8, np.int16, np.uint32, np.int64, np.float16, np.float32, np.float64]
shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)
numeric_arrays = st.sampled_from(NUMERIC).flatmap(lambda dt: hnp.arrays(dt, shapes))
bytes_arrays = st.lists(st.binary(max_size=12), max_size=3).map(_bytes_array)
names = st.sampled_from(["x", "text", "image"]) | st.text(max_size=6)
requests = st.builds(
    Request,
    id=st.text(max_size=12),
    model=st.sampled_from(["tiny-mlp", "minilm-l6", "efficientnet-lite0"]) | st.text(max_size=8),
    inputs=st.dictionaries(names, numeric_arrays | bytes_arrays, max_size=3),
    model_version=st.none() | st.sampled_from(["", "1"]) | st.text(max_size=4),
    parameters=st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3),
    deadline_ms=st.none() | st.integers(-(2**63), 2**63 - 1),
    reply_topic=st.none() | st.from_regex(r"\A[A-Za-z0-9._-]{1,12}\Z"),
)
valid_records = st.sampled_from(SEEDS) | requests.map(PLAIN.encode_request)


# -- mutations ------------------------------------------------------------------------------


def varint_spans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of every varint of a well-formed plain request: lengths, counts, longs."""
    spans: list[tuple[int, int]] = []
    pos = 0

    def long() -> int:
        nonlocal pos
        start = pos
        value, pos = decode_long(data, pos)
        spans.append((start, pos))
        return value

    def blob() -> None:
        nonlocal pos
        size = long()  # read first: `pos += long()` would add to the old position
        pos += size

    def array(item: Callable[[], object]) -> None:
        while (count := long()) != 0:
            if count < 0:
                count = -count
                long()  # the block's byte size
            for _ in range(count):
                item()

    def tensor() -> None:
        blob()  # name
        blob()  # datatype
        array(long)  # shape
        blob()  # data

    def pair() -> None:
        blob()
        blob()

    blob()  # id
    blob()  # model
    if long() == 1:  # model_version
        blob()
    array(tensor)
    array(pair)
    if long() == 1:  # deadline_ms
        long()
    if long() == 1:  # reply_topic
        blob()
    assert pos == len(data)
    return spans


HUGE = [2**31 - 1, 2**31, 2**32, 2**40, 2**50, 2**62, 2**63 - 1, -1, -(2**31), -(2**63)]
forged_varints = st.one_of(
    st.sampled_from(HUGE).map(encode_long),
    st.integers(-(2**63), 2**63 - 1).map(encode_long),
    st.sampled_from(
        [
            b"\xff" * 9 + b"\x7f",  # ten bytes, 70 bits: longer than an Avro long
            b"\x80" * 9 + b"\x01",  # 2**63 before zig-zag
            b"\xff" * 12,  # never terminated
            b"\x80\x80\x80\x80\x00",  # zero, padded: valid-looking but non-canonical
        ]
    ),
)


@st.composite
def forged(draw: st.DrawFn, records: st.SearchStrategy[bytes] = valid_records) -> bytes:
    """A valid request with one of its lengths, counts or longs replaced."""
    data = draw(records)
    start, end = draw(st.sampled_from(varint_spans(data)))
    fake = draw(forged_varints)
    if draw(st.booleans()):  # keep what followed, or cut there: the length claims the rest
        return data[:start] + fake + data[end:]
    return data[:start] + fake + data[end : end + draw(st.integers(0, 16))]


@st.composite
def mutated(draw: st.DrawFn, records: st.SearchStrategy[bytes] = valid_records) -> bytes:
    """A valid request, broken by one generic mutation."""
    data = draw(records)
    n = len(data)
    at = draw(st.integers(0, n))
    op = draw(
        st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite", "splice", "repeat"])
    )
    if op == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            if out:
                i = draw(st.integers(0, n - 1))
                out[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(out)
    if op == "truncate":
        return data[:at]
    if op == "insert":
        return data[:at] + draw(st.binary(min_size=1, max_size=32)) + data[at:]
    if op == "delete":
        return data[:at] + data[at + draw(st.integers(1, 32)) :]
    if op == "overwrite":
        noise = draw(st.binary(min_size=1, max_size=32))
        return data[:at] + noise + data[at + len(noise) :]
    if op == "splice":  # the head of one request on the tail of another
        other = draw(records)
        return data[:at] + other[draw(st.integers(0, len(other))) :]
    chunk = data[at : at + draw(st.integers(1, 16))]  # repeat
    return data[:at] + chunk * draw(st.integers(2, 64)) + data[at:]


hostile = st.one_of(st.binary(max_size=512), mutated(), forged())


# -- the contract ---------------------------------------------------------------------------

# Decoding may allocate the record's objects, but never what a forged length claims.
ALLOWANCE = 64 * 1024


def decode(codec: AvroCodec, data: bytes) -> Request | RequestError:
    """The request, or the `RequestError` it became; anything else escapes and fails."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    try:
        out: Request | RequestError = codec.decode_request(data)
    except RequestError as e:
        out = e
    finally:
        peak = tracemalloc.get_traced_memory()[1] - before
        if not was_tracing:
            tracemalloc.stop()
    assert peak <= ALLOWANCE + 16 * len(data), f"{peak} bytes to decode {len(data)}"
    if isinstance(out, RequestError):
        assert out.reason
        assert str(out)
    note("decoded" if isinstance(out, Request) else type(out).__name__)
    return out


def note(outcome: str) -> None:
    """Count an outcome: pytest --hypothesis-show-statistics shows what the fuzzing reached."""
    if currently_in_test_context():
        event(outcome)


def same_request(a: Request, b: Request) -> bool:
    return (
        (a.id, a.model, a.model_version, a.parameters, a.deadline_ms, a.reply_topic)
        == (b.id, b.model, b.model_version, b.parameters, b.deadline_ms, b.reply_topic)
        and a.inputs.keys() == b.inputs.keys()
        and all(
            (x.dtype, x.shape) == (y.dtype, y.shape)
            and (x.tolist() if x.dtype == object else x.tobytes())
            == (y.tolist() if y.dtype == object else y.tobytes())
            for x, y in ((a.inputs[k], b.inputs[k]) for k in a.inputs)
        )
    )


@given(requests)
@fuzz(200)
def test_valid_requests_round_trip_on_both_formats(request: Request) -> None:
    for codec in (PLAIN, REGISTRY):
        decoded = decode(codec, codec.encode_request(request))
        assert isinstance(decoded, Request)
        assert same_request(decoded, request)


@given(st.binary(max_size=2048))
@fuzz(1000)
def test_random_bytes_are_a_request_or_a_request_error(data: bytes) -> None:
    decode(PLAIN, data)
    decode(REGISTRY, data)


@given(mutated())
@fuzz(800)
def test_mutated_requests_are_a_request_or_a_request_error(data: bytes) -> None:
    decode(PLAIN, data)


@given(forged())
@fuzz(800)
def test_forged_lengths_and_counts_allocate_nothing_they_claim(data: bytes) -> None:
    decode(PLAIN, data)


@given(
    st.sampled_from([0, 0, 0, 0, 1, 0x7F, 0xFF]),
    st.sampled_from([OURS, EVOLVED, FOREIGN, BROKEN, MISSING]) | st.integers(0, 2**32 - 1),
    st.one_of(
        hostile,
        st.sampled_from(EVOLVED_SEEDS),
        mutated(st.sampled_from(EVOLVED_SEEDS)),
    ),
)
@fuzz(700)
def test_the_wire_format_is_a_request_or_a_request_error(
    magic: int, schema_id: int, payload: bytes
) -> None:
    decode(REGISTRY, struct.pack(">BI", magic, schema_id) + payload)


@given(hostile)
@fuzz(600)
def test_the_specialised_reader_agrees_with_fastavro(payload: bytes) -> None:
    """Differential: the plain fast path and fastavro (via schema id) on the same payload."""
    plain = decode(PLAIN, payload)
    registry = decode(REGISTRY, frame(OURS, payload))
    if "longer than 64 bits" in str(plain):
        return  # an Avro long is 64 bits: ours refuses more, fastavro wraps them silently
    if "union branch -" in str(plain):
        return  # fastavro takes a negative union index from the list's end; ours refuses it
    if "more than" in str(plain):
        assert isinstance(registry, RequestError)
        return  # ours refuses an over-long array at its count, before reading the rest
    if isinstance(plain, Request) or isinstance(registry, Request):
        assert isinstance(plain, Request), f"plain: {plain}"
        assert isinstance(registry, Request), f"registry: {registry}"
        assert same_request(plain, registry)
    else:
        assert type(plain) is type(registry), f"plain: {plain!r}; registry: {registry!r}"


# -- decode, route, check tensors: what Replica._accept does --------------------------------

TOPOLOGY = """
topics: {input: [in], output: out, dead_letter: dlq}
models:
  - name: tiny-mlp
    version: "1"
    backend: onnxruntime
    artifact: models/tiny_mlp.onnx
    options: {intra_op_threads: 1}
    inputs: [{name: x, datatype: FP32, shape: [64]}]
  - name: minilm-l6
    backend: onnxruntime
    artifact: models/minilm_l6_int8.onnx
    options: {intra_op_threads: 1}
    inputs: [{name: text, datatype: BYTES, shape: [1]}]
    preprocess:
      - {stage: tokenize, input: text, tokenizer: models/minilm_tokenizer.json,
         buckets: [16, 32, 64, 128]}
"""


@functools.cache
def router() -> Router:
    """The runner's router over a real graph (the text model's bucketer tokenizes)."""
    for artifact in ("tiny_mlp.onnx", "minilm_l6_int8.onnx", "minilm_tokenizer.json"):
        if not (ROOT / "models" / artifact).exists():
            pytest.skip(f"models/{artifact} missing: run `make models`")
    graph = build_graph(parse_topology(TOPOLOGY, "fuzz.yaml", {}), "fuzz.yaml", ROOT)
    return Router(
        {m.name: ModelRoute(m.name, m.settings.version, m.inputs, m.bucketer) for m in graph}
    )


def accept(codec: AvroCodec, data: bytes) -> str:
    """``_accept``'s decision for one value: batched, or the dead letter's reason."""
    out = decode(codec, data)
    refused = out if isinstance(out, RequestError) else route(out)
    outcome = "batched" if refused is None else refused.reason
    note(outcome)
    if refused is not None:
        assert str(refused)
    return outcome


def route(request: Request) -> RequestError | None:
    """Route and check the tensors (a text is tokenized for its bucket), as the runner does."""
    try:
        hash(router().route(request).batch_key(request))  # the batcher keys a dict by it
    except RequestError as e:
        return e
    return None


# Requests for the served models, right or nearly right, so that mutations reach the
# version, tensor-name, dtype, shape and text-length checks rather than only the model name.
served = st.one_of(
    st.builds(
        lambda rid, x: tensor_request(rid, "tiny-mlp", {"x": x}),
        st.text(max_size=8),
        hnp.arrays(np.float32, 64) | numeric_arrays,
    ),
    st.builds(
        lambda rid, text: text_request(rid, "minilm-l6", text),
        st.text(max_size=8),
        st.text(max_size=160),
    ),
    requests,
)
versions = st.sampled_from([None, "", "1", "2"])
LONG_TEXT = PLAIN.encode_request(text_request("long", "minilm-l6", "many words " * 80))
routable = st.sampled_from([*SEEDS[:2], LONG_TEXT]) | st.builds(
    lambda r, v: PLAIN.encode_request(dataclasses.replace(r, model_version=v)), served, versions
)


@given(st.one_of(routable, mutated(routable), forged(routable), st.binary(max_size=256)))
@fuzz(600)
def test_decode_route_and_tensor_checks_are_a_batch_or_a_dead_letter(data: bytes) -> None:
    accept(PLAIN, data)
    accept(REGISTRY, frame(OURS, data))


def test_the_seeds_reach_a_batch() -> None:
    """The fuzzers start from requests that get all the way through."""
    assert [accept(PLAIN, s) for s in SEEDS[:2]] == ["batched", "batched"]
    assert [accept(REGISTRY, frame(OURS, s)) for s in SEEDS[:2]] == ["batched", "batched"]


# -- findings -------------------------------------------------------------------------------


def _record(tensors: bytes = b"\x00", pairs: bytes = b"\x00") -> bytes:
    """id "r", model "m", no version, then the given inputs and parameters, then nulls."""
    return b"\x02r\x02m\x00" + tensors + pairs + b"\x00\x00"


def _many_items(kind: str, size: int) -> bytes:
    if kind == "tensors":  # empty name, empty datatype, shape [], empty data: 4 bytes each
        n = size // 4
        return _record(tensors=encode_long(n) + b"\x00\x00\x00\x00" * n + b"\x00")
    if kind == "parameters":  # "" -> "", 2 bytes each
        n = size // 2
        return _record(pairs=encode_long(n) + b"\x00\x00" * n + b"\x00")
    n = size  # dimensions: a one-byte zero each
    tensor = b"\x02x\x08FP32" + encode_long(n) + b"\x00" * n + b"\x00" + b"\x00"
    return _record(tensors=b"\x02" + tensor + b"\x00")


@pytest.mark.parametrize(
    ("codec", "wire", "kind"),
    [
        pytest.param(PLAIN, False, kind, id=f"plain-{kind}")
        for kind in ("tensors", "parameters", "dimensions")
    ]
    + [
        pytest.param(
            REGISTRY,
            True,
            kind,
            id=f"registry-{kind}",
            marks=pytest.mark.xfail(
                strict=True, reason="fastavro builds every item too (the wire format's path)"
            ),
        )
        for kind in ("tensors", "dimensions")
    ],
)
def test_a_record_of_many_tiny_items_allocates_a_few_times_its_size(
    codec: AvroCodec, wire: bool, kind: str
) -> None:
    data = _many_items(kind, 128 * 1024)
    if wire:
        data = frame(OURS, data)
    size = len(data)
    tracemalloc.start()
    try:
        with contextlib.suppress(RequestError):  # parameters decode; the rest are refused
            codec.decode_request(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 4 * size, f"{peak / size:.0f}x the record's {size} bytes"


def test_a_long_wider_than_64_bits_is_refused() -> None:
    data = b"\x02r\x02m\x00\x00\x00" + b"\x02" + b"\xff" * 9 + b"\x7f" + b"\x00"
    out = decode(PLAIN, data)
    assert isinstance(out, RequestError) or -(2**63) <= (out.deadline_ms or 0) < 2**63
