"""Build of the compiled hot paths; everything else is in pyproject.toml.

schemas/_codec_fast.pyx is the codec's, pipeline/engine/_rows_fast.pyx the Kafka loop's
per-record passes, pipeline/serving/_batch_rows_fast.pyx a finished batch's per-row
passes, pipeline/kafka/_batch_producer.pyx the at-least-once producer. Each extension
is optional: where no C compiler or Python headers exist, the build warns and installs
without it, and the pure-Python reference serves instead (confluent-kafka's producer for
the last) (`schemas.codec.COMPILED`, `pipeline.engine.rows.COMPILED`,
`pipeline.serving.batch_rows.COMPILED`, `pipeline.kafka.batch_producer.COMPILED` say
which). Cython and NumPy come from the
build-system requirements, so a normal ``pip install`` (or ``pip install -e .``, which
builds the modules in place, beside the .pyx) compiles them.
"""

from __future__ import annotations

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

CODEC = Extension(
    "schemas._codec_fast",
    ["schemas/_codec_fast.pyx"],
    include_dirs=[np.get_include()],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)

ROWS = Extension("pipeline.engine._rows_fast", ["pipeline/engine/_rows_fast.pyx"])

BATCH_ROWS = Extension(
    "pipeline.serving._batch_rows_fast",
    ["pipeline/serving/_batch_rows_fast.pyx"],
    include_dirs=[np.get_include()],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)

# The at-least-once producer: librdkafka (confluent-kafka's copy) driven from C, found at
# run time, so it needs no librdkafka headers here (pipeline/kafka/batch_producer.py).
PRODUCER = Extension("pipeline.kafka._batch_producer", ["pipeline/kafka/_batch_producer.pyx"])

extensions = cythonize([CODEC, ROWS, BATCH_ROWS, PRODUCER], language_level=3, quiet=True)
for ext in extensions:
    # cythonize() returns new Extension objects without `optional` (Cython 3.3): set it
    # here, or a machine without gcc fails the whole install instead of skipping this one.
    ext.optional = True

setup(ext_modules=extensions)
