"""An artifact's SHA-256: a file's as sha256sum prints it, a folder's from its files."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from backends.artifacts import artifact_sha256


def test_a_file_digest_is_its_bytes(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"model bytes")
    assert artifact_sha256(path) == hashlib.sha256(b"model bytes").hexdigest()


def test_a_folder_digest_is_the_sorted_listing_sha256sum_prints(tmp_path: Path) -> None:
    folder = tmp_path / "saved"
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"graph")
    (folder / "variables" / "variables.index").write_bytes(b"index")
    (folder / "B.txt").write_bytes(b"upper case sorts first in C order")
    digest = artifact_sha256(folder)
    if shutil.which("sha256sum") is None:
        pytest.skip("sha256sum is not installed")
    listing = subprocess.run(
        "find . -type f | sed 's|^./||' | LC_ALL=C sort | xargs sha256sum",
        shell=True, cwd=folder, capture_output=True, check=True,
    ).stdout  # fmt: skip
    assert digest == hashlib.sha256(listing).hexdigest()
    (folder / "variables" / "variables.index").write_bytes(b"changed")
    assert artifact_sha256(folder) != digest
