"""Text to token tensors, padded to a length bucket (Hugging Face ``tokenizers``).

Texts differ in length; a transformer's cost grows with the padded length of its batch.
Padding every batch to the longest text the model accepts wastes most of that cost, and
padding to each batch's own longest text gives the model a new shape on every batch
(which TensorRT profiles and compiled graphs pay for). Length buckets are the middle
way the strongest servers use: a few fixed sequence lengths (``buckets``), each request
joins the batch of the smallest bucket that holds it, and a batch is padded to its
bucket. So one batch never mixes buckets, and the model sees only a few shapes.

The bucket is chosen when the request is routed, on the Kafka thread
(`Tokenize.bucket_key`), so the batcher keeps one open batch per bucket; a text longer
than the largest bucket is refused there, as a dead letter with reason
``text_too_long``, before it costs anything. Edges come from topology.yaml, or, when
none are given, from the sequence dimension of the model's TensorRT optimization
profiles (`Tokenize.bind_model`).

The tokenizer runs on the CPU on every device: tokenization is string work, and the
Rust tokenizer's ``encode_batch`` already spreads a batch over threads. Token ids are
INT64 (what BERT-family ONNX exports take); padding is counted in
``Batch.padded_elements`` for the padding-waste metric (padded tokens over real ones).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator

from schemas.errors import GraphError, RequestError
from schemas.tensors import TensorSpec
from stages.base import Batch, StageBase, StageContext, StageParams, require

__all__ = ["TextTooLongError", "Tokenize", "bucket_for"]


class TextTooLongError(RequestError):
    """A text has more tokens than the largest bucket."""

    reason = "text_too_long"


class BadTextError(RequestError):
    """A text is not UTF-8."""

    reason = "bad_text"


def bucket_for(length: int, edges: list[int]) -> int:
    """The smallest edge that holds ``length`` tokens; raises `TextTooLongError` if none."""
    i = bisect.bisect_left(edges, length)
    if i == len(edges):
        raise TextTooLongError(f"{length} tokens; the largest bucket holds {edges[-1]}")
    return edges[i]


class TokenizeParams(StageParams):
    """``tokenizer`` is a tokenizer.json (relative to the topology file)."""

    input: str = "text"
    tokenizer: Path
    buckets: list[int] | None = Field(
        None, description="Sequence lengths, ascending; default: the model's TensorRT profiles."
    )
    input_ids: str = "input_ids"
    """The column of token ids (INT64), padded to the batch's length."""
    attention_mask: str | None = "attention_mask"
    """The column of 1s over real tokens and 0s over padding; null: none."""
    token_type_ids: str | None = "token_type_ids"
    """The column of segment ids (all 0 for one text); null: none."""
    add_special_tokens: bool = True
    """Add the tokenizer's special tokens ([CLS], [SEP], ...)."""
    padding: Literal["bucket", "longest"] = Field(
        "bucket",
        description="bucket: batch by bucket, pad to it; longest: one batch for all lengths, "
        "padded to its longest text (fewer, fuller batches; a new shape every batch).",
    )

    @field_validator("buckets")
    @classmethod
    def _ascending(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            if not v:
                raise ValueError("name at least one bucket")
            if any(b < 1 for b in v) or any(a >= b for a, b in itertools.pairwise(v)):
                raise ValueError(f"buckets must be positive and ascending, got {v}")
        return v


class Tokenize(StageBase):
    """BYTES[1] UTF-8 text in; INT64[bucket] ids, attention mask and token types out."""

    Params: ClassVar[type[StageParams]] = TokenizeParams
    name = "tokenize"

    def __init__(self, params: TokenizeParams) -> None:
        super().__init__(params)
        self.p = params
        self.edges: list[int] = list(params.buckets or [])
        self._routing: Any = None  # one tokenizer per thread: routing and preprocessing
        self._batching: Any = None

    def setup(self, ctx: StageContext) -> None:
        """Load the tokenizer twice (the Kafka thread and the preprocess thread each own one)."""
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise GraphError(
                "needs the tokenizers package (pip install 'kp-pipeline[text]')"
            ) from None
        path = (
            self.p.tokenizer if self.p.tokenizer.is_absolute() else ctx.base_dir / self.p.tokenizer
        )
        if not path.exists():
            raise GraphError(f"tokenizer: no such file {path}")
        try:
            self._routing, self._batching = (
                Tokenizer.from_file(str(path)),
                Tokenizer.from_file(str(path)),
            )
        except Exception as e:  # the tokenizers library raises its own Exception type
            raise GraphError(f"tokenizer: {path} is not a tokenizer.json: {e}") from None
        for tok in (self._routing, self._batching):
            tok.no_padding()  # this stage pads, to the bucket
            tok.no_truncation()  # too long is refused, never cut silently

    def bind_model(self, info: Any) -> None:
        """Take bucket edges from TensorRT profiles when topology.yaml names none."""
        if self.edges:
            return
        seq: set[int] = set()
        for profile in getattr(info, "profiles", ()) or ():
            shapes = profile.get(self.p.input_ids)
            if shapes:
                seq.add(int(shapes[-1][-1]))  # the max shape's sequence dimension
        if not seq:
            raise GraphError(
                "buckets: name the sequence lengths (e.g. [32, 64, 128, 256]); this model "
                "has no optimization profiles to take them from"
            )
        self.edges = sorted(seq)

    def signature(self, inputs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        """BYTES[1] in, INT64[sequence] per output name out."""
        spec = require(inputs, self.p.input, self.name)
        if spec.datatype != "BYTES" or spec.shape not in ((), (1,)):
            raise GraphError(f"{self.name}: {self.p.input!r} must be BYTES[1], got {spec}")
        out = {k: v for k, v in inputs.items() if k != self.p.input}
        for name in self._outputs():
            out[name] = TensorSpec("INT64", (None,))
        return out

    def bucket_key(self, tensors: Mapping[str, np.ndarray[Any, Any]]) -> int:
        """The bucket of one request (Kafka thread); raises a `RequestError` to refuse it."""
        text = _text(tensors[self.p.input])
        n = len(self._routing.encode(text, add_special_tokens=self.p.add_special_tokens).ids)
        edge = bucket_for(n, self.edges)  # refuses what no bucket holds, in either mode
        return edge if self.p.padding == "bucket" else 0

    def process(self, batch: Batch) -> Batch:
        """Tokenize the batch and pad it to the bucket of its longest text."""
        col = batch.columns[self.p.input]
        texts: list[str] = []
        failures: dict[int, tuple[str, str]] = {}
        for i in range(len(batch)):
            try:
                texts.append(_text(col[i]))
            except RequestError as e:
                failures[i] = (e.reason, str(e))
                texts.append("")
        encodings = self._batching.encode_batch(texts, add_special_tokens=self.p.add_special_tokens)
        lengths = [len(e.ids) for e in encodings]
        for i, n in enumerate(lengths):
            if i not in failures and n > self.edges[-1]:
                err = TextTooLongError(f"{n} tokens; the largest bucket holds {self.edges[-1]}")
                failures[i] = (err.reason, str(err))
        keep = [i for i in range(len(batch)) if i not in failures]
        longest = max((lengths[i] for i in keep), default=1)
        width = bucket_for(longest, self.edges) if self.p.padding == "bucket" else longest
        rows = len(batch)
        ids = np.zeros((rows, width), np.int64)
        mask = np.zeros((rows, width), np.int64)
        types = np.zeros((rows, width), np.int64)
        for i in keep:
            enc, n = encodings[i], lengths[i]
            ids[i, :n] = enc.ids
            mask[i, :n] = 1
            types[i, :n] = enc.type_ids
        columns = {k: v for k, v in batch.columns.items() if k != self.p.input}
        columns[self.p.input_ids] = ids
        if self.p.attention_mask:
            columns[self.p.attention_mask] = mask
        if self.p.token_type_ids:
            columns[self.p.token_type_ids] = types
        out = batch.with_columns(columns).reject(failures)
        real = sum(lengths[i] for i in keep)
        out.padded_elements += (len(keep) * width - real) * len(self._outputs())
        return out

    def _outputs(self) -> list[str]:
        return [n for n in (self.p.input_ids, self.p.attention_mask, self.p.token_type_ids) if n]


def _text(raw: Any) -> str:
    data = raw.reshape(-1)[0] if isinstance(raw, np.ndarray) else raw
    if isinstance(data, str):
        return data
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadTextError(f"text is not UTF-8: {e}") from None
