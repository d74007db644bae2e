"""A model artifact's SHA-256: checked before anything loads it (``sha256:`` per model).

A file's digest is the SHA-256 of its bytes, as ``sha256sum`` prints it. A directory (a
TensorFlow SavedModel) has no single byte stream, so its digest is the SHA-256 of one line
per file, sorted by path: ``<sha256 of the file>  <path relative to the directory>``
and a newline, which is what ``sha256sum`` prints for the directory's files listed in
sorted order from inside it, hashed once more. ``kp-pipeline models sha256 PATH`` prints
either kind.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["artifact_sha256"]

_CHUNK = 1 << 20


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def artifact_sha256(path: Path) -> str:
    """The digest of a model file, or of a model directory's files (see the module)."""
    if not path.is_dir():
        return _file_sha256(path)
    files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file())
    listing = "".join(f"{_file_sha256(p)}  {rel}\n" for rel, p in files)
    return hashlib.sha256(listing.encode()).hexdigest()
