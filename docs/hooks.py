"""MkDocs hooks: the reference pages are generated at every build (`pipeline.tools.docgen`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

from pipeline.tools.docgen import pages, results

ROOT = Path(__file__).resolve().parents[1]


def on_files(files: Files, config: Any) -> Files:
    """Add the generated pages, made from the code and the results as they are now."""
    for path, content in {**pages(), **results(ROOT)}.items():
        files.append(File.generated(config, path, content=content))
    return files
