"""Building and checking the graph before anything is consumed.

For each model: construct its stages from their own parameter sections, load one backend
instance per ``instances``, then walk the specs: declared request inputs → preprocess
stages → the loaded model's inputs; the model's outputs → postprocess stages → what the
result publishes. Any mismatch is a `GraphError` naming the file, the model and the step.

So is a preprocess stage that cannot take device arrays after one that leaves them (a GPU
stage: ``dali_image`` or ``normalize_nchw`` on CUDA): it would fail every batch as
``preprocess_failed``. Checked once the stages are set up (they know their device then),
for each instance's own set.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from backends.artifacts import artifact_sha256
from backends.base import Backend, ModelInfo, ModelSpec
from backends.detect import detect
from backends.registry import backend_class
from pipeline.config.topology import ModelSettings, StageSettings, Topology
from pipeline.serving.placement import apply_placement, place
from pipeline.serving.versions import version_key
from schemas.errors import GraphError, KpError, describe, error_message, format_path
from schemas.tensors import TensorSpec, numpy_dtype
from stages.base import Stage, StageContext
from stages.registry import stage_class

__all__ = ["ServedModel", "build_graph", "build_model", "close_graph"]

log = logging.getLogger(__name__)

# A first preprocess stage may choose each request's batch (a text length bucket) at
# routing time; it raises a `RequestError` to refuse the request there.
Bucketer = Callable[[Mapping[str, Any]], Hashable]


@dataclass
class ServedModel:
    """One model, ready to serve: stages set up, instances loaded, specs checked."""

    settings: ModelSettings
    preprocess: list[Stage]
    postprocess: list[Stage]
    instances: list[Backend]
    info: ModelInfo
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    devices: list[str]
    bucketer: Bucketer | None = None
    # Per instance, its own preprocess stages, set up on its device and CUDA stream;
    # empty means every instance uses ``preprocess``.
    instance_preprocess: list[list[Stage]] = field(default_factory=list)
    # Why placement put the instances where they are (empty: as the topology wrote).
    placement: list[str] = field(default_factory=list)
    # What the pipeline serves it under: its name, or name@version where the topology
    # serves the name in several versions (`pipeline.serving.versions`).
    key: str = ""
    # The backend that serves it, and why when it was chosen from the artifact.
    backend: str = ""
    backend_chosen: str | None = None

    def stages_for(self, instance: int) -> list[Stage]:
        """The preprocess stages for a batch going to ``instance``."""
        if self.instance_preprocess:
            return self.instance_preprocess[instance]
        return self.preprocess

    @property
    def name(self) -> str:
        """The key it is served under: batchers, runtimes and metrics' ``model`` label.

        The topology's name, or ``name@version`` for a model served in several versions;
        results and dead letters carry the name and version themselves (``settings``).
        """
        return self.key or self.settings.name

    def describe(self) -> list[str]:
        """For people (``validate``): signature, backend and placement, one line each."""
        more = f", … ({len(self.inputs)} inputs)" if len(self.inputs) > 6 else ""
        ins = ", ".join(f"{k} {v}" for k, v in list(self.inputs.items())[:6]) + more
        outs = ", ".join(f"{k} {v}" for k, v in self.outputs.items())
        s = self.settings
        lines = [f"{s.name} v{s.version} ({self.backend} on {', '.join(self.devices)}): "
                 f"{ins} → {outs}"]  # fmt: skip
        if self.backend_chosen:
            lines.append(
                f"  backend {self.backend}, chosen from the artifact: {self.backend_chosen}"
            )
        if self.info.feature_names and s.inputs is None:
            lines.append(f"  features, in order: {', '.join(self.info.feature_names)}")
        return lines + [f"  placed: {note}" for note in self.placement]

    def close(self) -> None:
        """Close stages and unload instances."""
        lists = {id(x): x for x in [self.preprocess, *self.instance_preprocess]}
        for stage in [*(s for x in lists.values() for s in x), *self.postprocess]:
            stage.close()
        for backend in self.instances:
            backend.unload()


def build_graph(topology: Topology, source: str, base_dir: Path) -> list[ServedModel]:
    """Place, then build every model of the topology; on any error, release what was built."""
    placement = place(topology, source)
    apply_placement(placement)  # before any model starts CUDA
    versions = Counter(m.name for m in topology.models)
    built: list[ServedModel] = []
    try:
        for i, settings in enumerate(topology.models):
            model = build_model(
                settings, f"{source}: models[{i}]", base_dir, devices=placement.devices[i]
            )
            model.placement = placement.notes[i]
            model.key = version_key(settings.name, settings.version, versions[settings.name])
            built.append(model)
    except BaseException:
        close_graph(built)
        raise
    return built


def close_graph(graph: Sequence[ServedModel]) -> None:
    """Release every model of a graph."""
    for model in graph:
        model.close()


def _check_artifact(settings: ModelSettings, where: str) -> None:
    """The artifact is there, and is the file the topology pins (``sha256``) if it does."""
    if not settings.artifact.exists():
        raise GraphError(
            f"{where}.artifact: no such file {settings.artifact} (the demo and benchmark "
            "models are made by `kp-pipeline models export`)"
        )
    if settings.sha256 is not None:
        actual = artifact_sha256(settings.artifact)
        if actual != settings.sha256:
            raise GraphError(
                f"{where}.sha256: {settings.artifact} has SHA-256 {actual}; the topology "
                f"expects {settings.sha256}. Refusing to load it"
            )


def build_model(
    settings: ModelSettings,
    where: str,
    base_dir: Path,
    devices: list[str] | None = None,
    strict_warm_up: bool = False,
) -> ServedModel:
    """Build and check one model; ``where`` prefixes error messages.

    ``devices`` are the instances' places (`pipeline.serving.placement`); by default the
    topology's own, which must then need no placing (no ``auto`` spreading, no UUIDs).
    ``strict_warm_up``: a warm-up batch that fails refuses the model (a version loaded
    while serving must prove it runs before it may take traffic).
    """
    _check_artifact(settings, where)
    wanted = devices if devices is not None else settings.instance_devices()
    ctx = StageContext(model=settings.name, device=wanted[0], base_dir=base_dir)
    pre = _stages(settings.preprocess, f"{where}.preprocess", ctx)
    post = _stages(settings.postprocess, f"{where}.postprocess", ctx)
    backend_name, chosen, cls = _backend(settings, where)
    instances: list[Backend] = []
    placed: list[str] = []
    try:
        spec = ModelSpec(
            settings.name, settings.artifact, settings.options, settings.trust_artifact
        )
        info: ModelInfo | None = None
        for i, device in enumerate(wanted):
            backend = cls()
            loaded = backend.load(spec, device)
            instances.append(backend)
            if info is not None and (loaded.inputs, loaded.outputs) != (info.inputs, info.outputs):
                raise GraphError(f"instance {i} on {device} loaded a different signature")
            info = info or loaded
            placed.append(loaded.device)
            _warm_up(backend, loaded, settings.name, strict_warm_up)
        assert info is not None
    except Exception as e:  # a third-party backend may raise anything: refuse, naming it
        for b in instances:
            b.unload()
        for stage in [*pre, *post]:
            stage.close()
        detail = str(e) if isinstance(e, KpError) else describe(e)
        raise GraphError(f"{where} ({settings.name}): {detail}") from None

    try:
        declared = _declared(settings, info, pre, where)
        _bind(pre, info, f"{where}.preprocess")
        specs = _walk(pre, declared, f"{where}.preprocess")
        _check_model_inputs(specs, info, f"{where} ({settings.name})")
        if (
            info.max_batch_size is not None
            and settings.batching.max_batch_size > info.max_batch_size
        ):
            raise GraphError(
                f"{where}.batching.max_batch_size: {settings.batching.max_batch_size} is more "
                f"than the model accepts ({info.max_batch_size})"
            )
        # Postprocess sees the model's outputs and the columns that fed it (a mask, say);
        # only the outputs and what postprocessing made are published.
        walked = _walk(post, {**specs, **info.outputs}, f"{where}.postprocess")
        outputs = {k: v for k, v in walked.items() if k in info.outputs or k not in specs}
    except BaseException:
        for b in instances:
            b.unload()
        raise
    try:
        per_instance = _instance_stages(
            settings, (pre, wanted[0]), instances, placed, where, base_dir, info
        )
    except BaseException:
        for b in instances:
            b.unload()
        for stage in post:
            stage.close()
        raise
    pre = per_instance[0]
    bucketer = pre[0].bucket_key if pre and hasattr(pre[0], "bucket_key") else None
    served = ServedModel(
        settings, pre, post, instances, info, declared, outputs, placed, bucketer, per_instance
    )
    served.backend, served.backend_chosen = backend_name, chosen
    return served


def _backend(settings: ModelSettings, where: str) -> tuple[str, str | None, Any]:
    """The backend's name, why it was chosen (None: the topology named it) and its class."""
    name, chosen = settings.backend, None
    try:
        if name is None:
            name, chosen = detect(settings.artifact)
        return name, chosen, backend_class(name)
    except GraphError as e:
        raise GraphError(f"{where}.backend: {e}") from None


