"""Requests built by the KServe Python SDK, served, and answered for the same SDK to parse.

The SDK (`kserve.protocol.infer_type`: `InferRequest.to_rest` for v2 JSON, with and
without the binary-data extension, and `to_grpc` for the protobuf `ModelInferRequest`)
builds the requests in its own venv (tests/kserve_sdk.py); aiokafka produces them with
the content-type header a service would set; the pipeline serves them beside the Avro
twin of each row; and the SDK parses every response back (`InferResponse.from_rest`,
`from_bytes`, `from_grpc`). Each answer must carry the numbers of its Avro twin.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from e2e.kit import ROOT, Topics, produce_aiokafka, read_all, start_background

from pipeline.kafka.broker import EmbeddedBroker
from schemas.codec import AvroCodec
from schemas.messages import Request

SDK = ROOT / "tests" / "kserve_sdk.py"
ROWS = 12
CONTENT_TYPES = {"json": b"application/json", "protobuf": b"application/x-protobuf"}


@pytest.fixture(scope="module")
def kserve_python() -> str:
    python = Path(os.environ.get("KP_KSERVE_PYTHON", ROOT / ".venv-kserve" / "bin" / "python"))
    if not python.exists():
        pytest.fail(f"{python} is missing: `make client-tools` makes the KServe SDK's venv")
    return str(python)


def _sdk(python: str, *args: str) -> None:
    done = subprocess.run(
        [python, str(SDK), *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_kserve_sdk_requests_in_json_binary_and_protobuf_come_back_parsed_by_the_sdk(
    broker: EmbeddedBroker, topics: Topics, tiny_topology: Path, tmp_path: Path, kserve_python: str
) -> None:
    rows = np.random.default_rng(11).standard_normal((ROWS, 64)).astype(np.float32)
    np.save(tmp_path / "rows.npy", rows)
    _sdk(kserve_python, "requests", str(tmp_path / "rows.npy"), str(tmp_path / "requests.json"))
    built = json.loads((tmp_path / "requests.json").read_text())
    assert len(built) == 3 * ROWS

    codec = AvroCodec()
    records: list[tuple[bytes, list[Any]]] = []
    for r in built:
        headers = [("content-type", CONTENT_TYPES[r["kind"]])]
        if r.get("json_length") is not None:
            headers.append(("Inference-Header-Content-Length", str(r["json_length"]).encode()))
        records.append((base64.b64decode(r["value"]), headers))
    for i, row in enumerate(rows):
        records.append((codec.encode_request(Request(f"avro-{i}", "tiny-mlp", {"x": row})), []))
    produce_aiokafka(broker.bootstrap_servers, topics.input, records)

    served = start_background(tiny_topology, broker)
    try:
        out = read_all(broker, topics.output, 4 * ROWS)
    finally:
        stats = served.stop()
    assert stats.results == 4 * ROWS

    twins: dict[str, Any] = {}
    answers = []
    for m in out:
        headers = {k.lower(): v for k, v in m.headers() or []}
        kind = {v: k for k, v in CONTENT_TYPES.items()}.get(headers.get("content-type", b""))
        if kind is None:
            result = codec.decode_result(m.value())
            twins[result.id] = result.outputs
            continue
        length = headers.get("inference-header-content-length")
        answers.append(
            {
                "kind": kind,
                "value": base64.b64encode(m.value()).decode(),
                "json_length": None if length is None else int(length),
            }
        )
    (tmp_path / "responses.json").write_text(json.dumps(answers))
    _sdk(
        kserve_python, "responses", str(tmp_path / "responses.json"), str(tmp_path / "parsed.json")
    )
    parsed = json.loads((tmp_path / "parsed.json").read_text())

    assert sorted(parsed) == sorted(r["id"] for r in built)
    assert len(twins) == ROWS
    for rid, answer in parsed.items():
        assert (answer["model_name"], answer["status"]) == ("tiny-mlp", "OK"), rid
        twin = twins[f"avro-{rid.rsplit('-', 1)[1]}"]
        assert sorted(answer["outputs"]) == sorted(twin)
        for name, want in twin.items():
            got = np.asarray(answer["outputs"][name]).astype(want.dtype).reshape(want.shape)
            np.testing.assert_array_equal(got, want, err_msg=f"{rid} {name}")
