"""The tokenize stage: buckets, padding, refusals, against the tokenizer used alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from backends.base import ModelInfo
from schemas.errors import GraphError, RequestError
from schemas.tensors import TensorSpec
from stages.base import Batch, StageContext
from stages.preprocess.text import TextTooLongError, Tokenize, TokenizeParams, bucket_for

MODELS = Path(__file__).resolve().parents[2] / "models"
TOKENIZER = MODELS / "minilm_tokenizer.json"
EDGES = [8, 16, 32]

pytestmark = pytest.mark.skipif(
    not TOKENIZER.exists(), reason="models/minilm_tokenizer.json: run `make models`"
)


def _stage(buckets: list[int] | None = EDGES) -> Tokenize:
    stage = Tokenize(TokenizeParams(tokenizer=TOKENIZER, buckets=buckets))
    stage.setup(StageContext(model="m"))
    return stage


def _column(*texts: str | bytes) -> np.ndarray[Any, Any]:
    col = np.empty((len(texts), 1), dtype=object)
    for i, t in enumerate(texts):
        col[i, 0] = t.encode() if isinstance(t, str) else t
    return col


def _alone(text: str) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER))
    tok.no_padding()
    tok.no_truncation()
    return list(tok.encode(text).ids)


@given(st.integers(1, 40))
def test_a_length_joins_the_smallest_bucket_that_holds_it(n: int) -> None:
    if n > EDGES[-1]:
        with pytest.raises(TextTooLongError):
            bucket_for(n, EDGES)
        return
    edge = bucket_for(n, EDGES)
    assert edge >= n
    assert all(e < n for e in EDGES if e < edge)  # no smaller bucket would do


def test_rows_equal_the_tokenizer_alone_padded_to_the_bucket() -> None:
    texts = ["A cat.", "The quick brown fox jumps over the lazy dog."]
    stage = _stage()
    out = stage.process(Batch(["a", "b"], {"text": _column(*texts)}))
    ids, mask, types = (out.columns[k] for k in ("input_ids", "attention_mask", "token_type_ids"))
    assert isinstance(ids, np.ndarray)
    width = bucket_for(max(len(_alone(t)) for t in texts), EDGES)
    assert ids.shape == (2, width)
    assert ids.dtype == np.int64
    for row, text in enumerate(texts):
        alone = _alone(text)
        assert list(ids[row, : len(alone)]) == alone
        assert not ids[row, len(alone) :].any()
        assert list(mask[row]) == [1] * len(alone) + [0] * (width - len(alone))
    assert not np.asarray(types).any()
    real = sum(len(_alone(t)) for t in texts)
    assert out.padded_elements == (2 * width - real) * 3


def test_bucket_key_is_the_routing_decision_and_refuses_long_text() -> None:
    stage = _stage()
    short = {"text": np.array([b"hello"], dtype=object)}
    assert stage.bucket_key(short) == 8
    long = {"text": np.array([("word " * 40).encode()], dtype=object)}
    with pytest.raises(TextTooLongError, match="largest bucket holds 32") as e:
        stage.bucket_key(long)
    assert e.value.reason == "text_too_long"
    with pytest.raises(RequestError) as bad:
        stage.bucket_key({"text": np.array([b"\xff\xfe"], dtype=object)})
    assert bad.value.reason == "bad_text"


def test_bad_rows_leave_the_batch_and_the_rest_is_served() -> None:
    stage = _stage()
    col = _column("fine", b"\xff\xfe not utf-8", "word " * 40, "also fine")
    out = stage.process(Batch(["a", "b", "c", "d"], {"text": col}))
    assert out.rows == ["a", "d"]
    assert [(r, reason) for r, reason, _ in out.rejected] == [
        ("b", "bad_text"),
        ("c", "text_too_long"),
    ]
    assert np.asarray(out.columns["input_ids"]).shape == (2, 8)


def test_signature_and_parameter_errors() -> None:
    stage = _stage()
    out = stage.signature({"text": TensorSpec("BYTES", (1,))})
    assert out == {
        k: TensorSpec("INT64", (None,)) for k in ("input_ids", "attention_mask", "token_type_ids")
    }
    with pytest.raises(GraphError, match="must be BYTES"):
        stage.signature({"text": TensorSpec("FP32", (4,))})
    with pytest.raises(ValueError, match="ascending"):
        TokenizeParams(tokenizer=TOKENIZER, buckets=[16, 8])
    missing = Tokenize(TokenizeParams(tokenizer=Path("nope.json"), buckets=[8]))
    with pytest.raises(GraphError, match="no such file"):
        missing.setup(StageContext(model="m"))


def test_edges_come_from_tensorrt_profiles_when_none_are_named() -> None:
    stage = _stage(buckets=None)
    profile = {"input_ids": ((1, 1), (8, 64), (32, 128))}
    info = ModelInfo({}, {}, profiles=({"input_ids": ((1, 1), (8, 16), (32, 32))}, profile))
    stage.bind_model(info)
    assert stage.edges == [32, 128]
    with pytest.raises(GraphError, match="name the sequence lengths"):
        _stage(buckets=None).bind_model(ModelInfo({}, {}))


def test_padding_to_the_longest_keeps_one_batch_and_pads_only_to_its_longest() -> None:
    stage = Tokenize(TokenizeParams(tokenizer=TOKENIZER, buckets=EDGES, padding="longest"))
    stage.setup(StageContext(model="m"))
    short = {"text": np.array([b"hi"], dtype=object)}
    longer = {"text": np.array([b"a somewhat longer sentence than that"], dtype=object)}
    assert stage.bucket_key(short) == stage.bucket_key(longer)  # one batch for all
    with pytest.raises(TextTooLongError):
        stage.bucket_key({"text": np.array([("word " * 40).encode()], dtype=object)})
    texts = ["hi", "a somewhat longer sentence than that"]
    out = stage.process(Batch(["a", "b"], {"text": _column(*texts)}))
    longest = max(len(_alone(t)) for t in texts)
    assert np.asarray(out.columns["input_ids"]).shape == (2, longest)
