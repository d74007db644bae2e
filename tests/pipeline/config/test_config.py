"""A model's ``retry`` section: defaults, the transient patterns, errors naming the field.

(Loading and interpolation are tested in test_loader.py; this file covers sections whose
rules live in pipeline/config/topology.py.)
"""

from __future__ import annotations

import pytest

from pipeline.config.loader import parse_topology
from pipeline.config.topology import RetrySettings
from schemas.errors import ConfigError

TOPOLOGY = """
topics: {input: [a], output: b, dead_letter: c}
models:
  - name: m
    backend: onnxruntime
    artifact: model.onnx
    inputs: [{name: x, datatype: FP32, shape: [4]}]
"""


def _with_retry(section: str) -> str:
    return TOPOLOGY + f"    retry: {section}\n"


def test_retry_defaults() -> None:
    [m] = parse_topology(TOPOLOGY, "topo.yaml", {}).models
    r = m.retry
    assert (r.max_attempts, r.backoff_ms, r.max_backoff_ms, r.split_on_failure) == (
        3,
        50.0,
        2000.0,
        True,
    )


def test_a_retry_section_is_read() -> None:
    text = _with_retry(
        "{max_attempts: 5, backoff_ms: 10, max_backoff_ms: 80, transient: [Busy], "
        "split_on_failure: false}"
    )
    [m] = parse_topology(text, "topo.yaml", {}).models
    assert m.retry == RetrySettings(
        max_attempts=5, backoff_ms=10, max_backoff_ms=80, transient=["Busy"], split_on_failure=False
    )
    assert m.retry.is_transient("RuntimeError: server busy")
    assert not m.retry.is_transient("RuntimeError: CUDA out of memory")  # replaced the default


@pytest.mark.parametrize(
    "error",
    [
        # torch
        "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 7.79 GiB "
        "total capacity; 5.66 GiB already allocated)",
        "RuntimeError: CUDA error: out of memory",
        "RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
        # TensorFlow
        "ResourceExhaustedError: OOM when allocating tensor with shape[256,112,112,64] and type "
        "float on /job:localhost/replica:0/task:0/device:GPU:0 by allocator GPU_0_bfc",
        "InternalError: Resource exhausted: OOM when allocating tensor",
        # onnxruntime's arena
        "RuntimeException: [ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code "
        "returned while running Conv node. Name:'Conv_3' Status Message: bfc_arena.cc:376 "
        "onnxruntime::BFCArena::AllocateRawInternal Failed to allocate memory for requested "
        "buffer of size 643840",
        # CUDA by name, the driver API, NumPy
        "CUDARuntimeError: cudaErrorMemoryAllocation: out of memory",
        "CUDADriverError: CUDA_ERROR_OUT_OF_MEMORY",
        "MemoryError: Unable to allocate 3.00 GiB for an array with shape (1024, 1024, 768)",
        "InferenceServerException: [StatusCode.RESOURCE_EXHAUSTED] queue full",
    ],
)
def test_the_default_patterns_know_each_backends_out_of_memory_errors(error: str) -> None:
    assert RetrySettings().is_transient(error)


