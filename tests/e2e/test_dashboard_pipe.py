"""The Grafana dashboard and the alert rules, on a real Prometheus scraping a real pipeline.

One pipeline (tiny model, real broker) serves a backlog big enough to pause partitions and
build lag, a steady flow after it, and some poison that goes to dead letters, while a real
Prometheus (Debian's package) scrapes it every second and evaluates deploy/prometheus/
alerts.yml. Then every query of every panel runs as Grafana would run it (variables
substituted, a range query) and must return data; every rule must be loaded and healthy,
and every alert's left-hand side (the expression without its threshold) must have data.

All of it twice: one process, and `kp-pipeline run --workers 2`, whose one endpoint
merges the workers' series with a ``worker`` label; the same queries must read the same.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka.admin import AdminClient
from e2e.kit import (
    MODELS,
    ROOT,
    Topics,
    new_topics,
    produce_tiny,
    tiny_vectors,
    wait_for,
    write_tiny_topology,
)
from e2e.prometheus import ALERTS, DEPLOY, JOB, Prometheus, free_port

from pipeline.app import open_topology
from pipeline.config.topology import KafkaSettings
from pipeline.kafka.broker import EmbeddedBroker
from pipeline.kafka.clients import ensure_topics
from pipeline.observability import metrics
from pipeline.tools.demo import BackgroundPipeline
from pipeline.tools.traffic import produce_requests, tensor_request
from schemas.codec import AvroCodec

DASHBOARD = DEPLOY / "grafana" / "kp-pipeline.json"
MODEL = "tiny-mlp"

# Grafana's global variables, sized for a 1 s scrape interval and a ~15 s test: windows
# must hold a few scrapes yet end inside the traffic.
GRAFANA_GLOBALS = {
    "__rate_interval": "15s",
    "__interval": "5s",
    "__interval_ms": "5000",
    "__range": "1m",
    "__range_s": "60",
    "__range_ms": "60000",
}
# $name, ${name}, ${name:format} and [[name]]: every form Grafana substitutes.
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
# A trailing comparison with a number: what an alert's threshold looks like.
THRESHOLD = re.compile(
    r"^(?P<lhs>.+?)\s*(?:==|!=|>=|<=|>|<)\s*(?:bool\s+)?[-+]?[\d.eE+]+\s*$", re.S
)
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")

BACKLOG = 20_000  # seconds of work at max_in_flight 128: lag builds, partitions pause
ROUNDS, PER_ROUND = 12, 250  # then a steady flow, every 0.5 s
GARBAGE_PER_ROUND = 3


@dataclass
class Scraped:
    """A pipeline that has served traffic, and the Prometheus that watched it."""

    prom: Prometheus
    topics: Topics
    target: str  # the pipeline's host:port, Prometheus' `instance` label
    start: float  # unix seconds: just before the traffic
    end: float  # after the last scrape of the traffic
    gpu_exported: bool  # the pipeline samples a GPU (NVML), so kp_gpu_* exist
    gpu_present: bool  # a GPU is visible on this machine at all
    expected: dict[str, int] = field(default_factory=dict)


def _gpu_present() -> bool:
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return int(r.status) == 200
    except OSError:
        return False


@pytest.fixture(scope="module", params=["one process", "2 workers"])
def scraped(
    request: pytest.FixtureRequest,
    broker: EmbeddedBroker,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Scraped]:
    if not (MODELS / "tiny_mlp.onnx").exists():
        pytest.fail("models/tiny_mlp.onnx missing: run `make models` (kp-pipeline models export)")
    tmp = tmp_path_factory.mktemp("dashboard")
    topics = new_topics()
    admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})
    ensure_topics(admin, [topics.input, topics.output, topics.dead_letter], 4, 1)
    # Small batches and a low in-flight ceiling: the backlog takes seconds to serve,
    # so Prometheus sees lag, pauses and full batches.
    topology = write_tiny_topology(tmp / "tiny.yaml", topics, batch=8, max_in_flight=128)
    # Lag measured 5 times a second, so the 1 s scrapes cannot miss the backlog's lag.
    text = topology.read_text()
    assert "flow: {max_in_flight" in text
    topology.write_text(
        text.replace("flow: {max_in_flight", "flow: {lag_interval_ms: 200, max_in_flight")
    )

    # Prometheus first: it needs ~5 s to run its first scrape, the pipeline ~3 s to join.
    port = free_port()
    target = f"127.0.0.1:{port}"
    prom = Prometheus([target], tmp / "prometheus").start()
    served: BackgroundPipeline | None = None
    workers: subprocess.Popen[bytes] | None = None
    try:
        if request.param == "one process":
            served = BackgroundPipeline(
                open_topology(topology), broker.bootstrap_servers, metrics_port=port
            ).start()
            assert served.pipeline is not None
        else:
            workers = subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", "run", str(topology), "--workers", "2",
                 "--bootstrap", broker.bootstrap_servers, "--metrics-port", str(port)],
                cwd=ROOT, stdout=(tmp / "workers.log").open("wb"), stderr=subprocess.STDOUT,
            )  # fmt: skip
            wait_for(lambda: _ready(port), 90, "every worker ready")
        prom.wait_for_scrape(scrapes=2)
        start = time.time() - 1
        expected = _traffic(broker, topics)
        consumed = sum(expected.values())
        wait_for(
            lambda: _value(prom, f'sum(kp_consumed_records_total{{job="{JOB}"}})') >= consumed,
            timeout=30,
            what=f"Prometheus to see {consumed} records consumed",
        )
        time.sleep(2.5)  # two more scrapes and rule evaluations of the final state
        gpu_exported = bool(prom.query(f'kp_gpu_memory_used_bytes{{job="{JOB}"}}'))
        yield Scraped(
            prom=prom,
            topics=topics,
            target=target,
            start=start,
            end=time.time(),
            gpu_exported=gpu_exported,
            gpu_present=_gpu_present() or gpu_exported,
            expected=expected,
        )
    finally:
        try:
            if served is not None:
                served.stop()
            if workers is not None:
                workers.send_signal(signal.SIGTERM)
                assert workers.wait(60) == 0
        finally:
            prom.stop()


def _traffic(broker: EmbeddedBroker, topics: Topics) -> dict[str, int]:
    """A backlog, then a steady flow; poison all along. Returns what was produced."""
    codec = AvroCodec()
    unknown = codec.encode_request(
        tensor_request("unknown", "no-such-model", {"x": tiny_vectors(1)[0]})
    )
    wrong_shape = codec.encode_request(
        tensor_request("wrong-shape", MODEL, {"x": tiny_vectors(1)[0][:63]})
    )
    produce_tiny(broker, topics.input, tiny_vectors(BACKLOG, seed=1), prefix="backlog")
    poison: list[tuple[bytes | None, bytes]] = [(b"garbage", b"\x00\xff not avro")] * 20
    poison += [(b"unknown", unknown), (b"wrong-shape", wrong_shape)]
    produce_requests(KafkaSettings(), broker.bootstrap_servers, topics.input, poison * 2)
    for i in range(ROUNDS):
        t0 = time.monotonic()
        produce_tiny(broker, topics.input, tiny_vectors(PER_ROUND, seed=10 + i), prefix=f"s{i}")
        garbage = [(b"garbage", b"\x00\xff not avro")] * GARBAGE_PER_ROUND
        produce_requests(KafkaSettings(), broker.bootstrap_servers, topics.input, garbage)
        time.sleep(max(0.0, 0.5 - (time.monotonic() - t0)))
    return {
        "good": BACKLOG + ROUNDS * PER_ROUND,
        "undecodable": 40 + ROUNDS * GARBAGE_PER_ROUND,
        "unknown_model": 2,
        "bad_tensor": 2,
    }


def _value(prom: Prometheus, expr: str) -> float:
    result = prom.query(expr)
    return float(result[0]["value"][1]) if result else float("nan")


# -- the dashboard --------------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that queries, rows' collapsed children included."""
    out: list[dict[str, Any]] = []
    for p in dashboard["panels"]:
        if p.get("type") == "row":
            out.extend(p.get("panels", []))
        else:
            out.append(p)
    return out


