"""Real photos to send as requests: scikit-image's sample images, encoded as JPEG.

Each sample comes with the ImageNet classes a correct classifier puts first, so the
demo and the end-to-end tests can check answers, not just counts.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pipeline.errors import KpError

__all__ = ["SAMPLES", "Sample", "load_image_files", "sample_jpegs"]


@dataclass(frozen=True)
class Sample:
    """A named photo and the ImageNet class indices accepted as its top-1."""

    name: str
    loader: str
    expected: frozenset[int]


SAMPLES = [
    # tabby, tiger cat, Egyptian cat
    Sample("cat", "chelsea", frozenset({281, 282, 285})),
    # espresso, cup, coffee mug
    Sample("coffee", "coffee", frozenset({967, 968, 504})),
    # missile, projectile, space shuttle
    Sample("rocket", "rocket", frozenset({657, 744, 812})),
]


def sample_jpegs(quality: int = 90) -> dict[str, bytes]:
    """The sample photos as JPEG bytes, by name."""
    try:
        from skimage import data
    except ImportError:
        raise KpError(
            "sample photos need scikit-image: pip install 'kp-pipeline[models]'"
        ) from None
    out = {}
    for s in SAMPLES:
        buf = io.BytesIO()
        Image.fromarray(getattr(data, s.loader)()).convert("RGB").save(buf, "JPEG", quality=quality)
        out[s.name] = buf.getvalue()
    return out


_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def load_image_files(paths: list[Path]) -> dict[str, bytes]:
    """Encoded image files (folders are searched one level deep), by file name."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in _IMAGE_SUFFIXES))
        else:
            files.append(p)
    if not files:
        raise KpError(f"no image files in {', '.join(map(str, paths))}")
    return {f.name: f.read_bytes() for f in files}