@pytest.mark.parametrize(
    "error",
    [
        # onnxruntime's Gather on an id out of range: the request is poison, not the device.
        "InvalidArgument: [ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Non-zero status code "
        "returned while running Gather node. Name:'' Status Message: indices element out of "
        "data bounds, idx=100 must be within the inclusive range [-100,99]",
        "ValueError: no room for the zoom",  # "oom" alone would match
        "RuntimeError: shape mismatch",
    ],
)
def test_other_errors_are_not_transient(error: str) -> None:
    assert not RetrySettings().is_transient(error)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            "{max_attempts: 0}",
            "topo.yaml: models[0].retry.max_attempts: Input should be greater than or equal to 1",
        ),
        ("{max_atempts: 2}", "topo.yaml: models[0].retry.max_atempts: unknown key"),
        (
            "{backoff_ms: -1}",
            "topo.yaml: models[0].retry.backoff_ms: Input should be greater than or equal to 0",
        ),
        (
            "{backoff_ms: 500, max_backoff_ms: 100}",
            "topo.yaml: models[0].retry: max_backoff_ms (100) is below backoff_ms (500)",
        ),
        (
            "{transient: ['']}",
            "topo.yaml: models[0].retry.transient: an empty pattern would match every error",
        ),
        ("{transient: oom}", "topo.yaml: models[0].retry.transient: Input should be a valid list"),
        (
            "{split_on_failure: maybe}",
            "topo.yaml: models[0].retry.split_on_failure: Input should be a valid boolean",
        ),
    ],
)
def test_retry_errors_name_the_field(section: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_topology(_with_retry(section), "topo.yaml", {})
    assert message in str(e.value)


def test_max_age_and_a_late_topic_are_read() -> None:
    text = TOPOLOGY + "    max_age_ms: 1500\n    late_topic: too.late\n"
    [m] = parse_topology(text, "topo.yaml", {}).models
    assert (m.max_age_ms, m.late_topic) == (1500, "too.late")
    [plain] = parse_topology(TOPOLOGY, "topo.yaml", {}).models
    assert (plain.max_age_ms, plain.late_topic) == (None, None)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ("    max_age_ms: 0\n", "models[0].max_age_ms: Input should be greater than 0"),
        ("    late_topic: late\n", "models[0]: late_topic needs max_age_ms"),
        ("    max_age_ms: 10\n    late_topic: 'no spaces'\n",
         "models[0].late_topic: String should match pattern"),
    ],
)  # fmt: skip
def test_staleness_settings_that_cannot_work_are_refused(lines: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_topology(TOPOLOGY + lines, "topo.yaml", {})
    assert f"topo.yaml: {message}" in str(e.value)


def test_ordering_is_read_and_defaults_to_none() -> None:
    [m] = parse_topology(TOPOLOGY + "    ordering: key\n", "topo.yaml", {}).models
    assert m.ordering == "key"
    [plain] = parse_topology(TOPOLOGY, "topo.yaml", {}).models
    assert plain.ordering == "none"


def test_an_unknown_ordering_is_refused_naming_the_field_and_file() -> None:
    with pytest.raises(ConfigError) as e:
        parse_topology(TOPOLOGY + "    ordering: offset\n", "topo.yaml", {})
    assert "topo.yaml: models[0].ordering: Input should be 'none', 'partition' or 'key'" in str(
        e.value
    )


def test_scheduling_is_read() -> None:
    text = (
        "scheduling: {enabled: true, concurrency: 1, devices: {cuda:1: 3}}\n"
        + TOPOLOGY
        + "    scheduling: {priority: 7, weight: 2.5, max_concurrent: 1}\n"
    )
    topology = parse_topology(text, "topo.yaml", {})
    [m] = topology.models
    assert (m.scheduling.priority, m.scheduling.weight, m.scheduling.max_concurrent) == (7, 2.5, 1)
    assert topology.scheduling.concurrency_of("cpu") == 1
    assert topology.scheduling.concurrency_of("cuda:1") == 3
    assert not parse_topology(TOPOLOGY, "topo.yaml", {}).scheduling.enabled


@pytest.mark.parametrize(
    ("head", "lines", "message"),
    [
        ("scheduling: {enabled: true}\n", "    scheduling: {priority: 1001}\n",
         "models[0].scheduling.priority: Input should be less than or equal to 1000"),
        ("scheduling: {enabled: true}\n", "    scheduling: {weight: 0}\n",
         "models[0].scheduling.weight: Input should be greater than 0"),
        ("scheduling: {enabled: true}\n", "    scheduling: {max_concurrent: 0}\n",
         "models[0].scheduling.max_concurrent: Input should be greater than or equal to 1"),
        ("scheduling: {enabled: true}\n", "    scheduling: {tenant: a}\n",
         "models[0].scheduling.tenant: unknown key"),
        ("scheduling: {enabled: true, devices: {gpu0: 2}}\n", "",
         "scheduling.devices: 'gpu0' is not a device"),
        ("scheduling: {enabled: true, concurrency: 0}\n", "",
         "scheduling.concurrency: Input should be greater than or equal to 1"),
        ("", "    scheduling: {priority: 3}\n",
         "models[0].scheduling (m) is set but scheduling.enabled is false"),
    ],
)  # fmt: skip
def test_scheduling_that_cannot_work_is_refused_naming_the_field(
    head: str, lines: str, message: str
) -> None:
    with pytest.raises(ConfigError) as e:
        parse_topology(head + TOPOLOGY + lines, "topo.yaml", {})
    assert "topo.yaml" in str(e.value)
    assert message in str(e.value)
