"""The Open Inference Protocol's JSON and protobuf bodies on the real broker, with clients no
one here wrote.

Requests are built by Triton's own client (`tritonclient.http.InferenceServerClient.
generate_request_body`, JSON and binary-data bodies) and produced with aiokafka onto a
topic the topology declares ``json``; the pipeline serves them beside Avro requests on
the same topic (their ``content-type`` header says so), and each result comes back in its
request's encoding: the JSON ones are parsed by Triton's client again and must carry the
same numbers as the Avro twin of the same input. Malformed JSON, a tensor whose data
disagrees with its shape, and an unknown content type are dead letters naming the field.
The protobuf test does the same with ModelInferRequests serialized by Triton's generated
classes (typed contents and raw_input_contents), answered as ModelInferResponses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from e2e.kit import Topics, produce_aiokafka, read_all, start_background
from e2e.registry import registry_stub
from triton_pb import service_pb2

from pipeline.app import make_codec, open_topology
from pipeline.kafka.broker import EmbeddedBroker
from schemas import oip_protobuf
from schemas.answers import read_result
from schemas.codec import AvroCodec, load_schema
from schemas.messages import Request
from schemas.registry import SchemaRegistryClient
from schemas.wire import protobuf_header, unframe, unframe_protobuf

http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is a dev dependency")
N = 40  # JSON requests, half of them binary; as many Avro twins


def _triton_body(rid: str, x: np.ndarray[Any, Any], binary: bool) -> tuple[bytes, int | None]:
    t = http.InferInput("x", [64], "FP32")
    t.set_data_from_numpy(x, binary_data=binary)
    body, length = http.InferenceServerClient.generate_request_body(
        [t], request_id=rid, parameters={"tenant": "t1"} if binary else None
    )
    return body, length


def test_triton_json_requests_are_served_beside_avro_and_answered_in_json(
    broker: EmbeddedBroker, topics: Topics, tiny_topology: Path
) -> None:
    text = tiny_topology.read_text().replace(
        "create: false", f"create: false, encoding: {{{topics.input}: json}}"
    )
    tiny_topology.write_text(text)
    rng = np.random.default_rng(5)
    xs = {f"j{i}": rng.standard_normal(64).astype(np.float32) for i in range(N)}
    codec = AvroCodec()
    records: list[tuple[bytes, list[Any]]] = []
    for i, (rid, x) in enumerate(xs.items()):
        body, length = _triton_body(rid, x, binary=i % 2 == 1)
        headers = [("kp.model", b"tiny-mlp")]
        if length is not None:
            headers.append(("Inference-Header-Content-Length", str(length).encode()))
        records.append((body, headers))
        twin = codec.encode_request(Request(f"a{i}", "tiny-mlp", {"x": x}))
        records.append((twin, [("content-type", b"application/avro")]))
    bad = {
        b"{not json": [],
        b'{"model_name": "tiny-mlp", "inputs": [{"name": "x", "datatype": "FP32", '
        b'"shape": [64], "data": [1.0, 2.0]}]}': [],
        b"anything": [("content-type", b"text/plain")],
    }
    records += list(bad.items())
    produce_aiokafka(broker.bootstrap_servers, topics.input, records)

    served = start_background(tiny_topology, broker)
    try:
        out = read_all(broker, topics.output, 2 * N)
        dlq = read_all(broker, topics.dead_letter, len(bad))
    finally:
        stats = served.stop()
    assert stats.results == 2 * N

    avro: dict[str, Any] = {}
    parsed: dict[str, Any] = {}
    for m in out:
        headers = {k.lower(): v for k, v in m.headers() or []}
        if headers.get("content-type") == b"application/json":
            length = headers.get("inference-header-content-length")
            result = http.InferenceServerClient.parse_response_body(
                m.value(), header_length=None if length is None else int(length)
            )
            parsed[result.get_response()["id"]] = result
        else:
            r = codec.decode_result(m.value())
            avro[r.id] = r
    assert set(parsed) == set(xs)
    assert len(avro) == N
    for i, rid in enumerate(xs):
        twin = avro[f"a{i}"].outputs
        got = parsed[rid]
        response = got.get_response()
        assert response["model_name"] == "tiny-mlp"
        assert response["parameters"]["status"] == "OK"
        for name in twin:
            np.testing.assert_array_equal(
                np.asarray(got.as_numpy(name)).astype(twin[name].dtype), twin[name]
            )
    letters = sorted(
        (d.reason, d.error) for d in (codec.decode_dead_letter(m.value()) for m in dlq)
    )
    assert [reason for reason, _ in letters] == ["bad_tensor", "undecodable", "undecodable"]
    errors = " | ".join(e for _, e in letters)
    assert "input 'x': shape [64] holds 64 elements, data has 2" in errors
    assert "not a JSON inference request" in errors
    assert "content-type 'text/plain'" in errors


def test_triton_protobuf_requests_are_served_and_answered_in_protobuf(
    broker: EmbeddedBroker, topics: Topics, tiny_topology: Path
) -> None:
    """ModelInferRequests serialized by Triton's generated classes, as Seldon writes them."""
    pb = service_pb2()
    if pb is None:
        pytest.skip("tritonclient is a dev dependency")
    text = tiny_topology.read_text().replace(
        "create: false", f"create: false, encoding: {{{topics.input}: protobuf}}"
    )
    tiny_topology.write_text(text)
    rng = np.random.default_rng(6)
    xs = {f"p{i}": rng.standard_normal(64).astype(np.float32) for i in range(N)}
    codec = AvroCodec()
    records: list[tuple[bytes, list[Any]]] = []
    for i, (rid, x) in enumerate(xs.items()):
        request = pb.ModelInferRequest(model_name="tiny-mlp", id=rid)
        t = request.inputs.add(name="x", datatype="FP32")
        t.shape.append(64)
        if i % 2:
            request.raw_input_contents.append(x.tobytes())
        else:
            t.contents.fp32_contents.extend(x.tolist())
        records.append((request.SerializeToString(), []))
        twin = codec.encode_request(Request(f"a{i}", "tiny-mlp", {"x": x}))
        records.append((twin, [("content-type", b"application/avro")]))
    records.append((b"\xff\xff not protobuf", []))
    produce_aiokafka(broker.bootstrap_servers, topics.input, records)

    served = start_background(tiny_topology, broker)
    try:
        out = read_all(broker, topics.output, 2 * N)
        [dead] = read_all(broker, topics.dead_letter, 1)
    finally:
        served.stop()
    avro: dict[str, Any] = {}
    answers: dict[str, Any] = {}
    for m in out:
        if dict(m.headers() or []).get("content-type") == b"application/x-protobuf":
            response = pb.ModelInferResponse()
            response.ParseFromString(m.value())
            answers[response.id] = response
        else:
            r = codec.decode_result(m.value())
            avro[r.id] = r
    assert set(answers) == set(xs)
    for i, rid in enumerate(xs):
        twin = avro[f"a{i}"].outputs
        response = answers[rid]
        assert response.parameters["status"].string_param == "OK"
        for k, tensor in enumerate(response.outputs):
            want = twin[tensor.name]
            assert list(tensor.shape) == list(want.shape)
            if tensor.datatype != "BYTES":
                got = np.frombuffer(response.raw_output_contents[k], want.dtype.newbyteorder("<"))
                np.testing.assert_array_equal(got, want.reshape(-1))
    letter = codec.decode_dead_letter(dead.value())
    assert letter.reason == "undecodable"
    assert letter.error.startswith("not a ModelInferRequest")


