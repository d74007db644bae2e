"""Embedding postprocessing: pool token embeddings into one vector, normalise it.

Text models return one embedding per token, padding tokens included, because the batch
was padded to its longest (or a fixed) length. ``mean_pool`` averages only the real tokens,
as sentence-transformers does, so a row's embedding does not depend on the other rows of
its batch. It reads the attention mask from the preprocessed input columns, which the
postprocess batch carries next to the model's outputs.

Every stage here rejects a row whose result is not finite (``non_finite``): a NaN
embedding stored in a vector index poisons every search that touches it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from schemas.errors import GraphError
from schemas.tensors import TensorSpec
from stages.base import Batch, StageBase, StageParams, require

__all__ = ["ClsPool", "L2Normalize", "MeanPool"]

_FLOATS = ("FP16", "FP32", "FP64")
_MASKS = ("INT32", "INT64", "BOOL")


def _need_tokens(inputs: Mapping[str, TensorSpec], name: str, stage: str) -> TensorSpec:
    spec = require(inputs, name, stage)
    if spec.datatype not in _FLOATS or len(spec.shape) != 2:
        raise GraphError(f"{stage}: {name!r} must be float [tokens, dim] per row, got {spec}")
    return spec


def _without(inputs: Mapping[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in inputs.items() if k not in names}


def _non_finite_rows(y: np.ndarray[Any, Any]) -> dict[int, tuple[str, str]]:
    """Failures for the rows of ``y`` ([rows, ...]) with a NaN or infinite element."""
    bad = (~np.isfinite(y)).sum(axis=tuple(range(1, y.ndim)))
    return {
        int(i): ("non_finite", f"{int(bad[i])} embedding elements are NaN or infinite")
        for i in np.flatnonzero(bad)
    }


class MeanPoolParams(StageParams):
    """Average ``input`` (token embeddings) over the tokens where ``mask`` is 1.

    ``keep_input`` and ``keep_mask`` keep those columns for later stages; by default both
    leave the batch, so that the result carries only the pooled embedding.
    """

    input: str = "last_hidden_state"
    mask: str = "attention_mask"
    output: str = "embedding"
    keep_input: bool = False
    keep_mask: bool = False


class MeanPool(StageBase):
    """Masked mean: ``sum(emb * mask) / max(sum(mask), 1e-9)``, FP32 [dim] per row.

    The formula is sentence-transformers' own, so a row with no real token pools to zeros
    rather than failing. Mask values other than 0 and 1 are rejected (``bad_mask``): they
    would weight tokens, which no tokenizer means. Padding positions are never read, even
    when the model wrote NaN there.
    """

    Params: ClassVar[type[StageParams]] = MeanPoolParams
    name = "mean_pool"

    def __init__(self, params: MeanPoolParams) -> None:
        super().__init__(params)
        self.p = params

    def signature(self, inputs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        """Float [tokens, dim] and an integer mask [tokens] in; FP32 [dim] out."""
        spec = _need_tokens(inputs, self.p.input, self.name)
        mask = require(inputs, self.p.mask, self.name)
        if mask.datatype not in _MASKS or len(mask.shape) != 1:
            raise GraphError(
                f"mean_pool: mask {self.p.mask!r} must be INT64, INT32 or BOOL [tokens] per "
                f"row, got {mask}"
            )
        tokens, masked = spec.shape[0], mask.shape[0]
        if tokens is not None and masked is not None and tokens != masked:
            raise GraphError(
                f"mean_pool: mask {self.p.mask!r} has {masked} tokens but {self.p.input!r} "
                f"has {tokens}"
            )
        dropped = [] if self.p.keep_input else [self.p.input]
        dropped += [] if self.p.keep_mask else [self.p.mask]
        out = _without(inputs, *dropped)
        out[self.p.output] = TensorSpec("FP32", (spec.shape[1],))
        return out

    def process(self, batch: Batch) -> Batch:
        """Check the masks, pool the rows, reject what is not finite."""
        emb = np.asarray(batch.columns[self.p.input])
        mask = np.asarray(batch.columns[self.p.mask])
        failures: dict[int, tuple[str, str]] = {}
        if mask.shape != emb.shape[:2]:
            message = f"mask {list(mask.shape[1:])} does not match embeddings {list(emb.shape[1:])}"
            failures = {i: ("bad_mask", message) for i in range(len(batch))}
            pooled = np.zeros((len(batch), *emb.shape[2:]), np.float32)
        else:
            binary = ((mask == 0) | (mask == 1)).all(axis=1)
            for i in np.flatnonzero(~binary):
                failures[int(i)] = ("bad_mask", "attention mask values other than 0 and 1")
            pooled = self._pool(emb, np.where(binary[:, None], mask, 0))
        for row, failure in _non_finite_rows(pooled).items():
            failures.setdefault(row, failure)
        dropped = [] if self.p.keep_input else [self.p.input]
        dropped += [] if self.p.keep_mask else [self.p.mask]
        columns = _without(batch.columns, *dropped)
        columns[self.p.output] = pooled
        return batch.with_columns(columns).reject(failures)

    @staticmethod
    def _pool(emb: np.ndarray[Any, Any], mask: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """Masked means of ``emb`` [rows, tokens, dim] under a 0/1 ``mask`` [rows, tokens].

        Row by row over the real tokens alone, summed in float64: a row's embedding is then
        bit for bit the same however much padding its batch added (a masked matrix product
        sums the zeros too, in an order that depends on the padded length), and a NaN a
        model left at a padding position is never read (0 * NaN would be NaN).
        """
        pooled = np.zeros((emb.shape[0], emb.shape[2]), np.float32)
        with np.errstate(invalid="ignore", over="ignore"):
            for i in range(emb.shape[0]):
                real = emb[i][mask[i] != 0]
                if len(real):  # none: zeros, as sum / max(0, 1e-9) gives
                    pooled[i] = real.sum(axis=0, dtype=np.float64) / len(real)
        return pooled


class ClsPoolParams(StageParams):
    """The embedding of the first token (``[CLS]``) of ``input``."""

    input: str = "last_hidden_state"
    output: str = "embedding"
    keep_input: bool = False


class ClsPool(StageBase):
    """First-token pooling, for models trained with the ``[CLS]`` embedding (BGE, BERT)."""

    Params: ClassVar[type[StageParams]] = ClsPoolParams
    name = "cls_pool"

    def __init__(self, params: ClsPoolParams) -> None:
        super().__init__(params)
        self.p = params

    def signature(self, inputs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        """Float [tokens, dim] in; FP32 [dim] out."""
        spec = _need_tokens(inputs, self.p.input, self.name)
        if spec.shape[0] == 0:
            raise GraphError(f"cls_pool: {self.p.input!r} has no tokens: {spec}")
        out = dict(inputs) if self.p.keep_input else _without(inputs, self.p.input)
        out[self.p.output] = TensorSpec("FP32", (spec.shape[1],))
        return out

    def process(self, batch: Batch) -> Batch:
        """A copy of token 0 of every row."""
        emb = np.asarray(batch.columns[self.p.input])
        if emb.shape[1] == 0:  # a free token count that came out as zero
            pooled = np.zeros((len(batch), emb.shape[2]), np.float32)
            failures = {i: ("no_tokens", "no token to pool") for i in range(len(batch))}
        else:
            pooled = emb[:, 0, :].astype(np.float32)  # astype copies: no view into the input
            failures = _non_finite_rows(pooled)
        columns = dict(batch.columns)
        if not self.p.keep_input:
            del columns[self.p.input]
        columns[self.p.output] = pooled
        return batch.with_columns(columns).reject(failures)


class L2NormalizeParams(StageParams):
    """Scale ``input`` to unit length over its last axis (default: in place).

    ``eps`` bounds the divisor from below, as in ``torch.nn.functional.normalize``: a zero
    vector stays zero instead of becoming NaN.
    """

    input: str = "embedding"
    output: str | None = None
    eps: float = Field(1e-12, gt=0)


class L2Normalize(StageBase):
    """``x / max(||x||, eps)`` over the last axis, as FP32 (cosine similarity = dot product).

    The norm is taken in float64, so no FP16 or FP32 component overflows its square.
    """

    Params: ClassVar[type[StageParams]] = L2NormalizeParams
    name = "l2_normalize"

    def __init__(self, params: L2NormalizeParams) -> None:
        super().__init__(params)
        self.p = params
        self.out = params.output or params.input

    def signature(self, inputs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        """A float tensor of one or more dimensions in; FP32 of the same shape out."""
        spec = require(inputs, self.p.input, self.name)
        if spec.datatype not in _FLOATS or len(spec.shape) < 1:
            raise GraphError(
                f"l2_normalize: {self.p.input!r} must be float [..., dim] per row, got {spec}"
            )
        out = _without(inputs, self.p.input)
        out[self.out] = TensorSpec("FP32", spec.shape)
        return out

    def process(self, batch: Batch) -> Batch:
        """Divide the batch by its norms in one pass."""
        x = np.asarray(batch.columns[self.p.input])
        x64 = x.astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            norm = np.sqrt(np.einsum("...i,...i->...", x64, x64))[..., None]
            y = (x64 / np.maximum(norm, self.p.eps)).astype(np.float32)
        columns = _without(batch.columns, self.p.input)
        columns[self.out] = y
        # A non-finite input gives a non-finite result; its row is rejected.
        return batch.with_columns(columns).reject(_non_finite_rows(y))