def _variables(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return list(dashboard["templating"]["list"])


def _definition(var: dict[str, Any]) -> str:
    query = var.get("query")
    if isinstance(query, dict):
        return str(query.get("query") or var.get("definition", ""))
    return str(query or var.get("definition", ""))


def _regex_escape(value: str) -> str:
    """Grafana's escaping of a variable value inside a PromQL regex string literal."""
    return "".join("\\\\" + c if c in "\\^$.|?*+()[]{}" else c for c in value)


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace every Grafana variable in ``expr``; an unknown one fails the test."""

    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name in values:
            return values[name]
        if name in GRAFANA_GLOBALS:
            return GRAFANA_GLOBALS[name]
        raise AssertionError(f"unknown Grafana variable ${name} in {expr!r}")

    return VARIABLE.sub(one, expr)


_LABEL_VALUES = re.compile(
    r"^\s*label_values\(\s*(?:(?P<match>.+),\s*)?(?P<label>\w+)\s*\)\s*$", re.S
)


def _resolve(
    prom: Prometheus, dashboard: dict[str, Any], choose: dict[str, str] | None
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Values of the dashboard's variables, in order, as Grafana would substitute them.

    ``choose`` None: every variable at "All" (its allValue, else all its values as a
    regex alternation); else the single value ``choose[name]``. Also returns what each
    variable query listed.
    """
    values: dict[str, str] = {}
    listed: dict[str, list[str]] = {}
    for var in _variables(dashboard):
        if var["type"] == "datasource":
            continue
        assert var["type"] == "query", f"variable {var['name']}: unsupported type {var['type']}"
        m = _LABEL_VALUES.match(_definition(var))
        assert m, f"variable {var['name']}: not a label_values() query: {_definition(var)!r}"
        match = substitute(m["match"], values) if m["match"] else None
        options = prom.label_values(m["label"], match)
        listed[var["name"]] = options
        if choose is None:
            all_value = var.get("allValue")
            values[var["name"]] = (
                all_value if all_value else "(" + "|".join(map(_regex_escape, options)) + ")"
            )
        else:
            values[var["name"]] = _regex_escape(choose[var["name"]])
    return values, listed


def _peak(values: list[list[Any]]) -> float:
    finite = [float(v) for _, v in values if v not in ("NaN", "+Inf", "-Inf")]
    return max(finite, default=float("nan"))


def _is_gpu(expr: str) -> bool:
    return "kp_gpu_" in expr


def test_dashboard_is_well_formed() -> None:
    d = _dashboard()
    assert 36 <= d["schemaVersion"] <= 41
    variables = {v["name"]: v for v in _variables(d)}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"topic", "model"} <= set(variables)
    panels = _panels(d)
    ids = [p["id"] for p in d["panels"]] + [
        c["id"] for p in d["panels"] if p.get("type") == "row" for c in p.get("panels", [])
    ]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        where = f"panel {p['title']!r}"
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        assert p["targets"], f"{where} has no query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), f"{where}: duplicate refIds"
        for t in p["targets"]:
            assert t.get("expr"), f"{where}: target {t['refId']} has no expr"
            assert t["datasource"]["uid"] == "${datasource}", where
    cells: dict[tuple[int, int], str] = {}
    for p in d["panels"]:
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"panel {p['title']!r} overflows the grid"
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                other = cells.setdefault((x, y), p["title"])
                assert other == p["title"], f"panels {other!r} and {p['title']!r} overlap"


