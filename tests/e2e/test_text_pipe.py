"""The text topology end to end: MiniLM embeddings for texts of mixed lengths.

Each result must equal the embedding of its text computed alone (no padding, no batch)
with ONNX Runtime and NumPy: padding to a bucket and batching with other texts must not
change an answer. Texts over the largest bucket and bytes that are not UTF-8 become dead
letters; everything else is served, texts sent bare (no BYTES length prefix) included.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import pytest
from e2e.kit import ROOT, Topics, read_all, start_background

from pipeline.config.topology import KafkaSettings
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.tools.samples import mixed_texts
from pipeline.tools.traffic import image_request, produce_requests, text_request
from schemas.codec import AvroCodec, load_schema

MODEL = ROOT / "models" / "minilm_l6_int8.onnx"
TOKENIZER = ROOT / "models" / "minilm_tokenizer.json"
# Padded and unpadded runs differ only in summation order inside attention: measured max
# |diff| 6e-8 on unit-length embeddings (int8 weights, float32 activations).
TOLERANCE = 1e-5


def _reference(texts: list[str]) -> dict[str, np.ndarray[Any, Any]]:
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER))
    tok.no_padding()
    tok.no_truncation()
    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    out = {}
    for text in texts:
        enc = tok.encode(text)
        feeds = {
            "input_ids": np.array([enc.ids], np.int64),
            "attention_mask": np.array([enc.attention_mask], np.int64),
            "token_type_ids": np.array([enc.type_ids], np.int64),
        }
        states = session.run(["last_hidden_state"], feeds)[0][0]
        emb = states.mean(axis=0)  # alone: every token is real
        out[text] = emb / np.linalg.norm(emb)
    return out


def _bare(rid: str, text: str) -> bytes:
    record = {
        "id": rid, "model": "minilm-l6", "model_version": None, "parameters": {},
        "deadline_ms": None, "reply_topic": None,
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": text.encode()}],
    }  # fmt: skip
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(load_schema("request")), record)
    return buf.getvalue()


def test_every_embedding_equals_its_text_alone(
    broker: EmbeddedBroker, topics: Topics, tmp_path: Path
) -> None:
    if not MODEL.exists():
        pytest.fail("models/minilm_l6_int8.onnx missing: run `make models`")
    env = {
        "KP_INPUT": topics.input,
        "KP_OUTPUT": topics.output,
        "KP_DLQ": topics.dead_letter,
        "KP_GROUP": topics.group,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        topology = tmp_path / "text.yaml"
        text = (ROOT / "topology-text.yaml").read_text()
        topology.write_text(text.replace("models/", f"{ROOT}/models/"))
        served = start_background(topology, broker)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    texts = mixed_texts(80)
    codec = AvroCodec()
    # Every fourth text goes bare, its UTF-8 as the one BYTES element's data with no length
    # prefix, as a producer written from the schema by field name sends it: served alike.
    records = [
        (
            f"t{i}".encode(),
            _bare(f"t{i}", t)
            if i % 4 == 0
            else codec.encode_request(text_request(f"t{i}", "minilm-l6", t)),
        )
        for i, t in enumerate(texts)
    ]
    records.append((b"long", codec.encode_request(text_request("long", "minilm-l6", "lag " * 300))))
    not_utf8 = image_request("bytes", "minilm-l6", b"\xff\xfe\xfa", input_name="text")
    records.append((b"bytes", codec.encode_request(not_utf8)))
    try:
        produce_requests(KafkaSettings(), broker.bootstrap_servers, topics.input, records)
        results = [codec.decode_result(m.value()) for m in read_all(broker, topics.output, 80)]
        letters = [
            codec.decode_dead_letter(m.value()) for m in read_all(broker, topics.dead_letter, 2)
        ]
    finally:
        stats = served.stop()
    assert stats.results == 80
    assert sorted((d.id, d.reason) for d in letters) == [
        ("bytes", "bad_text"),
        ("long", "text_too_long"),
    ]
    reference = _reference(texts)
    worst = 0.0
    for r in results:
        text = texts[int(r.id[1:])]
        # Only what postprocessing made: not the token tensors that fed the model, and
        # not the token states that mean_pool consumed.
        assert set(r.outputs) == {"embedding"}
        emb = r.outputs["embedding"]
        assert emb.shape == (384,)
        worst = max(worst, float(np.abs(emb - reference[text]).max()))
    print(f"max |pipeline - alone| over 80 embeddings: {worst:.2e}")
    assert worst < TOLERANCE
