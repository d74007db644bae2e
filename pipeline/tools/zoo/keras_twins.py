"""TensorFlow SavedModels of the tiny MLP and the small CNN, with the same weights.

The tensorflow backend is checked, and benchmarked, against the other runtimes on the
same networks: each export here is a Keras twin of a PyTorch/NumPy model whose weights
are copied in from `pipeline.tools.zoo.tiny.tiny_weights` and
`pipeline.tools.zoo.small_cnn.small_cnn_weights`, so results agree to float round-off and a
throughput comparison compares runtimes, not models.

Layout notes for the CNN: it takes NCHW like the PyTorch model (one request format for
every backend) and transposes to NHWC inside the graph, because TensorFlow's CPU
convolution kernels expect NHWC. PyTorch's ``padding=1`` pads one pixel on every side;
Keras' ``padding='same'`` on a stride-2 convolution of an even-sized input pads only
bottom/right, which shifts the sampling grid and gives different numbers. So every
convolution is an explicit ``ZeroPadding2D(1)`` followed by a ``'valid'`` ``Conv2D``.

Each SavedModel has one signature, ``serving_default``: keyword input ``x`` → dict
``{"logits": ...}``, with a free batch dimension, saved with ``tf.saved_model.save``
around a ``tf.function`` (not ``model.export``) so that the names are exactly these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.tools.zoo.small_cnn import (
    CNN_CHANNELS,
    CNN_CLASSES,
    CNN_SIZE,
    CNN_STRIDES,
    small_cnn_weights,
)
from pipeline.tools.zoo.tiny import TINY_HIDDEN, TINY_IN, TINY_OUT, tiny_weights

__all__ = ["export_small_cnn_savedmodel", "export_tiny_mlp_savedmodel"]


def _tiny_keras() -> Any:
    import keras

    w1, b1, w2, b2 = tiny_weights()
    model = keras.Sequential(
        [
            keras.Input((TINY_IN,), name="x"),
            keras.layers.Dense(TINY_HIDDEN, activation="relu"),
            keras.layers.Dense(TINY_OUT),
        ]
    )
    model.layers[0].set_weights([w1, b1])
    model.layers[1].set_weights([w2, b2])
    return model


def _small_cnn_keras() -> Any:
    import keras

    w = small_cnn_weights()
    layers: list[Any] = [
        keras.Input((3, CNN_SIZE, CNN_SIZE), name="x"),
        keras.layers.Permute((2, 3, 1)),
    ]
    convs: list[Any] = []
    for cout, stride in zip(CNN_CHANNELS[1:], CNN_STRIDES, strict=True):
        conv = keras.layers.Conv2D(cout, 3, strides=stride, padding="valid", activation="relu")
        layers += [keras.layers.ZeroPadding2D(1), conv]
        convs.append(conv)
    fc = keras.layers.Dense(CNN_CLASSES)
    model = keras.Sequential([*layers, keras.layers.GlobalAveragePooling2D(), fc])
    for i, conv in enumerate(convs):
        # PyTorch [out, in, kh, kw] → Keras [kh, kw, in, out]; both cross-correlate.
        conv.set_weights([w[f"conv{i}.weight"].transpose(2, 3, 1, 0), w[f"conv{i}.bias"]])
    fc.set_weights([w["fc.weight"].T, w["fc.bias"]])
    return model


def _save(model: Any, row_shape: tuple[int, ...], path: Path) -> Path:
    import tensorflow as tf

    module = tf.Module()
    module.model = model  # tracked, so its variables are saved with the signature

    def logits(x: Any) -> dict[str, Any]:
        return {"logits": model(x, training=False)}

    spec = tf.TensorSpec([None, *row_shape], tf.float32, name="x")
    serve = tf.function(logits, input_signature=[spec])
    module.serve = serve
    tf.saved_model.save(module, str(path), signatures={"serving_default": serve})
    return path


def export_tiny_mlp_savedmodel(out_dir: Path) -> Path:
    """``tiny_mlp.savedmodel/``: serving signature ``x`` FP32[N,64] → ``logits``."""
    return _save(_tiny_keras(), (TINY_IN,), out_dir / "tiny_mlp.savedmodel")


def export_small_cnn_savedmodel(out_dir: Path) -> Path:
    """``small_cnn.savedmodel/``: serving signature ``x`` FP32[N,3,64,64] → ``logits``."""
    return _save(_small_cnn_keras(), (3, CNN_SIZE, CNN_SIZE), out_dir / "small_cnn.savedmodel")
