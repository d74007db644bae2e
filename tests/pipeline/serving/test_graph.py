"""Building the graph: stages, loaded models and declared inputs checked before consuming."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from backends.artifacts import artifact_sha256
from backends.onnx_runtime import OnnxRuntimeBackend
from pipeline.config.loader import load_topology
from pipeline.serving.graph import ServedModel, build_graph, close_graph
from schemas.errors import BackendError, ConfigError, GraphError
from schemas.tensors import TensorSpec
from stages.base import StageParams

ROOT = Path(__file__).resolve().parents[3]
MODELS = ROOT / "models"
TINY_ONNX = MODELS / "tiny_mlp.onnx"
EFFNET_ONNX = MODELS / "efficientnet_lite0.onnx"

TINY = """
topics: {input: [in], output: out, dead_letter: dlq}
models:
  - name: tiny
    backend: onnxruntime
    artifact: ARTIFACT
    instances: 2
    options: {intra_op_threads: 1}
    inputs:
      - {name: x, datatype: FP32, shape: [64]}
    batching: {max_batch_size: 64}
    preprocess: []
    postprocess:
      - {stage: softmax, input: logits, output: probs}
      - {stage: topk, input: probs, k: 3}
"""

pytestmark = pytest.mark.skipif(
    not TINY_ONNX.exists(), reason="models/tiny_mlp.onnx missing: run `kp-pipeline models export`"
)


def _build(tmp_path: Path, text: str, artifact: Path = TINY_ONNX) -> list[ServedModel]:
    path = tmp_path / "t.yaml"
    path.write_text(text.replace("ARTIFACT", str(artifact)))
    return build_graph(load_topology(path, env={}), str(path), tmp_path)


def _error(tmp_path: Path, old: str, new: str, artifact: Path = TINY_ONNX) -> str:
    assert old in TINY
    with pytest.raises(GraphError) as e:
        _build(tmp_path, TINY.replace(old, new), artifact)
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 't.yaml'}: models[0]")
    return message


def _fixed_batch_copy(tmp_path: Path, batch: int) -> Path:
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(TINY_ONNX))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = batch
    path = tmp_path / "fixed.onnx"
    onnx.save(model, str(path))
    return path


def test_tiny_topology_builds_with_checked_specs(tmp_path: Path) -> None:
    [model] = _build(tmp_path, TINY)
    assert model.name == "tiny"
    assert len(model.instances) == 2
    assert model.info.inputs == {"x": TensorSpec("FP32", (64,))}
    assert model.info.outputs == {"logits": TensorSpec("FP32", (10,))}
    assert model.info.max_batch_size is None
    assert model.inputs == {"x": TensorSpec("FP32", (64,))}
    assert model.outputs == {
        "classes": TensorSpec("INT64", (3,)),
        "scores": TensorSpec("FP32", (3,)),
    }
    assert [s.name for s in model.postprocess] == ["softmax", "topk"]
    model.close()
    for backend in model.instances:
        with pytest.raises(BackendError, match="before load"):
            backend.infer({})


@pytest.mark.image_model
@pytest.mark.skipif(
    not EFFNET_ONNX.exists(),
    reason="models/efficientnet_lite0.onnx missing: run `kp-pipeline models export`",
)
def test_auto_devices_are_placed_and_say_how(tmp_path: Path) -> None:
    """No NVML here: placement leaves ``auto`` to the runtime, which picks the CPU."""
    graph = _build(tmp_path, TINY.replace("instances: 2", "instances: 2\n    device: auto"))
    try:
        assert graph[0].devices == ["cpu", "cpu"]
        assert graph[0].placement[0].startswith("auto: left to the runtime (")
    finally:
        close_graph(graph)


def test_versions_of_one_model_are_built_under_name_at_version(tmp_path: Path) -> None:
    second = TINY[TINY.index("  - name: tiny") :].replace(
        "name: tiny", "name: tiny\n    version: '2'"
    )
    text = TINY + second + "versions: {tiny: {default: '1'}}\n"
    graph = _build(tmp_path, text)
    try:
        assert [(m.name, m.settings.name, m.settings.version) for m in graph] == [
            ("tiny@1", "tiny", "1"),
            ("tiny@2", "tiny", "2"),
        ]
    finally:
        close_graph(graph)


def test_demo_topology_builds(tmp_path: Path) -> None:
    path = ROOT / "topology.yaml"
    [model] = build_graph(load_topology(path, env={}), str(path), ROOT)
    try:
        assert model.inputs == {"image": TensorSpec("BYTES", (1,))}
        assert model.info.inputs == {"input": TensorSpec("FP32", (3, 224, 224))}
        assert model.info.outputs == {"logits": TensorSpec("FP32", (1000,))}
        assert [s.name for s in model.preprocess] == [
            "decode_image",
            "resize",
            "center_crop",
            "normalize",
            "to_nchw",
        ]
        assert model.outputs == {
            "classes": TensorSpec("INT64", (5,)),
            "scores": TensorSpec("FP32", (5,)),
            "labels": TensorSpec("BYTES", (5,)),
        }
    finally:
        model.close()


def test_missing_model_file(tmp_path: Path) -> None:
    message = _error(tmp_path, "ARTIFACT", str(tmp_path / "nope.onnx"))
    assert f"models[0].artifact: no such file {tmp_path / 'nope.onnx'}" in message
    assert "kp-pipeline models export" in message


def test_a_pinned_sha256_loads_the_right_file_and_refuses_another(tmp_path: Path) -> None:
    right = artifact_sha256(TINY_ONNX)
    pinned = TINY.replace("    instances: 2\n", f"    instances: 1\n    sha256: {right}\n")
    for model in _build(tmp_path, pinned):
        model.close()
    changed = tmp_path / "tampered.onnx"
    changed.write_bytes(TINY_ONNX.read_bytes() + b"\0")
    message = _error(
        tmp_path, "    instances: 2\n", f"    instances: 1\n    sha256: {right}\n", changed
    )
    assert f"models[0].sha256: {changed} has SHA-256 {artifact_sha256(changed)}" in message
    assert f"the topology expects {right}. Refusing to load it" in message


def test_a_sha256_that_is_not_one_is_refused_naming_the_field(tmp_path: Path) -> None:
    text = TINY.replace("    instances: 2\n", "    sha256: abc123\n")
    path = tmp_path / "t.yaml"
    path.write_text(text.replace("ARTIFACT", str(TINY_ONNX)))
    with pytest.raises(ConfigError, match=r"models\[0\]\.sha256: String should match pattern"):
        load_topology(path, env={})


def test_non_onnx_model_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    message = _error(tmp_path, "ARTIFACT", str(junk))
    assert "models[0] (tiny): " in message
    assert "is not a loadable ONNX model" in message


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "{stage: softmax, input: logits, output: probs}",
            "{stage: sofmax, input: logits}",
            "models[0].postprocess[0].stage: unknown stage 'sofmax' (known: ",
        ),
        (
            "preprocess: []",
            "preprocess:\n      - {stage: cast, input: x, datatype: FP32}\n"
            "      - {stage: center_crop, sizee: 3}",
            "models[0].preprocess[1].sizee: unknown parameter",
        ),
        (
            "{stage: topk, input: probs, k: 3}",
            "{stage: topk, input: probs, k: 0}",
            "models[0].postprocess[1].k: Input should be greater than or equal to 1",
        ),
        (
            "{stage: topk, input: probs, k: 3}",
            "{stage: 'no.such.module:Stage'}",
            "postprocess[1].stage: stage 'no.such.module:Stage': cannot import no.such.module",
        ),
        (
            "backend: onnxruntime",
            "backend: tensorflowlite",
            "models[0].backend: unknown backend 'tensorflowlite' (known: ",
        ),
        (
            "options: {intra_op_threads: 1}",
            "options: {threads: 1}",
            "models[0] (tiny): onnxruntime options",
        ),
    ],
)
def test_unknown_stages_parameters_and_backends(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    assert message in _error(tmp_path, old, new)


def test_unknown_parameter_lists_every_problem_of_the_stage(tmp_path: Path) -> None:
    text = (
        "preprocess:\n      - {stage: cast, input: x, datatype: FP32}\n"
        "      - {stage: center_crop, sizee: 3}"
    )
    lines = _error(tmp_path, "preprocess: []", text).splitlines()
    assert sorted(line.split(": ", 1)[1] for line in lines) == [
        "models[0].preprocess[1].size: required, missing",
        "models[0].preprocess[1].sizee: unknown parameter",
    ]


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "datatype: FP32, shape: [64]",
            "datatype: FP32, shape: [63]",
            "models[0] (tiny): input 'x' is FP32[63] after preprocessing; the model wants FP32[64]",
        ),
        (
            "preprocess: []",
            "preprocess: [{stage: cast, input: x, datatype: FP64}]",
            "input 'x' is FP64[64] after preprocessing; the model wants FP32[64]",
        ),
        (
            "{name: x, datatype: FP32",
            "{name: y, datatype: FP32",
            "the model needs input 'x' FP32[64]; after preprocessing the batch has y FP32[64]",
        ),
        (
            "preprocess: []",
            "preprocess: [{stage: rename, input: x, output: features}]",
            "the model needs input 'x' FP32[64]; after preprocessing the batch has features",
        ),
        (
            "      - {name: x, datatype: FP32, shape: [64]}",
            "      - {name: x, datatype: FP32, shape: [64]}\n"
            "      - {name: mask, datatype: INT8, shape: [64]}",
            "'mask' reach the model but it has no such input (it takes x FP32[64])",
        ),
        (
            "preprocess: []",
            "preprocess: [{stage: decode_image, input: x}]",
            "models[0].preprocess[0] (decode_image): decode_image: 'x' must be BYTES[1], "
            "got FP32[64]",
        ),
        (
            "{stage: topk, input: probs, k: 3}",
            "{stage: topk, input: probs, k: 11}",
            "models[0].postprocess[1] (topk): topk: k=11 is more than the 10 classes of 'probs'",
        ),
        (
            "{stage: topk, input: probs, k: 3}",
            "{stage: topk, input: logits, k: 3}",
            "postprocess[1] (topk): topk: needs column 'logits', but the batch has "
            "x FP32[64], probs FP32[10]",
        ),
    ],
)
def test_chains_that_do_not_fit_the_model(tmp_path: Path, old: str, new: str, message: str) -> None:
    assert message in _error(tmp_path, old, new)


def test_labels_that_do_not_match_the_classes(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("a\nb\nc\n")
    new = "{stage: topk, input: probs, k: 3, labels: labels.txt}"  # relative to the topology
    message = _error(tmp_path, "{stage: topk, input: probs, k: 3}", new)
    assert "models[0].postprocess[1] (topk): topk: 3 labels for 10 classes in 'probs'" in message


def test_missing_labels_file(tmp_path: Path) -> None:
    new = "{stage: topk, input: probs, k: 3, labels: nope.txt}"
    message = _error(tmp_path, "{stage: topk, input: probs, k: 3}", new)
    assert (
        f"models[0].postprocess[1] (topk): topk: cannot read labels {tmp_path / 'nope.txt'}"
        in message
    )


def test_labels_file_with_the_right_count_builds(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("".join(f"class {i}\n" for i in range(10)) + "\n\n")
    text = TINY.replace(
        "{stage: topk, input: probs, k: 3}", "{stage: topk, input: probs, k: 3, labels: labels.txt}"
    )
    [model] = _build(tmp_path, text)
    assert model.outputs["labels"] == TensorSpec("BYTES", (3,))
    model.close()


def test_batch_size_above_a_fixed_model_batch(tmp_path: Path) -> None:
    fixed = _fixed_batch_copy(tmp_path, 8)
    message = _error(tmp_path, "max_batch_size: 64", "max_batch_size: 9", artifact=fixed)
    assert "models[0].batching.max_batch_size: 9 is more than the model accepts (8)" in message
    [model] = _build(tmp_path, TINY.replace("max_batch_size: 64", "max_batch_size: 8"), fixed)
    assert model.info.max_batch_size == 8
    model.close()


def _record_load_and_unload(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[list[OnnxRuntimeBackend], list[OnnxRuntimeBackend]]:
    loaded: list[OnnxRuntimeBackend] = []
    unloaded: list[OnnxRuntimeBackend] = []
    original_load, original_unload = OnnxRuntimeBackend.load, OnnxRuntimeBackend.unload

    def load(self: OnnxRuntimeBackend, *args: Any) -> Any:
        loaded.append(self)
        return original_load(self, *args)

    def unload(self: OnnxRuntimeBackend) -> None:
        unloaded.append(self)
        original_unload(self)

    monkeypatch.setattr(OnnxRuntimeBackend, "load", load)
    monkeypatch.setattr(OnnxRuntimeBackend, "unload", unload)
    return loaded, unloaded


def test_a_failing_model_releases_the_models_built_before_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded, unloaded = _record_load_and_unload(monkeypatch)
    second = TINY[TINY.index("  - name: tiny") :].replace("name: tiny", "name: tiny2")
    second = second.replace("k: 3}", "k: 30}")
    with pytest.raises(GraphError, match=r"models\[1\]\.postprocess\[1\] \(topk\)"):
        _build(tmp_path, TINY + second)
    assert len(loaded) == 4
    first_model = {id(b) for b in loaded[:2]}
    assert first_model <= {id(b) for b in unloaded}


def test_a_model_failing_its_checks_unloads_its_own_instances(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded, unloaded = _record_load_and_unload(monkeypatch)
    _error(tmp_path, "datatype: FP32, shape: [64]", "datatype: FP32, shape: [63]")
    assert len(loaded) == 2
    assert {id(b) for b in unloaded} == {id(b) for b in loaded}


def test_a_backend_raising_anything_is_refused_naming_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A third-party backend may raise any exception at load; it is still a clean refusal."""
    loaded, unloaded = _record_load_and_unload(monkeypatch)
    real_load = OnnxRuntimeBackend.load

    def second_fails(self: OnnxRuntimeBackend, spec: Any, device: str) -> Any:
        info = real_load(self, spec, device)
        if len(loaded) == 2:
            raise RuntimeError("driver went away")
        return info

    monkeypatch.setattr(OnnxRuntimeBackend, "load", second_fails)
    message = _error(tmp_path, "instances: 2", "instances: 2")
    assert message.endswith("models[0] (tiny): RuntimeError: driver went away")
    assert {id(b) for b in unloaded} == {id(loaded[0])}


