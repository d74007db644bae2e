"""Torch modules and factories for the artifact-trust tests (importable as ``torch_models``).

``Boom`` is a pickle that runs code when unpickled: it touches the file its ``path`` names,
a harmless stand-in for what a hostile file would run.
"""

from __future__ import annotations

import pathlib
from pathlib import Path
from typing import Any

import torch


class TinyMLP(torch.nn.Sequential):
    """The tiny MLP's layers (names 0 and 2, as tiny_mlp.pth's state dict has them)."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))


class Boom:
    """Unpickling this touches ``path``: code run by loading a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (self.path,))


def unsafe_factory(artifact: Path) -> torch.nn.Module:
    """A factory that unpickles its artifact without restriction, as old code does."""
    torch.load(artifact, weights_only=False)
    return TinyMLP()
