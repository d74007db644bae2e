"""Loading PyTorch artifacts, and which of them may run code while they load.

The formats, and what loading each can execute:

- ``torchscript`` (``torch.jit.save``) and ``export`` (``torch.export.save``, ``.pt2``):
  TorchScript's own unpickler and torch.export's serializer restore tensors and graphs,
  never Python objects: no Python code runs while they load.
- ``state_dict``: a ``torch.save`` of a state dict, loaded with ``weights_only=True``
  (tensors and containers only) into the ``nn.Module`` that ``options.module`` names
  (``module:Class``, built with ``options.module_kwargs``): the topology names the code.
- ``pickle``: a whole pickled module (``torch.save(model)``). Unpickling it runs whatever
  the file says, so it loads only where the model says ``trust_artifact: true``; refused
  otherwise, naming the setting.
- ``factory``: ``options.factory`` (``module:callable``) is called with the artifact's
  path. The topology names that code; what it loads is forced through
  ``weights_only=True`` (``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` for the call) unless the model
  says ``trust_artifact: true``.

``auto`` tells them apart by content: ``.pt2`` is ``export``; a zip archive with TorchScript
``code/`` is ``torchscript``; another ``torch.save`` archive is a state dict when
``options.module`` is set, else a pickle (refused without trust).
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from backends.options import SIGNATURE_FILE
from schemas.errors import BackendError, GraphError
from schemas.plugins import import_object

__all__ = ["FORMATS", "load_module", "resolve_format", "weights_only"]

FORMATS = ("auto", "torchscript", "export", "state_dict", "pickle", "factory")


def resolve_format(fmt: str, artifact: Path, factory: str | None, module: str | None) -> str:
    """The format ``auto`` stands for, from the options and the file's content."""
    if fmt == "factory" and factory is None:
        raise BackendError("options.format is 'factory' but options.factory names none")
    if fmt == "state_dict" and module is None:
        raise BackendError("options.format is 'state_dict' but options.module names none")
    if fmt != "auto":
        return fmt
    if factory is not None:
        return "factory"
    if artifact.suffix == ".pt2":
        return "export"
    if _is_torchscript(artifact):
        return "torchscript"
    if zipfile.is_zipfile(artifact):  # a torch.save archive
        return "state_dict" if module is not None else "pickle"
    return "torchscript"  # refused by the zip check with what to give instead


def _is_torchscript(artifact: Path) -> bool:
    if not zipfile.is_zipfile(artifact):
        return False
    with zipfile.ZipFile(artifact) as z:
        return any(name.split("/")[1:2] == ["code"] for name in z.namelist())


@contextlib.contextmanager
def weights_only(enforce: bool) -> Iterator[None]:
    """Every ``torch.load`` in this block loads tensors only, when ``enforce``."""
    if not enforce:
        yield
        return
    saved = {
        k: os.environ.get(k)
        for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    }
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def load_module(
    fmt: str, artifact: Path, opts: Any, device: Any, trusted: bool
) -> tuple[Any, dict[str, Any]]:
    """The callable module and what the archive says about itself (signature, program)."""
    import torch

    if fmt == "factory":
        return _from_factory(artifact, opts, device, trusted), {}
    if fmt in ("state_dict", "pickle"):
        return _from_torch_save(fmt, artifact, opts, device, trusted), {}
    _require_zip(artifact, fmt)
    embedded: dict[str, Any] = {}
    extra = {SIGNATURE_FILE: ""}
    try:
        if fmt == "torchscript":
            module = torch.jit.load(  # type: ignore[no-untyped-call]
                str(artifact), map_location=device, _extra_files=extra
            )
        else:
            program = torch.export.load(str(artifact), extra_files=extra)
            embedded["program"] = program
            module = program.module().to(device)
    except Exception as e:
        kind = "a TorchScript archive" if fmt == "torchscript" else "a torch.export program"
        raise BackendError(f"{artifact} is not {kind} (format {fmt!r}): {e}") from None
    if extra[SIGNATURE_FILE]:
        embedded["signature"] = extra[SIGNATURE_FILE]
    if fmt == "torchscript":
        module.eval()
    return module, embedded


def _from_factory(artifact: Path, opts: Any, device: Any, trusted: bool) -> Any:
    import torch

    try:
        factory = import_object(opts.factory, "torch module factory")
    except GraphError as e:
        raise BackendError(f"options.factory: {e}") from None
    try:
        with weights_only(not trusted):
            module = factory(artifact)
    except Exception as e:
        hint = _trust_hint(e, trusted)
        raise BackendError(f"factory {opts.factory} failed on {artifact}: {e}{hint}") from None
    if not isinstance(module, torch.nn.Module):
        raise BackendError(f"factory {opts.factory} returned {type(module).__name__}, not a Module")
    return module.eval().to(device)


def _from_torch_save(fmt: str, artifact: Path, opts: Any, device: Any, trusted: bool) -> Any:
    import torch

    if fmt == "pickle" and not trusted:
        raise BackendError(
            f"{artifact} is a pickled torch module (torch.save(model)): loading it runs the "
            "code it names. Set trust_artifact: true on the model if you trust the file, or "
            "save a state dict and set options.module (module:Class) to load it weights-only"
        )
    _require_zip(artifact, fmt)
    try:
        loaded = torch.load(str(artifact), map_location=device, weights_only=fmt != "pickle")
    except Exception as e:
        raise BackendError(f"{artifact}: cannot load it {_how(fmt)}: {e}") from None
    if fmt == "pickle":
        if not isinstance(loaded, torch.nn.Module):
            raise BackendError(f"{artifact} holds a {type(loaded).__name__}, not a Module")
        return loaded.eval().to(device)
    if not isinstance(loaded, dict):
        raise BackendError(f"{artifact} holds a {type(loaded).__name__}, not a state dict")
    try:
        cls = import_object(opts.module, "torch module")
    except GraphError as e:
        raise BackendError(f"options.module: {e}") from None
    try:
        module = cls(**opts.module_kwargs)
        module.load_state_dict(loaded)
    except Exception as e:
        raise BackendError(f"options.module {opts.module}: cannot take {artifact}: {e}") from None
    return module.eval().to(device)


def _how(fmt: str) -> str:
    return "weights-only (a state dict)" if fmt == "state_dict" else "as a trusted pickle"


def _trust_hint(error: Exception, trusted: bool) -> str:
    if trusted or "weights_only" not in str(error).lower():
        return ""
    return " (loads in a factory are weights-only unless the model says trust_artifact: true)"


def _require_zip(artifact: Path, fmt: str) -> None:
    """Every torch format is a zip archive; anything else is refused before torch guesses."""
    if not zipfile.is_zipfile(artifact):
        kind = {
            "torchscript": "TorchScript archive",
            "export": "torch.export .pt2 program",
        }.get(fmt, "torch.save archive")
        raise BackendError(
            f"{artifact} is not a {kind} (not a zip archive); give the torch backend a .pt "
            "(TorchScript) or .pt2 file, a state dict with options.module, or options.factory"
        )