def test_instances_that_load_different_signatures_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_load = OnnxRuntimeBackend.load
    calls: list[int] = []

    def drifting(self: OnnxRuntimeBackend, spec: Any, device: str) -> Any:
        info = real_load(self, spec, device)
        calls.append(1)
        if len(calls) == 2:
            return type(info)({"x": TensorSpec("FP32", (32,))}, info.outputs)
        return info

    monkeypatch.setattr(OnnxRuntimeBackend, "load", drifting)
    message = _error(tmp_path, "instances: 2", "instances: 2")
    assert "models[0] (tiny): instance 1 on cpu loaded a different signature" in message


class _Recording:
    """A pass-through stage that remembers the context it was set up with."""

    Params = StageParams
    name = "record"

    def __init__(self, params: Any) -> None:
        self.ctx: Any = None
        self.closed = False

    def signature(self, inputs: Any) -> dict[str, TensorSpec]:
        return dict(inputs)

    def setup(self, ctx: Any) -> None:
        self.ctx = ctx

    def process(self, batch: Any) -> Any:
        return batch

    def close(self) -> None:
        self.closed = True


class _StreamedBackend(OnnxRuntimeBackend):
    """ONNX Runtime on the CPU, pretending to own a CUDA stream (as on a GPU)."""

    @property
    def stream(self) -> Any:
        return ("stream", id(self))


