"""TensorFlow: SavedModel directories, served through one of their signatures.

Options (the model's ``options`` section in topology.yaml):

- ``signature``: the SavedModel signature to serve (default ``serving_default``).
- ``intra_op_threads``: threads inside one operator (0 = TensorFlow decides).
- ``inter_op_threads``: threads across independent operators (0 = TensorFlow decides).
- ``memory_growth``: (default true) let TensorFlow take GPU memory as it needs it. Left
  off, TensorFlow reserves nearly all of every GPU's memory when its runtime starts, and
  any other GPU work in the process (another backend, GPU preprocessing) runs out.

TensorFlow's thread pools and GPU memory settings are process-wide and fixed once its
runtime has started (the first op, tensor or loaded model; on a machine with GPUs that
start also claims their memory, whatever device the model is placed on). These options
are therefore applied by the first TensorFlow model that loads in the process, to every
GPU TensorFlow sees (it requires one setting for all); a later model asking for a
different value cannot get it, and a warning says so once per setting rather than
failing the load. Memory growth was written against TensorFlow's documented
``tf.config.experimental.set_memory_growth`` and has not run on a GPU here.

TensorFlow is imported inside the methods: importing it takes seconds, and the CLI, the
registry and ``kp-pipeline backends`` import this module without serving a TF model.

On ``cuda:N`` the model's variables and ops are placed on ``/GPU:N``, and the instance
owns a CUDA stream (`backends.devices.InstanceStream`), which the graph gives its GPU
preprocessing. Device arrays on a GPU enter through ``tf.experimental.dlpack.from_dlpack``
without a copy, unless their data is not 64-byte aligned (TF aborts the process on such
pointers; see `_ALIGN`), when the producer is asked for a fresh copy first.

That hand-off is ordered on the host (`backends.streams`: TF is the backend that cannot
keep the event rule). TF's ``from_dlpack`` takes a capsule and nothing about streams: it
neither passes a stream to ``__dlpack__`` nor waits for one, and its kernels read the
memory on TF's own (non-blocking) streams, which nothing orders after the producer's
kernels, and TF takes no external stream or event. So the host waits on the batch's
``ready`` event (recorded on the instance's preprocess stream after its stages) before
TF sees the batch: this instance's preprocessing of this batch and nothing else on the
device. A copy made for alignment is ordered with ``__dlpack__(stream=<the inference
stream>)`` (the DLPack protocol: the producer makes that stream wait for its current
stream) and a wait for that stream. TF's ``.numpy()`` of the outputs is its own
synchronous copy. A device array reaching an instance
without a stream (placed on the CPU, or neither CuPy nor PyTorch installed) is refused.
That GPU path was written against TensorFlow's, CuPy's and PyTorch's documented APIs
and has not run on the project's machines (tensorflow-cpu, no GPU there). DLPack arrays
in host memory (a CPU torch tensor) go through NumPy, and the tests cover them, aligned
and not.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from backends.base import ModelInfo, ModelSpec, Probe, TensorBatch
from backends.devices import StreamOwner, resolve_device
from backends.options import StrictOptions, parse_options
from schemas.devices import is_device_array
from schemas.errors import BackendError
from schemas.tensors import TensorSpec, oip_datatype_named

__all__ = ["TensorFlowBackend", "TensorFlowOptions"]

log = logging.getLogger(__name__)

# TensorFlow's C++ runtime logs banners (oneDNN, CPU features) to stderr at import; keep
# kp-pipeline's output readable unless the user asked for them.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_INSTALL_HINT = "pip install 'kp-pipeline[tensorflow]'"

_DL_CPU = 1  # DLPack's kDLCPU device type
_ALIGN = 64
"""Bytes TF's kernels expect tensor data to be aligned to (EIGEN_MAX_ALIGN_BYTES, AVX-512
builds). TF does not check a DLPack pointer: an unaligned one fails a CHECK inside a
kernel later, which aborts the whole process rather than raising."""

_warned: set[str] = set()
"""Thread settings already warned about: the conflict is per process, so say it once."""


class TensorFlowOptions(StrictOptions):
    """The backend's own section of a model's settings."""

    signature: str = "serving_default"
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    memory_growth: bool = True


class TensorFlowBackend(StreamOwner):
    """One loaded SavedModel signature: one model instance (with a CUDA stream on a GPU)."""

    Options = TensorFlowOptions  # the model's ``options`` section (docs, ``kp-pipeline schema``)

    def __init__(self) -> None:
        self._model: Any = None
        self._fn: Any = None
        self._name = ""
        self._tf_device = "/CPU:0"
        self._inputs: list[str] = []
        self._outputs: list[str] = []

    @classmethod
    def probe(cls) -> Probe:
        """Whether tensorflow imports, its version, and the GPUs it sees."""
        try:
            import tensorflow as tf
        except ImportError as e:
            return Probe(False, f"tensorflow does not import ({e}): {_INSTALL_HINT}")
        gpus = tf.config.list_physical_devices("GPU")
        seen = f"{len(gpus)} GPU(s)" if gpus else "no GPU, CPU only"
        return Probe(True, f"tensorflow {tf.__version__}, {seen}")

    def load(self, spec: ModelSpec, device: str) -> ModelInfo:
        """Load the SavedModel on ``device`` and read the signature's inputs and outputs."""
        try:
            import tensorflow as tf
        except ImportError as e:
            raise BackendError(f"tensorflow does not import ({e}): {_INSTALL_HINT}") from None
        try:
            opts = parse_options(TensorFlowOptions, spec, "tensorflow")
            gpus = len(tf.config.list_physical_devices("GPU"))  # does not start the runtime
            placed = resolve_device(device, gpus, "tensorflow")
        except BackendError as e:
            raise BackendError(f"{e}") from None
        # Before anything that starts TF's runtime (placing, loading), or it is too late.
        _apply_threads(tf, opts)
        _apply_memory_growth(tf, opts.memory_growth)
        tf_device = "/CPU:0" if placed == "cpu" else f"/GPU:{placed.partition(':')[2]}"

        path: Path = spec.artifact
        where = str(path)
        if not path.exists():
            raise BackendError(
                f"{where} does not exist (expected a TensorFlow SavedModel directory)"
            )
        if not path.is_dir() or not tf.saved_model.contains_saved_model(str(path)):
            raise BackendError(
                f"{where} is not a TensorFlow SavedModel directory "
                "(expected a folder with saved_model.pb and variables/)"
            )
        try:
            with tf.device(tf_device):
                model = tf.saved_model.load(str(path))
        except Exception as e:
            raise BackendError(f"{where}: the SavedModel does not load: {e}") from None
        signatures = dict(model.signatures)
        fn = signatures.get(opts.signature)
        if fn is None:
            known = ", ".join(sorted(signatures)) or "none"
            raise BackendError(
                f"{where}: no signature {opts.signature!r}; the SavedModel has: {known}"
            )
        inputs, outputs = _signature(fn, f"{where}: signature {opts.signature!r}")

        # Keep the loaded object as well as its signature: it owns the variables, and
        # unload() dropping both is what frees them.
        self._model, self._fn, self._name, self._tf_device = model, fn, spec.name, tf_device
        self._inputs, self._outputs = list(inputs), list(outputs)
        if placed != "cpu":
            self._open_stream(int(placed.partition(":")[2] or 0))
        return ModelInfo(
            {k: v for k, (v, _) in inputs.items()},
            {k: v for k, (v, _) in outputs.items()},
            _max_batch([batch for _, batch in inputs.values()]),
            placed,
        )

    def infer(self, batch: TensorBatch) -> dict[str, np.ndarray[Any, Any]]:
        """Run the signature on one batch; device arrays enter through DLPack, uncopied."""
        if self._fn is None:
            raise BackendError("infer() before load()")
        import tensorflow as tf

        missing = [k for k in self._inputs if k not in batch]
        if missing:
            raise BackendError(f"model {self._name!r}: batch lacks input(s) {missing}")
        if self._pipeline is not None and any(_on_gpu(batch[k]) for k in self._inputs):
            # TF takes no stream or event of ours: the host waits for the batch's `ready`
            # event (its preprocessing), for this batch only, before TF may read it.
            self._pipeline.wait_ready_on_host()
        try:
            with tf.device(self._tf_device):
                feeds = {k: _to_tensor(tf, batch[k], self._stream) for k in self._inputs}
                results = self._fn(**feeds)
        except (tf.errors.OpError, TypeError, ValueError) as e:
            raise BackendError(f"model {self._name!r}: tensorflow: {e}") from None
        return {k: results[k].numpy() for k in self._outputs}

    def unload(self) -> None:
        """Drop the model; TF frees its variables once nothing references them."""
        self._model = self._fn = None
        self._inputs, self._outputs = [], []
        self._close_stream()


