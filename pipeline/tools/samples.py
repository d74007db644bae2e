"""Real photos to send as requests: scikit-image's sample images, encoded as JPEG.

Each sample comes with the ImageNet classes a correct classifier puts first, so the
demo and the end-to-end tests can check answers, not just counts.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from schemas.errors import KpError

__all__ = [
    "SAMPLES",
    "SAMPLE_TEXTS",
    "Sample",
    "load_image_files",
    "mixed_texts",
    "sample_jpegs",
]


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


# Texts for the text demo and tests: mixed lengths (3 to ~90 tokens), in pairs that mean
# the same thing in other words, so a working embedding model shows it: each text's
# nearest neighbour is its pair.
SAMPLE_TEXTS: dict[str, str] = {
    "cat-1": "A cat sleeps on the mat.",
    "cat-2": "A kitten is napping on a rug.",
    "kafka-1": "Kafka keeps the backlog as consumer lag.",
    "kafka-2": "Unprocessed messages stay in the topic, visible as the consumer group's lag.",
    "weather-1": (
        "The forecast for tomorrow calls for heavy rain in the morning, strong winds along "
        "the coast in the afternoon, and clearing skies with cooler temperatures by the evening."
    ),
    "weather-2": (
        "Expect a wet start tomorrow with downpours before noon; gusty coastal winds follow "
        "later in the day, then the clouds break and it turns colder at night."
    ),
    "gpu-1": (
        "Preprocessing images on the GPU avoids copying decoded pixels back to the host: the "
        "decoder, the resize and the normalisation run on the same CUDA stream as the model, "
        "and the tensor is handed to the runtime through DLPack without a copy. On a CPU the "
        "same steps run with Pillow and NumPy, which is where most of the time goes when the "
        "model itself is small."
    ),
    "gpu-2": (
        "When images are decoded, resized and normalised on the graphics card, the pixels never "
        "travel back to main memory; every step shares the model's CUDA stream and passes the "
        "tensor on through DLPack. Without a GPU the same work is done by Pillow and NumPy on "
        "the processor, and for a small model that work dominates the cost."
    ),
}


def mixed_texts(n: int, seed: int = 11) -> list[str]:
    """The sample texts, then texts of 2 to 90 words drawn from their words (fixed seed)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = " ".join(SAMPLE_TEXTS.values()).split()
    out = list(SAMPLE_TEXTS.values())[:n]
    while len(out) < n:
        k = int(rng.choice([2, 5, 12, 25, 50, 90]))
        out.append(" ".join(rng.choice(words, k)))
    return out


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