def _declared(
    settings: ModelSettings, info: ModelInfo, pre: Sequence[Stage], where: str
) -> dict[str, TensorSpec]:
    """What requests must carry: the topology's ``inputs``, else the model's own."""
    if settings.inputs is not None:
        return {i.name: i.spec() for i in settings.inputs}
    if pre:
        raise GraphError(
            f"{where}.inputs: needed, because preprocess stages change what reaches the model "
            "(declare what requests carry)"
        )
    return dict(info.inputs)


def _instance_stages(
    settings: ModelSettings,
    checked_on: tuple[list[Stage], str],
    instances: Sequence[Backend],
    placed: Sequence[str],
    where: str,
    base_dir: Path,
    info: ModelInfo,
) -> list[list[Stage]]:
    """Preprocess stages for each instance, on the device it landed on and its stream.

    On a GPU the stages get the instance's preprocess stream, not the one it infers on
    (`backends.streams`). Every instance gets stage objects of its own: each instance
    preprocesses on its own
    thread (`pipeline.serving.runtime`), and a stage need not be thread-safe (a DALI
    pipeline fed from two threads handed one batch's images to another's requests).
    ``checked_on``: the stages set up before loading (to refuse bad parameters before a
    long load) and the device they were set up for; they are the first instance's when
    that was the CPU and the instance runs there without a stream.
    """
    checked, checked_device = checked_on
    out: list[list[Stage]] = []
    reusable = checked_device == "cpu"
    for i, (backend, device) in enumerate(zip(instances, placed, strict=True)):
        stream = _preprocess_stream(backend)
        if i == 0 and reusable and device == "cpu" and stream is None:
            out.append(checked)
            continue
        ctx = StageContext(settings.name, device, stream, base_dir)
        stages = _stages(settings.preprocess, f"{where}.preprocess", ctx)
        _bind(stages, info, f"{where}.preprocess")
        out.append(stages)
    if all(x is not checked for x in out):
        for stage in checked:
            stage.close()
    return out