def test_under_a_registry_each_encodings_results_are_framed_with_its_registered_schema(
    broker: EmbeddedBroker, topics: Topics, tiny_topology: Path
) -> None:
    """Avro, JSON Schema and Protobuf wire formats on one topic, one subject per type."""
    pb = service_pb2()
    if pb is None:
        pytest.skip("tritonclient is a dev dependency")
    x = np.random.default_rng(8).standard_normal(64).astype(np.float32)
    with registry_stub() as registry:
        tiny_topology.write_text(
            tiny_topology.read_text().replace(
                "bootstrap_servers: embedded,",
                f"bootstrap_servers: embedded, schema_registry: {{url: '{registry.url}'}},",
            )
        )
        client = SchemaRegistryClient(registry.url)
        avro = AvroCodec(
            client,
            request_schema_id=client.register(f"{topics.input}-value", load_schema("request")),
        )
        body, _ = _triton_body("as-json", x, binary=False)
        request = pb.ModelInferRequest(model_name="tiny-mlp", id="as-protobuf")
        t = request.inputs.add(name="x", datatype="FP32")
        t.shape.append(64)
        request.raw_input_contents.append(x.tobytes())
        # As Confluent's Protobuf serializer frames it (the id is the producer's schema).
        framed = protobuf_header(99, [2]) + request.SerializeToString()
        records = [
            (body, [("content-type", b"application/json"), ("kp.model", b"tiny-mlp")]),
            (framed, [("content-type", b"application/x-protobuf")]),
            (avro.encode_request(Request("as-avro", "tiny-mlp", {"x": x})), []),
        ]
        produce_aiokafka(broker.bootstrap_servers, topics.input, records)
        served = start_background(tiny_topology, broker)
        try:
            out = read_all(broker, topics.output, 3)
        finally:
            served.stop()

        out_topic = topics.output
        assert registry.subjects() == {
            f"{topics.input}-value": "AVRO",
            f"{out_topic}-value": "AVRO",
            f"{out_topic}-kp.oip.v2.InferResponse": "JSON",
            f"{out_topic}-inference.ModelInferResponse": "PROTOBUF",
            f"{topics.dead_letter}-value": "AVRO",
        }
        by_type = {r.schema_type: (i, r.schema) for i, r in registry.by_id.items()}
        results = {}
        for m in out:
            value, headers = m.value(), m.headers()
            assert value[0] == 0  # every value in the wire format
            kind = dict(headers or []).get("content-type")
            if kind == b"application/json":
                schema_id, payload = unframe(value)
                assert schema_id == by_type["JSON"][0]
                # Triton's client asks for binary outputs: they follow the JSON.
                length = int(dict(headers or [])["inference-header-content-length"])
                jsonschema.validate(json.loads(payload[:length]), json.loads(by_type["JSON"][1]))
            elif kind == b"application/x-protobuf":
                schema_id, indexes, payload = unframe_protobuf(value)
                assert (schema_id, indexes) == (by_type["PROTOBUF"][0], [3])
                assert by_type["PROTOBUF"][1] == oip_protobuf.PROTO.read_text()
                assert pb.ModelInferResponse.FromString(payload).id == "as-protobuf"
            result = read_result(make_codec(open_topology(tiny_topology).topology), value, headers)
            results[result.id] = result
    assert sorted(results) == ["as-avro", "as-json", "as-protobuf"]
    want = results["as-avro"].outputs
    for rid in ("as-json", "as-protobuf"):
        assert results[rid].status.value == "OK"
        for name, arr in want.items():
            np.testing.assert_array_equal(results[rid].outputs[name], arr, err_msg=rid)
