"""Which backend reads an artifact, told from its content when ``backend:`` is left out.

Each format is recognised by what is inside the file (a suffix alone decides nothing,
except where noted), and `detect` says why it chose what it chose, which ``kp-pipeline
validate`` prints:

- a folder with ``saved_model.pb``: a TensorFlow SavedModel → ``tensorflow``;
- a zip holding ``*/code/`` (TorchScript), ``*/models/model.json`` or
  ``*/archive_format`` (a torch.export program), or ``*/data.pkl`` alone (a state dict,
  which the torch backend builds through ``options.factory``) → ``torch``; a zip with
  ``schema.json`` at its top (skops) → ``sklearn``;
- an ONNX ModelProto (parsed with the ``onnx`` package: a graph with nodes) →
  ``onnxruntime``;
- a JSON or UBJSON document whose first object is ``learner`` (XGBoost's own formats) →
  ``xgboost``;
- text starting ``tree`` then ``version=v`` (LightGBM's model format) → ``lightgbm``;
- a pickle naming scikit-learn classes (read with `pickletools`, which runs nothing) →
  ``sklearn``; one naming torch's → ``torch``; a compressed joblib file (``.joblib``)
  → ``sklearn``;
- ``.plan`` / ``.engine`` → ``tensorrt``, by the suffix only: reading a serialized engine
  needs TensorRT itself, which the project's machines do not have.

Anything else, or content that fits none of these, is refused asking for ``backend:``.
"""

from __future__ import annotations

import json
import pickletools
import zipfile
from pathlib import Path

from schemas.errors import GraphError

__all__ = ["detect"]

_HEAD = 4096


def detect(path: Path) -> tuple[str, str]:
    """``(backend, why)`` for the artifact at ``path``; `GraphError` when it cannot tell."""
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return "tensorflow", "a folder with saved_model.pb (a TensorFlow SavedModel)"
        return _refuse(path, "a folder without saved_model.pb")
    if path.suffix.lower() in (".plan", ".engine"):
        return "tensorrt", f"the {path.suffix} suffix (a TensorRT engine; content not read)"
    with path.open("rb") as f:
        head = f.read(_HEAD)
    for check in (_zip, _lightgbm, _xgboost, _pickle, _onnx):
        found = check(path, head)
        if found is not None:
            return found
    if path.suffix.lower() == ".joblib":
        return "sklearn", "a .joblib file that is not a plain pickle (joblib compresses them)"
    return _refuse(path, "none of the formats the backends read")


def _refuse(path: Path, what: str) -> tuple[str, str]:
    raise GraphError(
        f"cannot tell which backend reads {path} ({what}): set backend: (onnxruntime, "
        "torch, tensorflow, tensorrt, xgboost, lightgbm, sklearn or module:Class)"
    )


def _zip(path: Path, head: bytes) -> tuple[str, str] | None:
    if not head.startswith(b"PK\x03\x04"):
        return None
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except zipfile.BadZipFile:
        return None
    if "schema.json" in names:
        return "sklearn", "a zip with schema.json at its top (a skops file)"
    inner = {n.split("/", 1)[1] for n in names if "/" in n}
    if any(n.startswith("code/") for n in inner):
        return "torch", "a zip with code/ inside (TorchScript)"
    if "models/model.json" in inner or "archive_format" in inner:
        return "torch", "a zip with a torch.export program inside (.pt2)"
    if "data.pkl" in inner:
        return "torch", "a zip with data.pkl alone (a torch state dict: options.factory)"
    found = ", ".join(sorted(names)[:5])
    return _refuse(path, f"a zip none of the backends reads (it holds {found}, …)")


def _lightgbm(path: Path, head: bytes) -> tuple[str, str] | None:
    if head.startswith(b"tree\n") and b"\nversion=v" in head[:64]:
        return "lightgbm", "text starting 'tree', 'version=v…' (a LightGBM model file)"
    return None


def _xgboost(path: Path, head: bytes) -> tuple[str, str] | None:
    start = head.lstrip()
    if not start.startswith(b"{"):
        return None
    if start.startswith(b"{L") or start.startswith(b"{i") or start.startswith(b"{U"):
        # UBJSON: '{' then the first key's length marker; XGBoost's first key is learner.
        if b"learner" in start[:32]:
            return "xgboost", "a UBJSON document whose first object is 'learner' (XGBoost)"
        return None
    try:
        doc = json.loads(path.read_bytes())
    except ValueError:
        return None
    if isinstance(doc, dict) and "learner" in doc:
        return "xgboost", "a JSON document with a 'learner' object (XGBoost)"
    return None


def _pickle(path: Path, head: bytes) -> tuple[str, str] | None:
    if not head.startswith(b"\x80"):
        return None
    modules: set[str] = set()
    try:
        with path.open("rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST") and isinstance(arg, str):
                    modules.add(arg.split()[0].split(".")[0])
                elif (
                    op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE")
                    and isinstance(arg, str)
                    and "." in arg
                    and " " not in arg
                ):
                    modules.add(arg.split(".")[0])
    except Exception:
        return None  # not a pickle after all, or one pickletools cannot walk
    if {"sklearn", "torch"} <= modules:
        return _refuse(path, "a pickle naming both scikit-learn and torch classes")
    if "sklearn" in modules:
        return "sklearn", "a pickle naming scikit-learn classes (trust_artifact required)"
    if "torch" in modules:
        return "torch", "a pickle naming torch classes (trust_artifact required)"
    return None


def _onnx(path: Path, head: bytes) -> tuple[str, str] | None:
    if head[:1] != b"\x08":  # a ModelProto starts with ir_version, field 1
        return None
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return None
    if len(model.graph.node) == 0:
        return None
    return "onnxruntime", f"an ONNX model (IR version {model.ir_version})"