def _preprocess_stream(backend: Backend) -> Any:
    """The stream an instance's GPU preprocessing runs on; None on a CPU.

    A backend with two streams (`backends.devices.StreamOwner`) names its preprocess
    stream, ordered before its inference stream by events (`backends.streams`); one with a
    single ``stream`` (a plugin) has its preprocessing queued on that stream, in order.
    """
    stream = getattr(backend, "preprocess_stream", None)
    return stream if stream is not None else getattr(backend, "stream", None)


def _bind(stages: Sequence[Stage], info: ModelInfo, where: str) -> None:
    """Tell stages that adapt to the loaded model (bucket edges from its profiles)."""
    for i, stage in enumerate(stages):
        bind = getattr(stage, "bind_model", None)
        if bind is None:
            continue
        try:
            bind(info)
        except GraphError as e:
            raise GraphError(f"{where}[{i}] ({stage.name}): {e}") from None


def _check_device_arrays(stages: Sequence[Stage], where: str) -> None:
    """Refuse a stage that cannot take device arrays after one that leaves them.

    Decided by the order alone: once a stage leaves device arrays, every later stage must
    take them (``takes_device_arrays``), whichever columns it reads. A stage that does not
    say (a plugin, a host-only stage) is taken for one that copies its input to the host,
    which a CuPy array refuses.
    """
    source: tuple[int, Stage] | None = None
    for i, stage in enumerate(stages):
        if source is not None and not getattr(stage, "takes_device_arrays", False):
            j, gpu = source
            raise GraphError(
                f"{where}[{i}] ({stage.name}): cannot take device arrays, and {where}[{j}] "
                f"({gpu.name}) leaves its output on the GPU as one; move {stage.name} before "
                f"{gpu.name}, or use stages that take device arrays (cast, scale, pad_crop, "
                "rename)"
            )
        if source is None and getattr(stage, "leaves_device_arrays", False):
            source = (i, stage)