def _apply_threads(tf: Any, opts: TensorFlowOptions) -> None:
    """Set the process-wide thread pools if TF's runtime has not started yet; else warn."""
    threading = tf.config.threading
    for option, wanted, setting in (
        ("intra_op_threads", opts.intra_op_threads, "intra_op_parallelism_threads"),
        ("inter_op_threads", opts.inter_op_threads, "inter_op_parallelism_threads"),
    ):
        current = getattr(threading, f"get_{setting}")()
        if wanted in (0, current):
            continue
        try:
            getattr(threading, f"set_{setting}")(wanted)
        except RuntimeError:
            if option not in _warned:
                _warned.add(option)
                log.warning(
                    "tensorflow: %s=%d ignored: the runtime already started in this process "
                    "with %d (0 = TF's default); thread pools are process-wide, so only the "
                    "first TensorFlow model loaded can set them",
                    option,
                    wanted,
                    current,
                )


def _apply_memory_growth(tf: Any, wanted: bool) -> None:
    """Set memory growth on every GPU before TF's runtime starts; after, warn once."""
    experimental = tf.config.experimental
    gpus = tf.config.list_physical_devices("GPU")
    # None (never set) is TF's default: off.
    if all(bool(experimental.get_memory_growth(gpu)) == wanted for gpu in gpus):
        return
    try:
        for gpu in gpus:
            experimental.set_memory_growth(gpu, wanted)
    except (RuntimeError, ValueError) as e:
        # RuntimeError: the GPUs are initialised already; ValueError: virtual devices
        # were configured on them. Either way the setting cannot change any more.
        if "memory_growth" not in _warned:
            _warned.add("memory_growth")
            log.warning(
                "tensorflow: memory_growth=%s ignored: %s; GPU memory settings are "
                "process-wide, so only the first TensorFlow model loaded can set them",
                str(wanted).lower(),
                e,
            )


