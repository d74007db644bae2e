"""The metric catalog: zero series declared up front, and the bulk histogram's arithmetic."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from pipeline.observability.metrics import LATENCY_BUCKETS, BulkHistogram, GpuSampler, Metrics


def _samples(registry: CollectorRegistry, name: str) -> dict[tuple[str, str], float]:
    out = {}
    for family in registry.collect():
        for s in family.samples:
            if s.name.startswith(name):
                out[(s.name, s.labels.get("le", ""))] = s.value
    return out


@given(st.lists(st.floats(0, 100, allow_nan=False), max_size=200))
def test_bulk_histogram_equals_prometheus_client_histogram(values: list[float]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    bulk = BulkHistogram("h_seconds", "doc", "model", LATENCY_BUCKETS)
    ours.register(bulk)
    reference = Histogram("h_seconds", "doc", ["model"], buckets=LATENCY_BUCKETS, registry=theirs)
    bulk.declare("m")
    reference.labels("m")
    half = len(values) // 2
    bulk.observe_many("m", values[:half])
    bulk.observe_many("m", values[half:])
    for v in values:
        reference.labels("m").observe(v)
    a, b = _samples(ours, "h_seconds"), _samples(theirs, "h_seconds")
    b = {k: v for k, v in b.items() if not k[0].endswith("_created")}
    assert a.keys() == b.keys()
    for key in a:
        assert np.isclose(a[key], b[key]), key


def test_declared_models_and_reasons_export_zeros() -> None:
    m = Metrics()
    m.declare_model("tiny", ["cpu", "cpu"])
    m.declare_reason("undecodable")
    text = generate_latest(m.registry).decode()
    for line in (
        'kp_results_total{model="tiny",status="OK"} 0.0',
        'kp_batches_total{model="tiny",trigger="deadline"} 0.0',
        'kp_padding_elements_total{kind="padded",model="tiny"} 0.0',
        'kp_dead_letters_total{model="",reason="undecodable"} 0.0',
        'kp_compute_seconds_count{model="tiny",model_instance="1"} 0.0',
        'kp_end_to_end_latency_seconds_count{model="tiny"} 0.0',
        'kp_model_instances{device="cpu",model="tiny"} 2.0',
    ):
        assert line in text


def test_two_pipelines_in_one_process_keep_their_own_figures() -> None:
    a, b = Metrics(), Metrics()
    a.pauses.inc()
    assert "kp_pauses_total 1.0" in generate_latest(a.registry).decode()
    assert "kp_pauses_total 0.0" in generate_latest(b.registry).decode()


def test_without_a_gpu_no_gpu_series_are_exported() -> None:
    m = Metrics()
    sampler = GpuSampler(m)
    sampler.sample()
    assert not sampler.available  # no NVML on the project's machines
    assert "kp_gpu_memory_used_bytes{" not in generate_latest(m.registry).decode()
