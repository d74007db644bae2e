"""The stage contract: batch in, batch out, the same requests accounted for.

A `Batch` holds one row per live request and a column per tensor. A column is either a
stacked array (first dimension = rows) or, while items still differ in shape (decoded
images before resize), a list with one array per row. A stage that cannot handle one row
rejects it with a reason (`Batch.reject`): the row leaves the batch and its request goes
to the dead-letter topic, while the rest of the batch goes on. Rows plus rejects always
equal the rows that came in; the model runtime checks that after every stage.

A column may also be a device array (CuPy, a torch tensor: anything with ``__dlpack__``)
after a GPU stage (``dali_image``, ``normalize_nchw`` on CUDA). Such an array refuses
``np.asarray`` (CuPy will not copy to the host implicitly), so code that may see one works
in the array's own library: `array_namespace`, `astype`, and NumPy-style indexing, which
CuPy and torch share. A stage that does so says ``takes_device_arrays``; one that leaves
device arrays says ``leaves_device_arrays``, and the graph refuses, at build time, a
stage that cannot take them after one that leaves them (the stage protocol does not
require either attribute: a stage without them is taken for a host-only one).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel

from schemas.devices import is_device_array
from schemas.errors import GraphError
from schemas.tensors import TensorSpec

__all__ = [
    "Batch",
    "Column",
    "Stage",
    "StageBase",
    "StageContext",
    "StageParams",
    "array_namespace",
    "astype",
    "host_dtype",
    "require",
    "stack_if_uniform",
]

Column = np.ndarray[Any, Any] | list[Any]


class StageParams(BaseModel):
    """Base for a stage's parameter model (extra keys forbidden, values frozen)."""

    model_config = {"extra": "forbid", "frozen": True, "use_attribute_docstrings": True}


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
        """A batch without the rows in ``failures`` (index → (reason, message)).

        Arrays are cut with their own integer indexing, so a device array stays one, on
        its device; CuPy queues that on its current stream, so a stage holding device
        columns rejects inside its stream's context (as ``scale`` and ``pad_crop`` do).
        """
        if not failures:
            return self
        keep = [i for i in range(len(self.rows)) if i not in failures]
        columns: dict[str, Column] = {}
        for name, col in self.columns.items():
            if isinstance(col, list):
                columns[name] = [col[i] for i in keep]
            else:  # NumPy or a device array (CuPy, torch)
                columns[name] = col[keep]
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
    """Stack per-row arrays into one array when they share a shape and dtype.

    Device rows of one type stack with their own library, on their device: a list of
    device rows is a column no backend takes.
    """
    if not items:
        return items
    first = items[0]
    if isinstance(first, np.ndarray):
        kind: type[Any] = np.ndarray
    elif is_device_array(first):
        kind = type(first)
    else:
        return items
    if all(
        isinstance(a, kind) and a.shape == first.shape and a.dtype == first.dtype for a in items
    ):
        return np.stack(items) if kind is np.ndarray else array_namespace(first).stack(items)
    return items


def array_namespace(x: Any) -> Any:
    """The module whose functions keep ``x`` where it is (never copied to the host).

    NumPy for NumPy arrays and for anything that is not a device array (a list of rows);
    the namespace a device array names (``__array_namespace__``, the array API standard)
    where it has one; otherwise the module that defines its type: CuPy mirrors NumPy's
    functions, torch has the ones stages need under the same names, except `astype`.
    """
    if not is_device_array(x):
        return np
    named = getattr(x, "__array_namespace__", None)
    if named is not None:
        return named()
    return importlib.import_module(type(x).__module__.partition(".")[0])


def host_dtype(x: Any) -> np.dtype[Any]:
    """The NumPy dtype of any array: torch names its own (``torch.float32``)."""
    try:
        dtype: np.dtype[Any] = np.dtype(x.dtype)
    except TypeError:
        dtype = np.dtype(str(x.dtype).rpartition(".")[2])
    return dtype


def astype(x: Any, dtype: np.dtype[Any]) -> Any:
    """A copy of ``x`` as ``dtype``, made by the array's own library, on its device.

    The one conversion the libraries spell differently: ``xp.astype`` in the array API
    (NumPy ≥ 2.1, CuPy 14), the ``astype`` method in NumPy 1 and CuPy 13, ``Tensor.to``
    with torch's own dtype in torch. The CuPy and CUDA torch paths are written against
    those libraries' documentation and not run here (no GPU on the project's machines).
    """
    xp = array_namespace(x)
    if xp is not np:
        # Their dtypes by the same names (torch.float32); CuPy also takes NumPy's.
        target: Any = getattr(xp, dtype.name, dtype)
    else:
        target = dtype
    if hasattr(xp, "astype"):
        return xp.astype(x, target)
    if hasattr(x, "astype"):
        return x.astype(target)
    return x.to(target, copy=True)


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
    # Whether `process` takes device-array columns without copying them to the host.
    takes_device_arrays: ClassVar[bool] = False

    def __init__(self, params: StageParams) -> None:
        self.params = params

    @property
    def leaves_device_arrays(self) -> bool:
        """Whether `process`, as set up, leaves its output as device arrays (None do here)."""
        return False

    def setup(self, ctx: StageContext) -> None:
        """Nothing to acquire by default."""

    def close(self) -> None:
        """Nothing to release by default."""
