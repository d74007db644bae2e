"""Every metric one replica exports, in the replica's own registry.

Names follow Prometheus conventions: the ``kp_`` prefix, the base unit in the name
(seconds, bytes), ``_total`` on counters (prometheus-client adds it). The registry is
per `Metrics` object, not the library's global one, so two pipelines in one process
(tests, the demo) never mix their figures.

Labelled series that dashboards and alerts query are created at start with zero values
(`Metrics.declare_model`, `declare_reason`), so a query over a healthy pipeline returns
0 rather than no data: a dashboard cannot tell "nothing happened" from "not scraped"
otherwise.

Per-instance series are labelled ``model_instance``: ``instance`` is the label Prometheus
gives the scraped replica, and it would rename ours to ``exported_instance``.

Long because every metric is defined here, beside the catalog below that the dashboard,
the alerts and their tests read: split up, the catalog and the definitions would drift.

The catalog (what `deploy/grafana` and `deploy/prometheus` build on):

===================================  =========  ===========================================
name                                 type       labels
===================================  =========  ===========================================
kp_consumed_records_total            counter    topic, partition
kp_consumed_bytes_total              counter    topic
kp_produced_records_total            counter    topic (acknowledged by the broker)
kp_results_total                     counter    model, status (OK, ERROR, EXPIRED)
kp_dead_letters_total                counter    reason, model ("" when no model was known)
kp_batches_total                     counter    model, trigger (full, deadline, drain)
kp_batch_size_requests               histogram  model
kp_queue_seconds                     histogram  model (consumed → preprocessing starts)
kp_preprocess_seconds                histogram  model, model_instance (per batch)
kp_compute_seconds                   histogram  model, model_instance (per batch, the backend)
kp_postprocess_seconds               histogram  model, model_instance (per batch)
kp_end_to_end_latency_seconds        histogram  model (record timestamp → outcome acked)
kp_request_age_seconds               histogram  model (record timestamp → its batch prepared)
kp_reorder_held_outcomes             gauge      model (held for an earlier row: ordering)
kp_reorder_wait_seconds              histogram  model (how long each held outcome waited)
kp_reorder_unkeyed_total             counter    model (ordering: key rows without a key)
kp_scheduler_wait_seconds            histogram  model (a batch's wait for a device slot)
kp_scheduler_grants_total            counter    model, device (slots the scheduler gave)
kp_scheduler_running_batches         gauge      device (slots taken: preparing or running)
kp_scheduler_queued_batches          gauge      model (submitted, not yet on an instance)
kp_scheduler_unlisted_tenants_total  counter    model (requests of a tenant not in tenants)
kp_in_flight_requests                gauge      consumed, outcome not yet acknowledged
kp_in_flight_bytes                   gauge      their record bytes
kp_paused_partitions                 gauge      partitions paused by backpressure
kp_assigned_partitions               gauge
kp_pauses_total / kp_resumes_total   counter    backpressure decisions
kp_consumer_lag_messages             gauge      topic, partition
kp_consumer_lag_seconds              gauge      topic, partition (age of oldest unserved)
kp_batch_max_size_requests           gauge      model (the lag control loop's current size)
kp_batch_max_delay_seconds           gauge      model (the control loop's current delay)
kp_batch_adjustments_total           counter    model, direction (up, down)
kp_padding_elements_total            counter    model, kind (real, padded)
kp_batch_splits_total                counter    model (failing batches halved, poison hunt)
kp_inference_retries_total           counter    model (re-runs after a transient error)
kp_transactions_total                counter    result (committed, aborted; exactly-once)
kp_model_instances                   gauge      model, device
kp_model_version_traffic_ratio       gauge      model, version (its share of requests naming none)
kp_control_records_total             counter    result (applied, unapplied, invalid: control topic)
kp_control_unapplied                 gauge      model (1 while its latest split is not applied here)
kp_version_loads_total               counter    model, result (loaded, failed, unloaded: swaps)
kp_shadow_comparisons_total          counter    model (the shadow), verdict (same, differs, status)
kp_shadow_skipped_total              counter    model (requests not copied: the shadow was behind)
kp_ready                             gauge      1 while /readyz answers 200
kp_gpu_memory_used_bytes             gauge      device (cuda:N as this process's CUDA numbers it)
kp_gpu_utilization_ratio             gauge      device (only where NVML sees the GPU)
kp_build_info                        info       version
process_* (resident memory, CPU)     gauge      from prometheus-client's process collector
===================================  =========  ===========================================
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from typing import Any

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

__all__ = [
    "LATENCY_BUCKETS",
    "SIZE_BUCKETS",
    "BulkHistogram",
    "GpuSampler",
    "Metrics",
    "cuda_bus_ids",
]

log = logging.getLogger(__name__)

# 1 ms to 60 s: batch phases on a GPU are ~1 ms, end-to-end under a backlog is seconds.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
AGE_BUCKETS = (*LATENCY_BUCKETS, 300.0, 900.0, 3600.0, 14400.0)
"""Ages reach hours under a backlog; latency's buckets, then up to four hours."""

SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)

STATUSES = ("OK", "ERROR", "EXPIRED")

# `*_created` series (one per labelled counter) only double the scrape: nothing here uses
# them. The switch is process-wide in prometheus-client.
disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    """The metric objects of one replica; the Kafka thread and the model threads update them."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.consumed = Counter(
            "kp_consumed_records",
            "Records consumed from input topics.",
            ["topic", "partition"],
            registry=r,
        )
        self.consumed_bytes = Counter(
            "kp_consumed_bytes", "Record value bytes consumed.", ["topic"], registry=r
        )
        self.produced = Counter(
            "kp_produced_records",
            "Outcome records acknowledged by the broker.",
            ["topic"],
            registry=r,
        )
        self.results = Counter(
            "kp_results",
            "Results delivered, by model and status.",
            ["model", "status"],
            registry=r,
        )
        self.dead_letters = Counter(
            "kp_dead_letters",
            "Dead letters delivered, by reason and model.",
            ["reason", "model"],
            registry=r,
        )
        self.batches = Counter(
            "kp_batches",
            "Batches leaving the batcher, by what flushed them.",
            ["model", "trigger"],
            registry=r,
        )
        self.batch_size = Histogram(
            "kp_batch_size_requests",
            "Requests per batch sent to a model.",
            ["model"],
            buckets=SIZE_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "kp_queue_seconds",
            "From consuming a request to the start of its batch's preprocessing.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.preprocess_time = Histogram(
            "kp_preprocess_seconds",
            "Preprocessing time per batch.",
            ["model", "model_instance"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_time = Histogram(
            "kp_compute_seconds",
            "Model (backend) time per batch.",
            ["model", "model_instance"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.postprocess_time = Histogram(
            "kp_postprocess_seconds",
            "Postprocessing time per batch.",
            ["model", "model_instance"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = BulkHistogram(
            "kp_end_to_end_latency_seconds",
            "From the request record's timestamp to the broker acknowledging its outcome.",
            "model",
            LATENCY_BUCKETS,
        )
        r.register(self.latency)
        self.request_age = BulkHistogram(
            "kp_request_age_seconds",
            "How old each request was (by its record timestamp) when its batch was prepared "
            "for the model: under lag, how stale the answers are (see max_age_ms).",
            "model",
            AGE_BUCKETS,
        )
        r.register(self.request_age)
        self.reorder_held = Gauge(
            "kp_reorder_held_outcomes",
            "Outcomes of an ordered model (ordering: key or partition) held until every "
            "earlier row of their key or partition has been published.",
            ["model"],
            registry=r,
        )
        self.reorder_wait = BulkHistogram(
            "kp_reorder_wait_seconds",
            "How long each held outcome of an ordered model waited for the rows before it.",
            "model",
            LATENCY_BUCKETS,
        )
        r.register(self.reorder_wait)
        self.reorder_unkeyed = Counter(
            "kp_reorder_unkeyed",
            "Rows of a model with ordering: key whose record had no key (published unordered).",
            ["model"],
            registry=r,
        )
        self.scheduler_wait = Histogram(
            "kp_scheduler_wait_seconds",
            "How long each batch waited for a slot on its device (the device scheduler).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.scheduler_grants = Counter(
            "kp_scheduler_grants",
            "Device slots the scheduler gave to a model's batches.",
            ["model", "device"],
            registry=r,
        )
        self.scheduler_running = Gauge(
            "kp_scheduler_running_batches",
            "Batches holding a slot on the device (being prepared or run).",
            ["device"],
            registry=r,
        )
        self.scheduler_queued = Gauge(
            "kp_scheduler_queued_batches",
            "A model's batches submitted and not yet handed to an instance.",
            ["model"],
            registry=r,
        )
        self.scheduler_unlisted_tenants = Counter(
            "kp_scheduler_unlisted_tenants",
            "Requests naming a tenant that scheduling.tenants does not list (default weight).",
            ["model"],
            registry=r,
        )
        self.in_flight = Gauge(
            "kp_in_flight_requests",
            "Requests consumed whose outcome is not yet acknowledged.",
            registry=r,
        )
        self.in_flight_bytes = Gauge(
            "kp_in_flight_bytes", "Record bytes of the in-flight requests.", registry=r
        )
        self.paused = Gauge(
            "kp_paused_partitions", "Partitions paused by backpressure.", registry=r
        )
        self.assigned = Gauge("kp_assigned_partitions", "Partitions assigned.", registry=r)
        self.pauses = Counter("kp_pauses", "Times backpressure paused consuming.", registry=r)
        self.resumes = Counter("kp_resumes", "Times backpressure resumed consuming.", registry=r)
        self.lag = Gauge(
            "kp_consumer_lag_messages",
            "Records in the partition not yet served (high watermark − oldest unserved).",
            ["topic", "partition"],
            registry=r,
        )
        self.lag_seconds = Gauge(
            "kp_consumer_lag_seconds",
            "Age of the oldest record of the partition not yet served; 0 when caught up.",
            ["topic", "partition"],
            registry=r,
        )
        self.batch_limit = Gauge(
            "kp_batch_max_size_requests",
            "Batch size limit now in force (raised by the lag control loop).",
            ["model"],
            registry=r,
        )
        self.batch_delay = Gauge(
            "kp_batch_max_delay_seconds",
            "Batch delay limit now in force (raised by the lag control loop).",
            ["model"],
            registry=r,
        )
        self.batch_adjustments = Counter(
            "kp_batch_adjustments",
            "Decisions of the lag control loop.",
            ["model", "direction"],
            registry=r,
        )
        self.padding = Counter(
            "kp_padding_elements",
            "Tensor elements fed to a model: real data and padding.",
            ["model", "kind"],
            registry=r,
        )
        self.batch_splits = Counter(
            "kp_batch_splits",
            "Failing batches halved to isolate the requests that make them fail.",
            ["model"],
            registry=r,
        )
        self.transactions = Counter(
            "kp_transactions",
            "Kafka transactions of exactly-once delivery, by result.",
            ["result"],
            registry=r,
        )
        for result in ("committed", "aborted"):
            self.transactions.labels(result)
        self.inference_retries = Counter(
            "kp_inference_retries",
            "Runs of a batch repeated after a transient failure (out of memory).",
            ["model"],
            registry=r,
        )
        self.instances = Gauge(
            "kp_model_instances",
            "Model instances loaded, by device.",
            ["model", "device"],
            registry=r,
        )
        self._lifecycle(r)
        self.ready = Gauge("kp_ready", "1 while the replica is ready (/readyz).", registry=r)
        self.gpu_memory_used = Gauge(
            "kp_gpu_memory_used_bytes", "GPU memory in use.", ["device"], registry=r
        )
        self.gpu_utilization = Gauge(
            "kp_gpu_utilization_ratio", "GPU busy fraction (0–1).", ["device"], registry=r
        )
        Info("kp_build", "kp-pipeline version.", registry=r).info({"version": _version()})

    def _lifecycle(self, r: CollectorRegistry) -> None:
        """Model versions and the control topic (`pipeline.lifecycle`)."""
        self.version_traffic = Gauge(
            "kp_model_version_traffic_ratio",
            "A served version's share of its model's requests that name no version (the "
            "default takes what the canaries leave).",
            ["model", "version"],
            registry=r,
        )
        self.control_records = Counter(
            "kp_control_records",
            "Control topic records read: applied, unapplied (a version this replica does not "
            "serve) or invalid.",
            ["result"],
            registry=r,
        )
        self.shadow_comparisons = Counter(
            "kp_shadow_comparisons",
            "Requests answered by both the live version and its shadow, compared: same, "
            "differs (outputs) or status (one failed, or they failed differently).",
            ["model", "verdict"],
            registry=r,
        )
        self.shadow_skipped = Counter(
            "kp_shadow_skipped",
            "Requests not copied to the shadow because too many copies were outstanding.",
            ["model"],
            registry=r,
        )
        self.version_loads = Counter(
            "kp_version_loads",
            "Versions loaded, refused (failed) and unloaded while serving (versions load, "
            "versions unload): each swap's steps on this replica.",
            ["model", "result"],
            registry=r,
        )
        self.control_unapplied = Gauge(
            "kp_control_unapplied",
            "1 while the model's latest control record names a version this replica does not "
            "serve (it keeps its split; /readyz says why).",
            ["model"],
            registry=r,
        )

    def declare_model(self, model: str, devices: list[str]) -> None:
        """Create a model's series at zero so dashboards show 0, not 'no data'."""
        self.reorder_held.labels(model)
        self.reorder_wait.declare(model)
        self.reorder_unkeyed.labels(model)
        self.scheduler_wait.labels(model)
        self.scheduler_queued.labels(model)
        self.scheduler_unlisted_tenants.labels(model)
        for verdict in ("same", "differs", "status"):
            self.shadow_comparisons.labels(model, verdict)
        self.shadow_skipped.labels(model)
        for status in STATUSES:
            self.results.labels(model, status)
        for trigger in ("full", "deadline", "drain"):
            self.batches.labels(model, trigger)
        for direction in ("up", "down"):
            self.batch_adjustments.labels(model, direction)
        for kind in ("real", "padded"):
            self.padding.labels(model, kind)
        self.batch_size.labels(model)
        self.batch_splits.labels(model)
        self.inference_retries.labels(model)
        self.queue_time.labels(model)
        self.latency.declare(model)
        self.request_age.declare(model)
        for i, device in enumerate(devices):
            for h in (self.preprocess_time, self.compute_time, self.postprocess_time):
                h.labels(model, str(i))
            self.instances.labels(model, device).inc()

    def declare_reason(self, reason: str, model: str = "") -> None:
        """Create a dead-letter series at zero."""
        self.dead_letters.labels(reason, model)


