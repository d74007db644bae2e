"""Build requests and parse responses with the KServe Python SDK, in its own venv.

Run by tests/e2e/test_kserve_sdk_pipe.py with ``.venv-kserve/bin/python`` (made by
``make client-tools``): kserve 0.21 requires protobuf < 7, which this project's
environment has moved past, so the SDK lives in a venv of its own and this script is
the whole of what the test asks of it. It imports nothing from kp-pipeline.

    kserve_sdk.py requests ROWS.npy OUT.json   # rows of FP32[64] -> requests, 3 kinds each
    kserve_sdk.py responses IN.json OUT.json   # response records -> id, status, outputs

Records travel as JSON lists of {"kind", "value" (base64), "json_length"}.
"""

from __future__ import annotations

import base64
import json
import sys

import numpy as np
import orjson
from kserve.protocol.grpc.grpc_predict_v2_pb2 import ModelInferResponse
from kserve.protocol.infer_type import InferInput, InferRequest, InferResponse


def _request(rid: str, row: np.ndarray, binary: bool) -> InferRequest:
    x = InferInput(name="x", shape=[64], datatype="FP32")
    x.set_data_from_numpy(row, binary_data=binary)
    return InferRequest(model_name="tiny-mlp", infer_inputs=[x], request_id=rid)


def requests(rows_path: str, out_path: str) -> None:
    out = []
    for i, row in enumerate(np.load(rows_path)):
        body, _ = _request(f"json-{i}", row, binary=False).to_rest()
        out.append({"kind": "json", "id": f"json-{i}", "value": orjson.dumps(body)})
        body, length = _request(f"binary-{i}", row, binary=True).to_rest()
        out.append({"kind": "json", "id": f"binary-{i}", "value": body, "json_length": length})
        grpc = _request(f"grpc-{i}", row, binary=False).to_grpc().SerializeToString()
        out.append({"kind": "protobuf", "id": f"grpc-{i}", "value": grpc})
    for record in out:
        record["value"] = base64.b64encode(record["value"]).decode()
    with open(out_path, "w") as f:
        json.dump(out, f)


def responses(in_path: str, out_path: str) -> None:
    with open(in_path) as f:
        records = json.load(f)
    parsed = {}
    for record in records:
        value = base64.b64decode(record["value"])
        if record["kind"] == "protobuf":
            response = InferResponse.from_grpc(ModelInferResponse.FromString(value))
            status = response.parameters["status"].string_param
        elif record.get("json_length") is not None:
            response = InferResponse.from_bytes(value, record["json_length"])
            status = response.parameters["status"]
        else:
            response = InferResponse.from_rest(orjson.loads(value))
            status = response.parameters["status"]
        parsed[response.id] = {
            "model_name": response.model_name,
            "status": status,
            "outputs": {o.name: o.as_numpy().astype(np.float64).tolist() for o in response.outputs},
        }
    with open(out_path, "w") as f:
        json.dump(parsed, f)


if __name__ == "__main__":
    {"requests": requests, "responses": responses}[sys.argv[1]](*sys.argv[2:])