def _signature(
    fn: Any, where: str
) -> tuple[dict[str, tuple[TensorSpec, int | None]], dict[str, tuple[TensorSpec, int | None]]]:
    """Each input's and output's spec per row, with its fixed batch size (or None)."""
    args, kwargs = fn.structured_input_signature
    if args:
        raise BackendError(
            f"{where} takes positional inputs; a served signature must take named "
            "(keyword) inputs, as signatures saved with tf.saved_model.save do"
        )
    outs = fn.structured_outputs
    if not isinstance(outs, dict):
        raise BackendError(f"{where} returns {type(outs).__name__}, expected a dict of tensors")
    inputs = {name: _spec(s, f"{where}: input {name!r}") for name, s in kwargs.items()}
    outputs = {name: _spec(s, f"{where}: output {name!r}") for name, s in outs.items()}
    return inputs, outputs


def _spec(tensor: Any, where: str) -> tuple[TensorSpec, int | None]:
    datatype = oip_datatype_named(getattr(getattr(tensor, "dtype", None), "name", ""))
    if datatype is None:
        raise BackendError(f"{where}: unsupported type {getattr(tensor, 'dtype', tensor)}")
    dims = tensor.shape.as_list() if tensor.shape.rank is not None else None
    if not dims:
        raise BackendError(f"{where}: shape {tensor.shape} has no batch dimension")
    return TensorSpec(datatype, tuple(dims[1:])), dims[0]


def _max_batch(batch_dims: list[int | None]) -> int | None:
    """The largest batch every input accepts: only fixed when all inputs fix it."""
    if not batch_dims or any(d is None for d in batch_dims):
        return None
    return min(d for d in batch_dims if d is not None)


def _on_gpu(x: Any) -> bool:
    """Whether ``x`` is a device array in GPU memory (not a CPU torch tensor)."""
    if not is_device_array(x):
        return False
    return (x.__dlpack_device__()[0] if hasattr(x, "__dlpack_device__") else _DL_CPU) != _DL_CPU


def _to_tensor(tf: Any, x: Any, stream: Any) -> Any:
    """A TF tensor over ``x``; a device array's writes are finished before TF sees it.

    The batch's preprocessing was waited for already (``ready``, in `infer`); what is
    left to order is a copy made here.
    """
    if not is_device_array(x):
        return tf.convert_to_tensor(x)
    if not _on_gpu(x):
        # Host memory: NumPy views it without a copy and TF copies what it must, whereas
        # from_dlpack would hand TF an unaligned pointer and abort the process.
        return tf.convert_to_tensor(np.from_dlpack(x))
    if stream is None:
        raise BackendError(
            "a CUDA array reached a TensorFlow instance with no CUDA stream of its own "
            "(placed on the CPU, or neither CuPy nor PyTorch installed), so nothing can "
            "order its hand-off: TF could read it before it is written"
        )
    interface = getattr(x, "__cuda_array_interface__", None)
    copied = interface is not None and interface["data"][0] % _ALIGN
    if interface is not None and copied:
        # A view at an odd offset: a fresh allocation on the same device is aligned. The
        # copy runs on this thread's current stream, after the data it reads was written.
        copy = getattr(x, "clone", None) or getattr(x, "copy", None)  # torch / CuPy
        if copy is None:
            raise BackendError(f"a device array at {interface['data'][0]:#x} is not aligned")
        x = copy()
    # The producer orders what its current stream still has to write (the copy) before
    # our stream; waiting for our stream then waits for the copy. Without a copy there is
    # nothing left to wait for.
    capsule = x.__dlpack__(stream=stream.cuda_stream)
    if copied:
        stream.synchronize()
    return tf.experimental.dlpack.from_dlpack(capsule)
