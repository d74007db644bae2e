"""Intake: every record becomes (model, batch key) with its request, or one dead letter."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import numpy as np

from pipeline.config.topology import SchedulingSettings
from pipeline.serving.intake import Intake
from pipeline.serving.outcomes import Outcome, OutcomeEncoder
from pipeline.serving.scheduler import Classed, RequestClass, RequestClasses
from schemas.codec import AvroCodec
from schemas.messages import Envelope, Request
from schemas.tensors import TensorSpec

CODEC = AvroCodec()


GRAPH = [
    SimpleNamespace(
        name="m",
        settings=SimpleNamespace(name="m", version="3"),
        inputs={"x": TensorSpec("FP32", (4,))},
        bucketer=None,
    )
]


def _intake(encodings: dict[str, str] | None = None) -> Intake:
    return Intake(GRAPH, CODEC, OutcomeEncoder(CODEC, "out", "dlq"), encodings)  # type: ignore[arg-type]


def _env(value: bytes) -> Envelope:
    return Envelope("in", 1, 9, b"k", value, 1_700_000_000_000, 0.0)


def _request(model: str = "m", x: Any = None) -> bytes:
    x = np.zeros(4, np.float32) if x is None else x
    return CODEC.encode_request(Request("r1", model, {"x": x}))


def test_a_servable_request_is_decoded_and_keyed() -> None:
    env = _env(_request())
    assert _intake().admit(env) == ("m", "m")
    assert env.request is not None
    assert env.request.id == "r1"


def test_an_already_decoded_request_is_not_decoded_again() -> None:
    env = _env(b"not avro")
    env.request = Request("r2", "m", {"x": np.ones(4, np.float32)})
    assert _intake().admit(env) == ("m", "m")


def test_what_cannot_be_served_is_one_dead_letter_with_its_reason() -> None:
    cases = {
        "bad_request": (_env(b""), True),  # a tombstone
        "undecodable": (_env(b"\x00\xff junk"), False),
        "unknown_model": (_env(_request(model="other")), False),
        "bad_tensor": (_env(_request(x=np.zeros(5, np.float32))), False),
    }
    for reason, (env, tombstone) in cases.items():
        out = _intake().admit(env, tombstone)
        assert isinstance(out, Outcome), reason
        assert (out.reason, out.topic) == (reason, "dlq")
        letter = CODEC.decode_dead_letter(out.value)
        assert (letter.topic, letter.partition, letter.offset) == ("in", 1, 9)


def test_a_batch_is_admitted_as_each_of_its_records_would_be() -> None:
    """One decode call for the batch; groups keep arrival order; letters keep theirs."""
    values = [
        _request(),
        b"\x00\xff junk",
        _request(model="other"),
        b"",
        _request(x=np.ones(4, np.float32)),
        _request(x=np.zeros(5, np.float32)),
    ]
    tombstones = {3}
    one_by_one = [_intake().admit(_env(v), i in tombstones) for i, v in enumerate(values)]
    rows = [_env(v) for v in values]
    for i, env in enumerate(rows):
        env.offset = i
    groups, letters = _intake().admit_batch(rows, tombstones)
    assert list(groups) == [("m", "m")]
    assert [env.offset for env in groups[("m", "m")]] == [0, 4]
    assert all(env.request is not None for env in groups[("m", "m")])
    expected = [a.reason for a in one_by_one if isinstance(a, Outcome)]
    assert [out.reason for out in letters] == expected
    assert expected == ["undecodable", "unknown_model", "bad_request", "bad_tensor"]
    assert [CODEC.decode_dead_letter(out.value).offset for out in letters] == [1, 2, 3, 5]


def _two_models() -> Intake:
    graph = [
        SimpleNamespace(
            name=name,
            settings=SimpleNamespace(name=name, version="3"),
            inputs={"x": TensorSpec("FP32", (n,))},
            bucketer=None,
        )
        for name, n in (("m", 4), ("k", 2))
    ]
    return Intake(graph, CODEC, OutcomeEncoder(CODEC, "out", "dlq"))  # type: ignore[arg-type]


def test_a_batch_that_all_fits_takes_one_check_and_groups_as_row_by_row() -> None:
    """The usual batch (every row a request of its model's exact signature) is grouped
    by one signature check; the groups are the ones the row-by-row path makes."""

    def k(rid: str) -> bytes:
        return CODEC.encode_request(Request(rid, "k", {"x": np.ones(2, np.float32)}))

    def m(rid: str) -> bytes:
        return CODEC.encode_request(Request(rid, "m", {"x": np.ones(4, np.float32)}))

    values = [m("a"), k("b"), m("c"), k("d")]
    rows = [_env(v) for v in values]
    groups, letters = _two_models().admit_batch(rows)
    assert letters == []
    assert groups == {("m", "m"): [rows[0], rows[2]], ("k", "k"): [rows[1], rows[3]]}
    assert all(env.request is not None for env in rows)
    # The same rows with one that does not fit: the row-by-row path, the same groups.
    bad = _env(_request(x=np.zeros(5, np.float32)))
    again = [_env(v) for v in values]
    groups2, letters2 = _two_models().admit_batch([*again, bad])
    assert [o.reason for o in letters2] == ["bad_tensor"]

    def ids(groups: dict[Any, list[Envelope]]) -> dict[Any, list[str]]:
        return {k: [e.request.id for e in v] for k, v in groups.items()}  # type: ignore[union-attr]

    assert ids(groups2) == ids(groups)


def test_one_model_batch_that_fits_is_one_group_in_arrival_order() -> None:
    rows = [_env(_request(x=np.full(4, i, np.float32))) for i in range(5)]
    groups, letters = _intake().admit_batch(rows)
    assert letters == []
    assert list(groups) == [("m", "m")]
    assert groups[("m", "m")] == rows
    assert [float(e.request.inputs["x"][0]) for e in rows] == [0, 1, 2, 3, 4]  # type: ignore[union-attr]


def test_a_batch_that_all_fits_never_routes_row_by_row(monkeypatch: Any) -> None:
    """The one-call check is what groups such a batch: keying row by row is not reached
    (it is for a batch with one row that does not fit)."""
    from pipeline.serving.routing import ModelRoute

    calls: list[str] = []
    real = ModelRoute.batch_key

    def counting(self: ModelRoute, request: Request) -> Any:
        calls.append(request.id)
        return real(self, request)

    monkeypatch.setattr(ModelRoute, "batch_key", counting)
    intake = _intake()
    groups, _ = intake.admit_batch([_env(_request()) for _ in range(3)])
    assert sum(map(len, groups.values())) == 3
    assert calls == []
    intake.admit_batch([_env(_request()), _env(_request(x=np.zeros(5, np.float32)))])
    assert len(calls) == 2


def _json_env(body: dict[str, Any], headers: list[tuple[str, bytes | None]] | None) -> Envelope:
    env = _env(json.dumps(body).encode())
    env.headers = headers
    return env


def test_a_record_s_content_type_or_its_topic_picks_its_encoding() -> None:
    body = {
        "id": "j1",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [4], "data": [1, 2, 3, 4]}],
    }
    by_header = _json_env(body, [("Content-Type", b"application/json; charset=utf-8")])
    by_topic = _json_env(body, None)
    avro_here = _env(_request())
    avro_here.headers = [("content-type", b"application/avro")]
    groups, letters = _intake({"in": "json"}).admit_batch([by_header, by_topic, avro_here])
    assert letters == []
    assert [len(g) for g in groups.values()] == [3]
    assert [(e.encoding, e.request.id) for e in (by_header, by_topic, avro_here)] == [  # type: ignore[union-attr]
        ("json", "j1"),
        ("json", "j1"),
        (None, "r1"),
    ]
    np.testing.assert_array_equal(by_topic.request.inputs["x"], [1, 2, 3, 4])  # type: ignore[union-attr]


def test_an_unknown_content_type_or_a_bad_json_body_is_a_dead_letter_naming_it() -> None:
    odd = _env(_request())
    odd.headers = [("content-type", b"text/csv")]
    short = _json_env(
        {
            "id": "j2",
            "model_name": "m",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [4], "data": [1]}],
        },
        [("content-type", b"application/json")],
    )
    fine = _env(_request())
    groups, letters = _intake().admit_batch([odd, short, fine])
    assert [len(g) for g in groups.values()] == [1]
    dead = [CODEC.decode_dead_letter(o.value) for o in letters]
    assert [(d.reason, d.id) for d in dead] == [("undecodable", None), ("bad_tensor", "j2")]
    assert "content-type 'text/csv'" in dead[0].error
    assert "shape [4] holds 4 elements, data has 1" in dead[1].error


def test_a_protobuf_content_type_reads_a_model_infer_request() -> None:
    from schemas import oip_protobuf

    message = oip_protobuf.messages["ModelInferRequest"](id="p1")  # no model: the only one
    t = message.inputs.add(name="x", datatype="FP32")
    t.shape.append(4)
    t.contents.fp32_contents.extend([1, 2, 3, 4])
    env = _env(message.SerializeToString())
    env.headers = [("content-type", b"application/protobuf")]
    groups, letters = _intake().admit_batch([env])
    assert (letters, list(groups)) == ([], [("m", "m")])
    assert (env.encoding, env.request.id, env.request.model) == ("protobuf", "p1", "m")  # type: ignore[union-attr]


def test_values_framed_by_confluents_json_schema_and_protobuf_serializers_are_read() -> None:
    from schemas import oip_protobuf
    from schemas.wire import frame

    body = {
        "id": "j",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [4], "data": [1, 2, 3, 4]}],
    }
    framed_json = _json_env({}, [("content-type", b"application/json")])
    framed_json.value = frame(21, json.dumps(body).encode())
    message = oip_protobuf.messages["ModelInferRequest"](id="p")
    t = message.inputs.add(name="x", datatype="FP32")
    t.shape.append(4)
    t.contents.fp32_contents.extend([1, 2, 3, 4])
    framed_pb = _env(frame(22, b"\x02\x04" + message.SerializeToString()))  # message index [2]
    framed_pb.headers = [("content-type", b"application/x-protobuf")]
    _, letters = _intake().admit_batch([framed_json, framed_pb])
    assert letters == []
    assert [e.request.id for e in (framed_json, framed_pb)] == ["j", "p"]  # type: ignore[union-attr]


def test_with_the_scheduler_a_requests_class_joins_its_batch_key() -> None:
    """Requests of different priorities or tenants never share a batch; bad ones are letters."""
    settings = SchedulingSettings(enabled=True, fair_share="tenant")
    intake = Intake(
        GRAPH,  # type: ignore[arg-type]
        CODEC,
        OutcomeEncoder(CODEC, "out", "dlq"),
        None,
        RequestClasses(settings),
    )

    def encoded(rid: str, **parameters: str) -> Envelope:
        request = Request(rid, "m", {"x": np.zeros(4, np.float32)}, parameters=parameters)
        return _env(CODEC.encode_request(request))

    plain, urgent, gold = encoded("a"), encoded("b", priority="9"), encoded("c", tenant="gold")
    bad = encoded("d", priority="urgent")
    groups, letters = intake.admit_batch([plain, urgent, gold, bad])
    assert groups == {
        ("m", "m"): [plain],
        ("m", Classed("m", RequestClass(9, None))): [urgent],
        ("m", Classed("m", RequestClass(None, "gold"))): [gold],
    }
    assert [(o.reason, o.envelope) for o in letters] == [("bad_request", bad)]
    # without the scheduler the same batch is one group: parameters mean nothing
    groups, letters = _intake().admit_batch([encoded("a"), encoded("b", priority="9")])
    assert list(groups) == [("m", "m")]
    assert not letters


def test_versions_of_one_model_are_grouped_apart_by_the_version_each_request_meets() -> None:
    from pipeline.config.versions import VersionTraffic
    from pipeline.serving.versions import split_point

    intake = _versioned({"m": VersionTraffic(default="1", canary={"2": 0.5})})

    def row(rid: str, key: bytes, version: str | None = None) -> Envelope:
        request = Request(rid, "m", {"x": np.ones(4, np.float32)}, model_version=version)
        return Envelope("in", 0, 0, key, CODEC.encode_request(request), 0, 0.0)

    keys = [b"a", b"b", b"c", b"d", b"e", b"f"]
    canary = {k for k in keys if split_point("m", k) < 0.5}
    assert canary
    assert canary != set(keys)
    rows = [row(f"r{i}", k) for i, k in enumerate(keys)] + [row("asked", b"a", "2")]
    groups, letters = intake.admit_batch(rows)
    assert letters == []
    met = {env.request.id: key[0] for key, group in groups.items() for env in group}  # type: ignore[union-attr]
    expected = {f"r{i}": "m@2" if k in canary else "m@1" for i, k in enumerate(keys)}
    assert met == {**expected, "asked": "m@2"}
    unknown = intake.admit_batch([row("x", b"a", "9")])[1]
    assert [o.reason for o in unknown] == ["unknown_model"]


def test_a_request_meeting_the_default_is_copied_to_the_shadow_while_the_gate_allows() -> None:
    from pipeline.config.versions import ShadowSettings, VersionTraffic
    from schemas.messages import SHADOW, SHADOWED

    intake = _versioned({"m": VersionTraffic(default="1", shadow=ShadowSettings(version="2"))})
    allowed = [True, False]
    intake.shadow_gate = lambda key: allowed.pop(0)

    def row(rid: str, version: str | None = None) -> Envelope:
        request = Request(rid, "m", {"x": np.ones(4, np.float32)}, model_version=version)
        return Envelope("in", 0, 7, b"k", CODEC.encode_request(request), 0, 0.0)

    rows = [row("a"), row("b"), row("asked", "1")]
    groups, _ = intake.admit_batch(rows)
    live = groups[("m@1", "m")]
    copies = groups[("m@2", "m")]
    assert [e.request.id for e in live] == ["a", "b", "asked"]  # type: ignore[union-attr]
    assert [(e.request.id, e.shadow) for e in copies] == [("a", SHADOW)]  # type: ignore[union-attr]
    assert [e.shadow for e in live] == [SHADOWED, 0, 0]  # b: gate closed; asked: named v1
    assert copies[0].request is live[0].request


def _versioned(versions: dict[str, Any]) -> Intake:
    """An intake of model ``m`` in versions 1 and 2, split as ``versions`` says."""
    graph = [
        SimpleNamespace(
            name=f"m@{v}",
            settings=SimpleNamespace(name="m", version=v),
            inputs={"x": TensorSpec("FP32", (4,))},
            bucketer=None,
        )
        for v in ("1", "2")
    ]
    return Intake(graph, CODEC, OutcomeEncoder(CODEC, "out", "dlq"), versions=versions)  # type: ignore[arg-type]