def _catalog() -> set[str]:
    """The metric names of pipeline/observability/metrics.py's catalog (its module docstring)."""
    doc = metrics.__doc__ or ""
    return set(re.findall(r"^(kp_\w+)", doc, re.M)) | set(re.findall(r" / (kp_\w+)", doc))


def test_dashboard_shows_every_metric_of_the_catalog() -> None:
    catalog = _catalog()
    assert len(catalog) > 20
    text = DASHBOARD.read_text()
    assert not [n for n in sorted(catalog) if n not in text], "metrics on no panel"


def test_variable_queries_list_this_pipeline(scraped: Scraped) -> None:
    choose = {"job": JOB, "instance": scraped.target, "topic": scraped.topics.input, "model": MODEL}
    _, listed = _resolve(scraped.prom, _dashboard(), None)
    for name, want in choose.items():
        assert want in listed.get(name, []), (
            f"variable ${name} lists {listed.get(name)}, not {want}"
        )


@pytest.mark.parametrize("selection", ["all", "one"])
def test_every_panel_query_returns_data(scraped: Scraped, selection: str) -> None:
    d = _dashboard()
    choose = {"job": JOB, "instance": scraped.target, "topic": scraped.topics.input, "model": MODEL}
    values, _ = _resolve(scraped.prom, d, None if selection == "all" else choose)
    empty: list[tuple[str, str]] = []
    missing_labels: list[str] = []
    queried = 0
    for panel in _panels(d):
        for target in panel["targets"]:
            expr = substitute(target["expr"], values)
            result = scraped.prom.query_range(expr, scraped.start, scraped.end, step=1)
            queried += 1
            if not any(series["values"] for series in result):
                empty.append((panel["title"], expr))
                continue
            peak = max(_peak(series["values"]) for series in result)
            print(f"{panel['title']!r} {target['refId']}: {len(result)} series, peak {peak:g}")
            for label in LEGEND_LABEL.findall(target.get("legendFormat", "")):
                # Empty labels are absent (dead letters with no model): some series, not all.
                if not any(label in series["metric"] for series in result):
                    missing_labels.append(
                        f"{panel['title']!r}: legend {{{{{label}}}}} but no such label in {expr}"
                    )
    assert queried >= 30
    assert not missing_labels, "\n".join(missing_labels)

    gpu = [(title, expr) for title, expr in empty if _is_gpu(expr)]
    other = [(title, expr) for title, expr in empty if not _is_gpu(expr)]
    assert not other, "panel queries with no data:\n" + "\n".join(
        f"  {title!r}: {expr}" for title, expr in other
    )
    if gpu:
        why = (
            "a GPU is present but the pipeline exports no kp_gpu_* series (GpuSampler found "
            "no NVML: is nvidia-ml-py installed?)"
            if scraped.gpu_present
            else "no GPU on this machine: kp_gpu_* are only exported where NVML sees a GPU"
        )
        print(f"GPU panels without data ({why}):")
        for title, expr in gpu:
            print(f"  {title!r}: {expr}")
        assert not scraped.gpu_present, why + "\n" + "\n".join(f"  {t!r}: {e}" for t, e in gpu)


