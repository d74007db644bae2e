"""The stage contract: batch in, batch out, the same requests accounted for.

A `Batch` holds one row per live request and a column per tensor. A column is either a
stacked array (first dimension = rows) or, while items still differ in shape (decoded
images before resize), a list with one array per row. A stage that cannot handle one row
rejects it with a reason (`Batch.reject`): the row leaves the batch and its request goes
to the dead-letter topic, while the rest of the batch goes on. Rows plus rejects always
equal the rows that came in; the model runtime checks that after every stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel

from schemas.errors import GraphError
from schemas.tensors import TensorSpec

__all__ = [
    "Batch",
    "Column",
    "Stage",
    "StageBase",
    "StageContext",
    "StageParams",
    "require",
    "stack_if_uniform",
]

Column = np.ndarray[Any, Any] | list[Any]


class StageParams(BaseModel):
    """Base for a stage's parameter model (extra keys forbidden, values frozen)."""

    model_config = {"extra": "forbid", "frozen": True}


@dataclass(frozen=True, slots=True)
class StageContext:
    """What a stage is told at setup: its model, device, stream, and where relative paths start."""

    model: str
    device: str = "cpu"
    stream: Any = None
    base_dir: Path = Path(".")


@dataclass(slots=True)
class Batch:
    """Rows of one model's requests, tensors by name, and the rows rejected so far.

    ``rows`` are opaque to stages (the runtime keeps envelopes there); stages work on
    ``columns`` and may only drop rows through `reject`.
    """

    rows: list[Any]
    columns: dict[str, Column]
    rejected: list[tuple[Any, str, str]] = field(default_factory=list)
    padded_elements: int = 0  # elements a stage added as padding (the padding-waste metric)

    def __len__(self) -> int:
        return len(self.rows)

    def reject(self, failures: Mapping[int, tuple[str, str]]) -> Batch:
        """A batch without the rows in ``failures`` (index → (reason, message))."""
        if not failures:
            return self
        keep = [i for i in range(len(self.rows)) if i not in failures]
        columns: dict[str, Column] = {}
        for name, col in self.columns.items():
            if isinstance(col, np.ndarray):
                columns[name] = col[keep]
            else:
                columns[name] = [col[i] for i in keep]
        rejected = self.rejected + [(self.rows[i], *failures[i]) for i in sorted(failures)]
        return Batch([self.rows[i] for i in keep], columns, rejected, self.padded_elements)

    def with_columns(self, columns: dict[str, Column]) -> Batch:
        """The same rows with other columns."""
        return Batch(self.rows, columns, self.rejected, self.padded_elements)


def require(inputs: Mapping[str, TensorSpec], name: str, stage: str) -> TensorSpec:
    """The spec of column ``name``, or a `GraphError` listing what the batch has instead."""
    if name not in inputs:
        have = ", ".join(f"{k} {v}" for k, v in inputs.items()) or "nothing"
        raise GraphError(f"{stage}: needs column {name!r}, but the batch has {have}")
    return inputs[name]


def stack_if_uniform(items: list[Any]) -> Column:
    """Stack per-row arrays into one array when they share a shape and dtype."""
    if not items:
        return items
    first = items[0]
    if all(
        isinstance(a, np.ndarray) and a.shape == first.shape and a.dtype == first.dtype
        for a in items
    ):
        return np.stack(items)
    return items


@runtime_checkable
class Stage(Protocol):
    """A batch-first transformation, built from its own validated parameters.

    ``signature`` is the static check run before anything is consumed: given the specs of
    the columns coming in (per row, no batch dimension), it returns the specs going out,
    or raises `schemas.errors.GraphError` saying what does not fit.
    """

    Params: ClassVar[type[StageParams]]
    name: str

    def signature(self, inputs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        """Column specs after this stage, given the specs before it."""
        ...

    def setup(self, ctx: StageContext) -> None:
        """Acquire what ``process`` needs (device buffers, lookup tables)."""
        ...

    def process(self, batch: Batch) -> Batch:
        """Transform a whole batch; rows it cannot handle leave through `Batch.reject`."""
        ...

    def close(self) -> None:
        """Release what ``setup`` acquired."""
        ...


class StageBase:
    """Optional convenience base: stores params, and setup/close that do nothing.

    Stages need not inherit from it; `Stage` is a protocol.
    """

    Params: ClassVar[type[StageParams]] = StageParams
    name: str = "stage"

    def __init__(self, params: StageParams) -> None:
        self.params = params

    def setup(self, ctx: StageContext) -> None:
        """Nothing to acquire by default."""

    def close(self) -> None:
        """Nothing to release by default."""