def _warm_up(backend: Backend, info: ModelInfo, name: str, strict: bool = False) -> None:
    """Run one zero batch, so the first real batch does not pay for lazy initialisation.

    Measured on the demo model: the first ONNX Runtime call took ~450 ms, later ones ~20.
    A model that refuses zeros is not an error at start (it only stays cold); ``strict``
    makes it one.
    """
    feeds = {}
    for input_name, spec in info.inputs.items():
        if spec.datatype == "BYTES":
            return
        shape = (1, *(1 if d is None else d for d in spec.shape))
        feeds[input_name] = np.zeros(shape, dtype=numpy_dtype(spec.datatype))
    try:
        backend.infer(feeds)
    except Exception as e:
        if strict:
            raise GraphError(f"warm-up batch failed: {describe(e)}") from None
        log.info("model %s: warm-up batch failed (%s); first batch will be slower", name, e)


def _stages(items: Sequence[StageSettings], where: str, ctx: StageContext) -> list[Stage]:
    stages: list[Stage] = []
    for i, item in enumerate(items):
        here = f"{where}[{i}]"
        try:
            cls = stage_class(item.stage)
        except GraphError as e:
            raise GraphError(f"{here}.stage: {e}") from None
        try:
            params = cls.Params.model_validate(item.params)
        except ValidationError as e:
            errs = e.errors()
            lines = [
                f"{here}.{format_path(err['loc'])}: {error_message(err, 'unknown parameter')}"
                for err in errs
            ]
            raise GraphError("\n".join(lines)) from None
        try:
            stage: Stage = cls(params)
            stage.setup(ctx)
        except GraphError as e:
            raise GraphError(f"{here} ({item.stage}): {e}") from None
        stages.append(stage)
    try:
        _check_device_arrays(stages, where)
    except GraphError:
        for stage in stages:
            stage.close()
        raise
    return stages


def _walk(
    stages: Sequence[Stage], specs: Mapping[str, TensorSpec], where: str
) -> dict[str, TensorSpec]:
    current = dict(specs)
    for i, stage in enumerate(stages):
        try:
            current = stage.signature(current)
        except GraphError as e:
            raise GraphError(f"{where}[{i}] ({stage.name}): {e}") from None
    return current


def _check_model_inputs(specs: Mapping[str, TensorSpec], info: ModelInfo, where: str) -> None:
    for name, want in info.inputs.items():
        have = specs.get(name)
        if have is None:
            raise GraphError(
                f"{where}: the model needs input {name!r} {want}; after preprocessing the "
                f"batch has {_list(specs)}"
            )
        if not have.fits(want):
            raise GraphError(
                f"{where}: input {name!r} is {have} after preprocessing; the model wants {want}"
            )
    extra = sorted(set(specs) - set(info.inputs))
    if extra:
        raise GraphError(
            f"{where}: {', '.join(map(repr, extra))} reach the model but it has no such input "
            f"(it takes {_list(info.inputs)})"
        )


def _list(specs: Mapping[str, TensorSpec]) -> str:
    return ", ".join(f"{k} {v}" for k, v in specs.items()) or "nothing"