class BulkHistogram(Collector):
    """A histogram with one label that takes many observations in one call.

    End-to-end latency is observed once per request, tens of thousands of times a second
    on the Kafka thread; prometheus-client's `Histogram.observe` costs a lock and a bucket
    search each time. Here a whole delivery round is bucketed at once with NumPy.
    """

    def __init__(self, name: str, documentation: str, label: str, buckets: Sequence[float]):
        self.name = name
        self.documentation = documentation
        self.label = label
        self.bounds = np.asarray(buckets, dtype=np.float64)
        self._series: dict[str, tuple[np.ndarray[Any, np.dtype[np.int64]], list[float]]] = {}
        self._lock = threading.Lock()

    def declare(self, value: str) -> None:
        """Create the series for ``value`` at zero."""
        with self._lock:
            self._series.setdefault(value, (np.zeros(len(self.bounds) + 1, np.int64), [0.0]))

    def observe_many(
        self, value: str, observations: Sequence[float] | np.ndarray[Any, Any]
    ) -> None:
        """Add ``observations`` (seconds) to the series for label ``value``."""
        data = np.asarray(observations, dtype=np.float64)
        if not data.size:
            return
        # Bucket i counts bounds[i-1] < x <= bounds[i]; the last one is +Inf.
        counts = np.bincount(
            np.searchsorted(self.bounds, data, side="left"), minlength=len(self.bounds) + 1
        )
        self.declare(value)
        with self._lock:
            series, total = self._series[value]
            series += counts
            total[0] += float(data.sum())

    def collect(self) -> Iterator[HistogramMetricFamily]:
        """The samples, cumulative as Prometheus expects."""
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        with self._lock:
            snapshot = [(v, s.copy(), t[0]) for v, (s, t) in self._series.items()]
        for value, series, total in snapshot:
            cumulative = np.cumsum(series)
            edges = [*(_le(b) for b in self.bounds), "+Inf"]
            family.add_metric(
                [value], [(e, float(c)) for e, c in zip(edges, cumulative, strict=True)], total
            )
        yield family

    def describe(self) -> Iterator[HistogramMetricFamily]:
        """No samples at registration: the registry need not call `collect` then."""
        return iter(())


