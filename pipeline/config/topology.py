"""Pydantic models that mirror topology.yaml one to one.

Every section forbids unknown keys, so a typo is an error naming its path, not a
silently ignored setting. Stage and backend parameters are validated later, by the
stage's or backend's own model (each receives only its own section), when the graph is
built (`pipeline.serving.graph`).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from pipeline.config.kafka import KafkaSettings, SchemaRegistrySettings, SecuritySettings
from pipeline.config.scheduling import ModelScheduling, SchedulingSettings
from pipeline.config.versions import VersionTraffic, check_versions
from schemas.devices import DEVICE_FORMS, is_uuid_device, parse_device
from schemas.errors import BackendError
from schemas.tensors import DeclaredTensor

__all__ = [
    "BatchingSettings",
    "FlowSettings",
    "KafkaSettings",
    "LagControlSettings",
    "MetricsSettings",
    "ModelScheduling",
    "ModelSettings",
    "RetrySettings",
    "SchedulingSettings",
    "SchemaRegistrySettings",
    "SecuritySettings",
    "StageSettings",
    "TopicSettings",
    "Topology",
    "VersionTraffic",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class TopicSettings(_Strict):
    """The topics a topology reads and writes."""

    input: list[str] = Field(min_length=1)
    """The topics requests are consumed from (one consumer group reads them all)."""
    output: str
    """The topic results go to, unless a request names its own reply topic."""
    dead_letter: str
    """The topic refused requests go to, each with its reason (never dropped)."""
    replay_output: str | None = Field(
        None, description="Where `kp-pipeline replay` writes results (--output overrides)."
    )
    propagate_headers: list[str] = Field(
        default_factory=list,
        description="Request headers copied onto each request's result and dead letter "
        "(names, any case), beside the W3C traceparent and tracestate, which always are.",
    )
    encoding: dict[str, Literal["avro", "json", "protobuf"]] = Field(
        default_factory=dict,
        description="Input topics whose requests are not Avro: the Open Inference Protocol's "
        "v2 JSON body ('json', schemas/oip_json.py) or ModelInferRequest ('protobuf', "
        "schemas/oip_v2.proto). A record's content-type header (application/json, "
        "application/x-protobuf, application/avro) overrides its topic's.",
    )
    result_encoding: Literal["request", "avro", "json", "protobuf"] = Field(
        "request", description="Results in their request's encoding, or all in one."
    )
    control: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9._-]{1,249}$",
        description="The group's compacted control topic (model versions' traffic, "
        "kp-pipeline versions); default '<group_id>.control'.",
    )
    comparisons: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9._-]{1,249}$",
        description="Where a shadow version's comparisons go (versions.<model>.shadow); "
        "default '<output>.comparisons'.",
    )
    create: bool = Field(True, description="Create missing topics at start.")
    partitions: int = Field(4, ge=1, description="Partitions of topics created at start.")
    replication_factor: int = Field(1, ge=1)
    """Replicas of each topic created by the pipeline (topics.create)."""

    @model_validator(mode="after")
    def _encoded_topics_are_inputs(self) -> TopicSettings:
        unknown = sorted(set(self.encoding) - set(self.input))
        if unknown:
            raise ValueError(f"encoding names {unknown}, which are not input topics")
        return self


class FlowSettings(_Strict):
    """How much work may be in flight, and how often progress is committed.

    Above ``max_in_flight`` consumed-but-undelivered requests, or ``max_in_flight_bytes``
    of their record bytes, the consumer pauses its partitions; once both are back at or
    below their low marks (``resume_below``, ``resume_below_bytes``) it resumes. What is
    not pulled stays in Kafka as lag. The byte mark is what bounds memory when requests
    are large (images); the count mark bounds the work a crash would redo.

    After a resume the first records arrive in ~10–20 ms (the runner nudges librdkafka's
    fetcher; left alone it waited ~0.9 s, measured with librdkafka 2.16 on Tansu), so the
    low marks only need to hold that long of work. Each pause drops the records
    librdkafka had prefetched, which are fetched again after the resume: a wide gap
    between the marks (the default: half) keeps pauses rare.
    """

    max_in_flight: int = Field(2048, ge=1)
    """Requests consumed, not yet committed, above which partitions pause (bounds memory)."""
    resume_below: int | None = Field(None, ge=0, description="Default: half of max_in_flight.")
    max_in_flight_bytes: int = Field(
        256 * 2**20, ge=1024, description="Record bytes in flight above which partitions pause."
    )
    resume_below_bytes: int | None = Field(
        None, ge=0, description="Default: half of max_in_flight_bytes."
    )
    consume_batch: int = Field(500, ge=1, le=100_000)
    """Most records taken from librdkafka in one consume call."""
    poll_timeout_ms: int = Field(10, ge=1, description="Longest wait in one consume call.")
    commit_interval_ms: int = Field(500, ge=10)
    """How often delivered offsets are committed (and, exactly-once, transactions end)."""
    drain_timeout_s: float = Field(30.0, gt=0)
    """On SIGTERM or a revoke, how long in-flight work may take to finish and commit."""
    lag_interval_ms: int = Field(
        1000, ge=50, description="How often lag is measured and the batch control loop runs."
    )
    revoke_timeout_s: float = Field(
        10.0,
        ge=0,
        description="On a rebalance, how long in-flight work of revoked partitions may take "
        "to finish and be committed before the partitions are let go; what is left is "
        "served again by the new owner.",
    )

    @model_validator(mode="after")
    def _marks(self) -> FlowSettings:
        if self.resume_below is not None and self.resume_below >= self.max_in_flight:
            raise ValueError(
                f"resume_below ({self.resume_below}) must be below max_in_flight "
                f"({self.max_in_flight})"
            )
        if (
            self.resume_below_bytes is not None
            and self.resume_below_bytes >= self.max_in_flight_bytes
        ):
            raise ValueError(
                f"resume_below_bytes ({self.resume_below_bytes}) must be below "
                f"max_in_flight_bytes ({self.max_in_flight_bytes})"
            )
        return self

    @property
    def low_mark(self) -> int:
        """In-flight count under which paused partitions resume."""
        return self.max_in_flight // 2 if self.resume_below is None else self.resume_below

    @property
    def low_mark_bytes(self) -> int:
        """In-flight bytes under which paused partitions resume."""
        if self.resume_below_bytes is None:
            return self.max_in_flight_bytes // 2
        return self.resume_below_bytes


class TracingSettings(_Strict):
    """OpenTelemetry spans per request (needs ``pip install 'kp-pipeline[tracing]'``).

    Each request's span is a child of the trace its ``traceparent`` header names (a new
    trace when it has none), with one child span per phase: queue, preprocess, infer,
    postprocess, publish. Off by default; off costs one check per published batch.
    """

    enabled: bool = False
    """Trace requests (off: one check per published batch)."""
    exporter: Literal["otlp", "console", "global"] = Field(
        "otlp",
        description="otlp: OTLP/HTTP to `endpoint`; console: print spans; global: the "
        "process's own TracerProvider (when kp-pipeline is embedded, e.g. in Faust).",
    )
    endpoint: str | None = Field(
        None,
        description="OTLP/HTTP traces URL; default: $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, "
        "$OTEL_EXPORTER_OTLP_ENDPOINT or http://localhost:4318/v1/traces (OTel's own order).",
    )
    service_name: str = "kp-pipeline"
    """service.name on every span this pipeline exports."""
    sample_ratio: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Fraction of requests traced (each costs ~100 µs of the serving loop "
        "with its 6 spans, measured); a request whose traceparent is sampled always is.",
    )


class MetricsSettings(_Strict):
    """Where ``/metrics``, ``/healthz`` and ``/readyz`` are served (one HTTP port)."""

    enabled: bool = True
    """Serve the metrics and health endpoints."""
    host: str = Field("0.0.0.0", description="Interface to listen on; 127.0.0.1 keeps it local.")
    port: int = Field(9464, ge=0, le=65535, description="0 picks a free port (tests).")
    stale_after_s: float = Field(
        30.0, gt=0, description="/healthz fails when the main loop has not turned for this long."
    )


class LagControlSettings(_Strict):
    """The lag-driven batching control loop: trade latency for throughput under lag.

    While the oldest unserved request is older than ``lag_seconds`` and the lag is not
    falling, each control tick (``flow.lag_interval_ms``) doubles the batch size and
    delay limits, up to the ceilings here; once the lag is below a quarter of
    ``lag_seconds`` each tick halves them back to the configured ``max_batch_size`` and
    ``max_delay_ms``.
    """

    enabled: bool = True
    """Let lag raise the batch limits (up to the ceilings below)."""
    lag_seconds: float = Field(2.0, gt=0)
    """Age of the oldest unserved request above which the limits grow."""
    max_batch_size: int | None = Field(
        None, ge=1, description="Ceiling; default 8x max_batch_size, within the model's limit."
    )
    max_delay_ms: float | None = Field(
        None, ge=0, description="Ceiling; default 4x max_delay_ms, at least 20 ms."
    )


class BatchingSettings(_Strict):
    """A batch is flushed when it is full or its oldest request has waited max_delay_ms."""

    max_batch_size: int = Field(32, ge=1)
    """Most requests in one batch (within the model's own limit)."""
    max_delay_ms: float = Field(5.0, ge=0)
    """Longest a request waits for its batch to fill; 0: batch only what is there."""
    lag_control: LagControlSettings = LagControlSettings()

    @model_validator(mode="after")
    def _ceilings(self) -> BatchingSettings:
        c = self.lag_control
        if c.max_batch_size is not None and c.max_batch_size < self.max_batch_size:
            raise ValueError(
                f"lag_control.max_batch_size ({c.max_batch_size}) is below max_batch_size "
                f"({self.max_batch_size})"
            )
        if c.max_delay_ms is not None and c.max_delay_ms < self.max_delay_ms:
            raise ValueError(
                f"lag_control.max_delay_ms ({c.max_delay_ms}) is below max_delay_ms "
                f"({self.max_delay_ms})"
            )
        return self


# Case-insensitive substrings of "ExceptionType: message" that mean the device ran out of
# memory, as each backend words it. A bare "oom" would also match "room" or "zoom".
DEFAULT_TRANSIENT = (
    "out of memory",  # torch "CUDA out of memory. Tried to allocate", cudaErrorMemoryAllocation
    "OutOfMemoryError",  # torch.OutOfMemoryError (torch.cuda.OutOfMemoryError)
    "CUDA_ERROR_OUT_OF_MEMORY",  # the CUDA driver API (CuPy, Numba, TensorRT's log)
    "cudaErrorMemoryAllocation",  # the CUDA runtime API, by name
    "CUBLAS_STATUS_ALLOC_FAILED",  # cuBLAS could not allocate its workspace
    "CUDNN_STATUS_ALLOC_FAILED",
    "ResourceExhausted",  # TensorFlow's ResourceExhaustedError
    "Resource exhausted",  # TensorFlow's status text: "Resource exhausted: OOM when allocating"
    "OOM when allocating",
    "RESOURCE_EXHAUSTED",  # gRPC's status code (a remote Triton, say)
    "Failed to allocate memory",  # onnxruntime's BFCArena: "... for requested buffer of size"
    "MemoryError",  # Python's own, raised by NumPy: "Unable to allocate 3.00 GiB"
)


class RetrySettings(_Strict):
    """What to do when running a batch fails: retry what is transient, isolate what is not.

    A failure whose "ExceptionType: message" contains one of ``transient`` (any case) is
    retried on the same instance, the same batch, up to ``max_attempts`` runs in all,
    sleeping between runs a random time up to ``backoff_ms`` doubled per retry and capped
    at ``max_backoff_ms`` ("full jitter", as AWS's backoff article and librdkafka do: the
    instances that ran out of memory together do not retry together). Any other failure,
    or a transient one that outlasts its attempts, is treated as poison: with
    ``split_on_failure`` the batch is halved until the failing requests are alone (they
    become ``inference_failed`` dead letters, every other request gets its result);
    without it the whole batch becomes dead letters.
    """

    max_attempts: int = Field(
        3, ge=1, le=20, description="Runs of a batch failing transiently, the first included."
    )
    backoff_ms: float = Field(50.0, ge=0, description="Ceiling of the first retry's delay.")
    max_backoff_ms: float = Field(2000.0, ge=0, description="Ceiling of any retry's delay.")
    transient: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TRANSIENT),
        description='Case-insensitive substrings of "ExceptionType: message" that mark a '
        "failure worth retrying (default: the backends' out-of-memory errors). Replaces "
        "the default list; [] retries nothing.",
    )
    split_on_failure: bool = Field(
        True, description="Halve a failing batch to isolate the requests that fail it."
    )

    @field_validator("transient")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        if any(not p.strip() for p in v):
            raise ValueError("an empty pattern would match every error")
        return v

    @model_validator(mode="after")
    def _ceiling(self) -> RetrySettings:
        if self.max_backoff_ms < self.backoff_ms:
            raise ValueError(
                f"max_backoff_ms ({self.max_backoff_ms:g}) is below backoff_ms "
                f"({self.backoff_ms:g})"
            )
        return self

    def is_transient(self, error: str) -> bool:
        """Whether ``error`` ("ExceptionType: message") is worth running again."""
        text = error.casefold()
        return any(p.casefold() in text for p in self.transient)

    def backoff_s(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait after failed run ``attempt`` (1, 2, ...): "full jitter".

        Uniform between 0 and ``backoff_ms`` doubled per earlier retry, capped at
        ``max_backoff_ms``: instances that failed together spread their retries out.
        """
        ceiling = min(self.max_backoff_ms, self.backoff_ms * 2.0 ** min(attempt - 1, 30))
        return rng.uniform(0.0, ceiling) / 1000.0


class StageSettings(BaseModel):
    """``{stage: <name or module:Class>, <its parameters>...}``; parameters are the stage's."""

    model_config = ConfigDict(extra="allow", frozen=True, use_attribute_docstrings=True)

    stage: str
    """The stage: an entry-point name (kp-pipeline stages lists them) or module:Class."""

    @property
    def params(self) -> dict[str, Any]:
        """The stage's own section, without the ``stage`` key."""
        return dict(self.model_extra or {})


class ModelSettings(_Strict):
    """One served model: its runtime, artifact, inputs, batching and stages."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """What requests name in ``model``; results and metrics carry it."""
    version: str = "1"
    """This entry's version; a name listed several times serves them side by side."""
    backend: str | None = Field(
        None,
        description="Entry-point name (onnxruntime, torch, tensorflow, tensorrt, xgboost, "
        "lightgbm, sklearn) or 'module:Class'; left out, it is chosen from the artifact's "
        "content (validate says which and why).",
    )
    artifact: Path = Field(description="Model file, relative to the topology file.")
    device: str | list[str] = Field(
        "cpu",
        description="cpu | auto | cuda | cuda:N | GPU-<uuid> | MIG-<uuid>, or a list that "
        "instances take in turn (instances: 4 with [cuda:0, cuda:1] puts two on each GPU). "
        "auto spreads instances over the GPUs by free memory. A process uses one MIG slice "
        "(CUDA's rule): a list of slices is taken by --workers replicas in turn.",
    )
    instances: int = Field(1, ge=1, le=64, description="Model copies, each its own thread.")
    inputs: list[DeclaredTensor] | None = Field(
        None,
        min_length=1,
        description="What requests carry, per row. Left out: the model's own inputs, for a "
        "model without preprocess stages (a tabular model's features, say).",
    )
    batching: BatchingSettings = BatchingSettings()
    retry: RetrySettings = RetrySettings()
    preprocess: list[StageSettings] = Field(default_factory=list)
    postprocess: list[StageSettings] = Field(default_factory=list)
    max_age_ms: float | None = Field(
        None,
        gt=0,
        description="Staleness by event time: a request whose record timestamp is older than "
        "this when its batch forms gets an EXPIRED result without running.",
    )
    late_topic: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9._-]{1,249}$",
        description="Where results expired by max_age_ms go (default: the output topic, or "
        "the request's reply topic).",
    )
    scheduling: ModelScheduling = ModelScheduling()
    ordering: Literal["none", "partition", "key"] = Field(
        "none",
        description="Publish results in offset order per record key (key) or per partition "
        "(partition) while batches still mix keys; none: as soon as each is ready. Records "
        "without a key are not ordered under key.",
    )
    sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="The artifact's SHA-256 (kp-pipeline models sha256 PATH): checked before "
        "it loads; a mismatch refuses the model.",
    )
    trust_artifact: bool = Field(
        False,
        description="Let loading the artifact run code (a pickled torch module; a factory's "
        "torch.load without weights_only). Only for files you trust.",
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="The backend's own settings, checked by the backend."
    )

    @field_validator("device")
    @classmethod
    def _devices(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("name at least one device")
        for d in v if isinstance(v, list) else [v]:
            try:
                is_uuid_device(d) or parse_device(d)
            except BackendError:
                raise ValueError(f"{d!r} is not a device: {DEVICE_FORMS} (or a list)") from None
        return v

    @model_validator(mode="after")
    def _late_needs_an_age(self) -> ModelSettings:
        if self.late_topic is not None and self.max_age_ms is None:
            raise ValueError("late_topic needs max_age_ms: it is where requests too old go")
        return self

    def instance_devices(self) -> list[str]:
        """The device of each instance: a list is taken in turn, a single device by all."""
        devices = self.device if isinstance(self.device, list) else [self.device]
        return [devices[i % len(devices)] for i in range(self.instances)]


class Topology(_Strict):
    """The whole topology.yaml."""

    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings
    delivery: Literal["at_least_once", "exactly_once"] = Field(
        "at_least_once",
        description="at_least_once: an offset is committed after its outcome is "
        "acknowledged; a crash repeats at most what was in flight. exactly_once: outcomes "
        "and offsets are committed together in Kafka transactions; read_committed readers "
        "see each outcome once.",
    )
    flow: FlowSettings = FlowSettings()
    metrics: MetricsSettings = MetricsSettings()
    tracing: TracingSettings = TracingSettings()
    scheduling: SchedulingSettings = SchedulingSettings()
    models: list[ModelSettings] = Field(min_length=1)
    versions: dict[str, VersionTraffic] = Field(
        default_factory=dict,
        description="Per model name served in several versions: its default and canaries.",
    )

    @model_validator(mode="after")
    def _versions_fit_the_models(self) -> Topology:
        check_versions(self.models, self.versions)
        return self

    @model_validator(mode="after")
    def _scheduled_models_need_the_scheduler(self) -> Topology:
        if self.scheduling.enabled:
            return self
        for i, m in enumerate(self.models):
            if m.scheduling != ModelScheduling():
                raise ValueError(
                    f"models[{i}].scheduling ({m.name}) is set but scheduling.enabled is "
                    "false: enable the device scheduler, or drop the model's scheduling"
                )
        return self