def _with_recording(monkeypatch: pytest.MonkeyPatch, backend: type | None = None) -> None:
    import pipeline.serving.graph as graph_module

    real_stage, real_backend = graph_module.stage_class, graph_module.backend_class
    monkeypatch.setattr(
        graph_module, "stage_class", lambda n: _Recording if n == "record" else real_stage(n)
    )
    if backend is not None:
        monkeypatch.setattr(graph_module, "backend_class", lambda n: backend)
    else:
        monkeypatch.setattr(graph_module, "backend_class", real_backend)


def test_cpu_instances_each_get_their_own_preprocess_stages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each instance preprocesses on its own thread: no stage object is used by two."""
    _with_recording(monkeypatch)
    (graph,) = _build(tmp_path, TINY.replace("preprocess: []", "preprocess: [{stage: record}]"))
    try:
        first, second = graph.stages_for(0)[0], graph.stages_for(1)[0]
        assert graph.stages_for(0) is graph.preprocess  # the checked set serves the first
        assert first is not second
        assert first.ctx.stream is None  # type: ignore[attr-defined]
    finally:
        graph.close()
    assert first.closed  # type: ignore[attr-defined]
    assert second.closed  # type: ignore[attr-defined]


def test_instances_with_streams_get_their_own_stages_on_their_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _with_recording(monkeypatch, _StreamedBackend)
    (graph,) = _build(tmp_path, TINY.replace("preprocess: []", "preprocess: [{stage: record}]"))
    try:
        first, second = graph.stages_for(0)[0], graph.stages_for(1)[0]
        assert first is not second
        for i, stage in enumerate((first, second)):
            assert stage.ctx.stream == graph.instances[i].stream  # type: ignore[attr-defined]
            assert stage.ctx.device == graph.devices[i]  # type: ignore[attr-defined]
    finally:
        graph.close()
    assert first.closed  # type: ignore[attr-defined]
    assert second.closed  # type: ignore[attr-defined]


class _TwoStreamBackend(_StreamedBackend):
    """Pretending to own two streams, as a GPU instance does (`backends.streams`)."""

    @property
    def preprocess_stream(self) -> Any:
        return ("preprocess stream", id(self))


def test_gpu_instances_preprocess_on_their_preprocess_stream_not_the_inference_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _with_recording(monkeypatch, _TwoStreamBackend)
    (graph,) = _build(tmp_path, TINY.replace("preprocess: []", "preprocess: [{stage: record}]"))
    try:
        for i in range(2):
            ctx = graph.stages_for(i)[0].ctx  # type: ignore[attr-defined]
            backend = graph.instances[i]
            assert ctx.stream == backend.preprocess_stream  # type: ignore[attr-defined]
            assert ctx.stream != backend.stream  # type: ignore[attr-defined]
    finally:
        graph.close()


class _OnGpu(_Recording):
    """A pass-through stage that says it leaves device arrays, as a GPU stage on CUDA does."""

    name = "on_gpu"
    leaves_device_arrays = True


def _with_gpu_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.serving.graph as graph_module

    real_stage = graph_module.stage_class
    stages = {"record": _Recording, "on_gpu": _OnGpu}
    monkeypatch.setattr(graph_module, "stage_class", lambda n: stages.get(n) or real_stage(n))


def test_a_stage_that_cannot_take_device_arrays_after_one_that_leaves_them_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _with_gpu_stage(monkeypatch)
    chain = "preprocess: [{stage: on_gpu}, {stage: scale, input: x}, {stage: record}]"
    message = _error(tmp_path, "preprocess: []", chain)
    assert "models[0].preprocess[2] (record): cannot take device arrays" in message
    assert "preprocess[0] (on_gpu) leaves its output on the GPU" in message


def test_stages_that_take_device_arrays_may_follow_a_gpu_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _with_gpu_stage(monkeypatch)
    chain = (
        "preprocess: [{stage: record}, {stage: on_gpu}, {stage: scale, input: x}, "
        "{stage: pad_crop, input: x, shape: [64]}, {stage: cast, input: x, datatype: FP32}, "
        "{stage: rename, input: x, output: x}]"
    )
    (graph,) = _build(tmp_path, TINY.replace("preprocess: []", chain))
    graph.close()


def test_only_the_plugins_the_topology_names_are_imported(tmp_path: Path) -> None:
    """Building a graph imports the named backend and stages, no other installed plugin."""
    import subprocess
    import sys

    path = tmp_path / "t.yaml"
    path.write_text(TINY.replace("ARTIFACT", str(TINY_ONNX)))
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from pipeline.config.loader import load_topology\n"
        "from pipeline.serving.graph import build_graph\n"
        f"graph = build_graph(load_topology(Path({str(path)!r}), env={{}}), 't', Path('.'))\n"
        "print(sorted(m for m in sys.modules if m.startswith(('backends.', 'stages.'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    loaded = done.stdout.strip()
    assert "backends.onnx_runtime" in loaded
    for other in ("backends.torch_runtime", "backends.tensorflow_runtime",
                  "backends.tensorrt_runtime", "stages.preprocess.image_dali",
                  "stages.preprocess.image"):  # fmt: skip
        assert other not in loaded, loaded


class _ColdBackend(OnnxRuntimeBackend):
    """Loads like ONNX Runtime; its first batch (the warm-up) raises."""

    def infer(self, inputs: Any) -> Any:
        raise RuntimeError("CUDA error: out of memory")


def test_a_failing_warm_up_refuses_a_model_only_where_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.serving.graph import build_model

    _with_recording(monkeypatch, _ColdBackend)
    (graph,) = _build(tmp_path, TINY)  # at start: only cold, served anyway
    graph.close()
    path = tmp_path / "t.yaml"
    settings = load_topology(path, env={}).models[0]
    with pytest.raises(GraphError, match="warm-up batch failed: RuntimeError: CUDA error"):
        build_model(settings, "load 2", tmp_path, strict_warm_up=True)  # while serving


def test_left_out_backend_and_inputs_come_from_the_artifact_and_the_model(tmp_path: Path) -> None:
    text = TINY.replace("    backend: onnxruntime\n", "").replace(
        "    inputs:\n      - {name: x, datatype: FP32, shape: [64]}\n", ""
    )
    (graph,) = _build(tmp_path, text)
    try:
        assert graph.backend == "onnxruntime"
        assert graph.backend_chosen is not None
        assert "an ONNX model" in graph.backend_chosen
        assert graph.inputs == graph.info.inputs  # what requests carry: the model's own
    finally:
        graph.close()
    (named,) = _build(tmp_path, TINY)
    named.close()
    assert named.backend_chosen is None  # the topology named it


def test_left_out_inputs_are_refused_where_preprocessing_changes_the_request(
    tmp_path: Path,
) -> None:
    text = TINY.replace("    inputs:\n      - {name: x, datatype: FP32, shape: [64]}\n", "")
    text = text.replace("preprocess: []", "preprocess: [{stage: cast, input: x, datatype: FP32}]")
    with pytest.raises(GraphError, match=r"models\[0\]\.inputs: needed, because preprocess"):
        _build(tmp_path, text)
    unknown = tmp_path / "weights.bin"
    unknown.write_bytes(b"not a model at all")
    with pytest.raises(GraphError, match=r"models\[0\]\.backend: cannot tell which backend"):
        _build(tmp_path, TINY.replace("    backend: onnxruntime\n", ""), unknown)


def test_a_tabular_model_refuses_declared_inputs_that_are_not_its_features(
    tmp_path: Path,
) -> None:
    artifact = MODELS / "breast_cancer_xgb.ubj"
    if not artifact.exists():
        pytest.skip("models/breast_cancer_xgb.ubj missing: run `kp-pipeline models export`")
    text = """
topics: {input: [in], output: out, dead_letter: dlq}
models:
  - name: cancer
    artifact: ARTIFACT
    inputs: [{name: features, datatype: FP32, shape: [29]}]
"""
    with pytest.raises(GraphError, match=r"input 'features' is FP32\[29\].*wants FP32\[30\]"):
        _build(tmp_path, text, artifact)
    named = text.replace(
        "    inputs: [{name: features, datatype: FP32, shape: [29]}]\n",
        "    options: {features: named}\n"
        "    inputs: [{name: radius, datatype: FP32, shape: [1]}]\n",
    )
    with pytest.raises(GraphError, match=r"the model needs input 'mean radius' FP32\[1\]"):
        _build(tmp_path, named, artifact)