class GpuSampler:
    """GPU memory and utilization through NVML, labelled ``cuda:N`` as CUDA numbers devices.

    NVML numbers GPUs its own way: it ignores ``CUDA_VISIBLE_DEVICES`` and may order them
    unlike CUDA (whose default order is fastest first), so NVML index i is not ``cuda:i``.
    Each device this process's CUDA sees is matched to its NVML handle by PCI bus id
    (``bus_ids``: CUDA's, for ``cuda:0``, ``cuda:1``, ...; `cuda_bus_ids` by default). A
    device NVML refuses is logged once and skipped; the others are still sampled.

    Not run on the project's machines (no GPU here; the GPU machines lent to it have no
    nvidia-ml-py): written against the documentation of NVML
    (``nvmlDeviceGetHandleByPciBusId``), PyTorch and CuPy, tested with a fake ``pynvml``,
    and silent where NVML is missing, so a CPU replica simply exports no ``kp_gpu_*`` series.
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        nvml: Any = None,
        bus_ids: Callable[[], Sequence[str]] | None = None,
    ) -> None:
        self._metrics = metrics
        self._handles: list[tuple[str, Any]] = []
        self._failing: set[str] = set()  # devices whose failure is already logged
        self._nvml = nvml if nvml is not None else _import_nvml()
        if self._nvml is None:
            return
        try:
            self._nvml.nvmlInit()
        except Exception:  # no driver or no GPU: nothing to export
            return
        try:
            visible = list((bus_ids or cuda_bus_ids)())
        except Exception as e:  # a CUDA that fails here fails the models too; say why
            log.warning("no GPU metrics: cannot read CUDA's PCI bus ids (%s)", e)
            return
        for n, bus_id in enumerate(visible):
            try:  # bytes: older nvidia-ml-py passes the argument straight to ctypes
                handle = self._nvml.nvmlDeviceGetHandleByPciBusId(bus_id.encode())
            except Exception as e:
                self._failed(f"cuda:{n}", f"NVML has no device at PCI {bus_id}: {e}")
                continue
            self._handles.append((f"cuda:{n}", handle))

    @property
    def available(self) -> bool:
        """Whether any GPU is being sampled."""
        return bool(self._handles)

    def sample(self) -> None:
        """Read each GPU's memory in use and busy fraction into the gauges."""
        for name, handle in self._handles:
            try:
                memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
                rates = self._nvml.nvmlDeviceGetUtilizationRates(handle)
            except Exception as e:  # a GPU that fell off the bus must not stop the pipeline
                self._failed(name, f"NVML cannot read it: {e}")
                continue
            self._metrics.gpu_memory_used.labels(name).set(memory.used)
            self._metrics.gpu_utilization.labels(name).set(rates.gpu / 100.0)

    def _failed(self, name: str, why: str) -> None:
        """Log a device's first failure only: sampling repeats every few seconds."""
        if name not in self._failing:
            self._failing.add(name)
            log.warning("no GPU metrics for %s: %s", name, why)