def test_the_traffic_shows_in_prometheus(scraped: Scraped) -> None:
    prom, window = scraped.prom, f"[{round(time.time() - scraped.start) + 5}s:1s]"
    # A backlog was there: lag in records and in seconds, and backpressure paused.
    assert _value(prom, f"max_over_time(max(kp_consumer_lag_messages){window})") > 0
    assert _value(prom, f"max_over_time(max(kp_consumer_lag_seconds){window})") > 0
    assert _value(prom, "sum(kp_pauses_total)") > 0
    assert _value(prom, "sum(kp_resumes_total)") > 0
    # Every request was answered and counted once: results, dead letters by reason.
    good = scraped.expected["good"]
    assert _value(prom, f'sum(kp_results_total{{model="{MODEL}", status="OK"}})') == good
    # Each result's end-to-end latency was observed once.
    assert _value(prom, f'sum(kp_end_to_end_latency_seconds_count{{model="{MODEL}"}})') == good
    for reason in ("undecodable", "unknown_model", "bad_tensor"):
        got = _value(prom, f'sum(kp_dead_letters_total{{reason="{reason}"}})')
        assert got == scraped.expected[reason], reason
    produced = sum(scraped.expected.values())
    assert _value(prom, "sum(kp_produced_records_total)") == produced
    assert _value(prom, "sum(kp_consumed_records_total)") == produced
    assert _value(prom, f'sum(kp_batch_size_requests_count{{model="{MODEL}"}})') > 0
    assert _value(prom, "max(kp_ready)") == 1


def test_every_catalog_metric_is_scraped(scraped: Scraped) -> None:
    """The catalog's names are the ones served (histograms by their _count series)."""
    result = scraped.prom.query(f'group by (__name__) ({{job="{JOB}", __name__=~"kp_.+"}})')
    served = {s["metric"]["__name__"] for s in result}
    served |= {n.removesuffix("_count") for n in served if n.endswith("_count")}
    missing = sorted(_catalog() - served)
    if not scraped.gpu_exported:  # only exported where NVML sees a GPU
        missing = [n for n in missing if not n.startswith("kp_gpu_")]
    assert not missing, (
        f"in the catalog of pipeline/observability/metrics.py but never scraped: {missing}"
    )


# -- the rules ------------------------------------------------------------------------------


def _rule_file() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(ALERTS.read_text())["groups"]
    return groups


def test_every_rule_is_loaded_and_healthy(scraped: Scraped) -> None:
    declared = {
        (g["name"], r.get("alert") or r["record"]) for g in _rule_file() for r in g["rules"]
    }
    loaded = scraped.prom.rules()
    seen = {(g["name"], r["name"]) for g in loaded for r in g["rules"]}
    assert seen == declared
    unhealthy = [
        f"{g['name']}/{r['name']}: health {r['health']}, {r.get('lastError')}"
        for g in loaded
        for r in g["rules"]
        if r["health"] != "ok" or r.get("lastError")
    ]
    assert not unhealthy, "\n".join(unhealthy)
    for g in loaded:
        for r in g["rules"]:
            assert not r["lastEvaluation"].startswith("0001-"), f"{r['name']} never evaluated"


def test_every_recording_rule_and_alert_left_side_has_data(scraped: Scraped) -> None:
    empty: list[str] = []
    for group in _rule_file():
        for rule in group["rules"]:
            if "record" in rule:
                expr, name = rule["record"], f"recording rule {rule['record']}"
            else:
                m = THRESHOLD.match(rule["expr"].strip())
                assert m, f"alert {rule['alert']}: expr is not `<lhs> <op> <number>`"
                expr, name = m["lhs"], f"alert {rule['alert']} (left side)"
            if not scraped.prom.query(expr):
                empty.append(f"{name}: {expr}")
    assert not empty, "rule expressions with no data:\n" + "\n".join(empty)