def cuda_bus_ids() -> list[str]:
    """PCI bus ids of the CUDA devices this process sees, index N for ``cuda:N``.

    Read through PyTorch when it is already loaded (a torch backend), else CuPy (the GPU
    extras install it), else PyTorch: both number devices as CUDA does, after
    ``CUDA_VISIBLE_DEVICES``. Written against ``torch.cuda.get_device_properties`` (its
    ``pci_domain_id``, ``pci_bus_id``, ``pci_device_id``) and CuPy's
    ``cuda.runtime.deviceGetPCIBusId``; NOT RUN here (no GPU).
    """
    readers = [_torch_bus_ids, _cupy_bus_ids, _torch_bus_ids]
    if "torch" not in sys.modules:
        readers = readers[1:]
    errors = []
    for read in readers:
        try:
            ids = read()
        except Exception as e:  # not installed, or too old for the attribute: try the next
            errors.append(f"{read.__name__}: {e}")
            continue
        if ids:  # a CPU build of torch sees none where CuPy may see some
            return ids
    if len(errors) == len(readers):
        raise RuntimeError("; ".join(errors))
    return []


def _torch_bus_ids() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p: Any = torch.cuda.get_device_properties(i)
        out.append(f"{p.pci_domain_id:04x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0")
    return out


def _cupy_bus_ids() -> list[str]:
    import cupy

    runtime = cupy.cuda.runtime
    return [str(runtime.deviceGetPCIBusId(i)) for i in range(runtime.getDeviceCount())]


def _import_nvml() -> Any:
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:  # nvidia-ml-py is in the GPU extras only
        return None
    return pynvml


def _le(bound: float) -> str:
    return repr(float(bound))


def _version() -> str:
    try:
        return metadata.version("kp-pipeline")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "unknown"
