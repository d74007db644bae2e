"""`kp-pipeline top`: parsing, rates, PromQL's quantile, the rendered frame, and the command
against a real HTTP server serving a real registry's exposition."""

from __future__ import annotations

import argparse
import math
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import generate_latest

from pipeline.observability.metrics import Metrics
from pipeline.tools import top
from pipeline.tools.top import Snapshot, compute, histogram_quantile, parse, render
from pipeline.workers.group import group_exposition
from pipeline.workers.supervisor import Worker
from schemas.errors import ExitCode

INF = math.inf


def _metrics() -> Metrics:
    """A replica's registry as it looks after start: one model, two partitions."""
    m = Metrics()
    m.declare_model("tiny-mlp", ["cpu"])
    m.declare_reason("decode")  # no model known
    m.declare_reason("timeout", "tiny-mlp")
    m.assigned.set(2)
    m.ready.set(1)
    m.batch_limit.labels("tiny-mlp").set(64)
    m.batch_delay.labels("tiny-mlp").set(0.005)
    for p in ("0", "1"):
        m.consumed.labels("requests", p).inc(0)
        m.lag.labels("requests", p).set(0)
        m.lag_seconds.labels("requests", p).set(0)
    return m


def _observe_latency(m: Metrics, model: str, *seconds: float) -> None:
    """End-to-end latency, through whichever histogram type `Metrics` uses for it."""
    if hasattr(m.latency, "observe_many"):  # the bulk histogram of the Kafka thread
        m.latency.observe_many(model, seconds)
    else:
        for s in seconds:
            m.latency.labels(model).observe(s)


def _snap(m: Metrics) -> Snapshot:
    return parse(generate_latest(m.registry).decode())


def _traffic(m: Metrics) -> None:
    """Two seconds' worth of work between two scrapes."""
    m.consumed.labels("requests", "0").inc(100)
    m.consumed.labels("requests", "1").inc(50)
    m.results.labels("tiny-mlp", "OK").inc(40)
    m.results.labels("tiny-mlp", "ERROR").inc(2)
    m.dead_letters.labels("timeout", "tiny-mlp").inc(4)
    for size in (8, 8, 16):
        m.batch_size.labels("tiny-mlp").observe(size)
    _observe_latency(m, "tiny-mlp", *[0.02] * 30)  # (0.01, 0.025]
    _observe_latency(m, "tiny-mlp", *[0.3] * 10)  # (0.25, 0.5]
    m.lag.labels("requests", "0").set(1234)
    m.lag_seconds.labels("requests", "0").set(0.75)
    m.in_flight.set(321)
    m.in_flight_bytes.set(3 * 2**20)


# --- parse -------------------------------------------------------------------------------


def test_parse_indexes_samples_by_name_and_labels() -> None:
    m = _metrics()
    m.consumed.labels("requests", "0").inc(5)
    _observe_latency(m, "tiny-mlp", 0.3)
    s = _snap(m)
    assert s.value("kp_consumed_records_total", topic="requests", partition="0") == 5
    assert s.value("kp_end_to_end_latency_seconds_bucket", model="tiny-mlp", le="0.5") == 1
    assert s.value("kp_end_to_end_latency_seconds_bucket", model="tiny-mlp", le="0.25") == 0
    assert s.value("kp_end_to_end_latency_seconds_count", model="tiny-mlp") == 1
    assert s.value("kp_results_total", model="tiny-mlp", status="EXPIRED") == 0
    assert s.value("kp_ready") == 1
    assert (s.value("process_resident_memory_bytes") or 0) > 0
    assert s.value("kp_consumed_records_total", topic="requests", partition="9") is None
    assert s.series("no_such_metric") == {}


@pytest.mark.parametrize("text", ["<html><body>It works!</body></html>", "hello world\n"])
def test_parse_refuses_what_is_not_exposition(text: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        parse(text)


# --- compute -----------------------------------------------------------------------------


def test_compute_rates_lag_batch_and_latency_over_the_interval() -> None:
    m = _metrics()
    m.batch_size.labels("tiny-mlp").observe(1000)  # before the interval: must not count
    _observe_latency(m, "tiny-mlp", 50.0)
    prev = _snap(m)
    _traffic(m)
    f = compute(prev, _snap(m), dt=2.0)

    assert (f.in_flight, f.in_flight_bytes, f.assigned, f.paused, f.ready) == (
        321,
        3 * 2**20,
        2,
        0,
        1,
    )
    assert f.rss is not None
    assert f.rss > 0
    p0, p1 = f.partitions
    assert (p0.topic, p0.partition, p0.lag, p0.lag_seconds, p0.rate, p0.paused) == (
        "requests",
        "0",
        1234,
        0.75,
        50.0,
        False,
    )
    assert (p1.partition, p1.lag, p1.rate) == ("1", 0, 25.0)

    by_name = {r.model: r for r in f.models}
    assert set(by_name) == {"", "tiny-mlp"}  # "" holds dead letters with no model
    mlp = by_name["tiny-mlp"]
    assert mlp.results == {"OK": 20.0, "ERROR": 1.0, "EXPIRED": 0.0}
    assert mlp.dead_letters == {"timeout": 2.0}
    assert by_name[""].dead_letters == {"decode": 0.0}
    assert mlp.batch_mean == pytest.approx(32 / 3)
    assert (mlp.batch_limit, mlp.batch_delay) == (64, 0.005)
    # 40 observations: 30 in (0.01, 0.025], 10 in (0.25, 0.5]; the 50 s one is older.
    p50, p99 = mlp.latency
    assert p50 == pytest.approx(0.01 + 0.015 * (20 / 30))
    assert p99 == pytest.approx(0.25 + 0.25 * ((39.6 - 30) / 10))


def test_compute_without_traffic_has_no_batch_mean_or_latency() -> None:
    m = _metrics()
    s = _snap(m)
    f = compute(s, s, dt=2.0)
    (mlp,) = [r for r in f.models if r.model == "tiny-mlp"]
    assert mlp.results["OK"] == 0.0
    assert (mlp.batch_mean, mlp.latency) == (None, (None, None))


def test_compute_treats_a_counter_that_went_down_as_a_restart() -> None:
    before = _metrics()
    before.consumed.labels("requests", "0").inc(1000)
    _observe_latency(before, "tiny-mlp", *[0.3] * 5)
    after = _metrics()  # the replica restarted
    after.consumed.labels("requests", "0").inc(10)
    _observe_latency(after, "tiny-mlp", *[0.02] * 4)
    f = compute(_snap(before), _snap(after), dt=1.0)
    assert f.partitions[0].rate == 10.0
    (mlp,) = [r for r in f.models if r.model == "tiny-mlp"]
    p50, _ = mlp.latency
    assert p50 is not None
    assert 0.01 < p50 <= 0.025


def test_a_series_new_in_this_scrape_has_no_rate_yet() -> None:
    m = _metrics()
    prev = _snap(m)
    m.consumed.labels("requests", "7").inc(99)
    f = compute(prev, _snap(m), dt=1.0)
    assert [(r.partition, r.rate) for r in f.partitions] == [("0", 0.0), ("1", 0.0), ("7", None)]


@pytest.mark.parametrize(("paused", "expected"), [(0, False), (1, None), (2, True)])
def test_per_partition_pause_is_known_only_when_none_or_all_are_paused(
    paused: int, expected: bool | None
) -> None:
    m = _metrics()
    m.paused.set(paused)
    s = _snap(m)
    assert {r.paused for r in compute(s, s, 1.0).partitions} == {expected}


# --- a --workers group's endpoint ----------------------------------------------------------


def _group(workers: dict[str, Metrics], configured: int | None = None) -> Snapshot:
    """The supervisor's exposition of these workers, merged as `GroupServer.metrics` does."""
    texts = {w: generate_latest(m.registry).decode() for w, m in workers.items()}
    slots = [Worker(i) for i in range(max(configured or 0, len(workers)))]
    return parse(group_exposition(texts, slots).decode())


def _worker(partition: str) -> Metrics:
    """A worker that owns one partition: its lag gauge is only there."""
    m = Metrics()
    m.declare_model("tiny-mlp", ["cpu"])
    m.assigned.set(1)
    m.ready.set(1)
    m.batch_limit.labels("tiny-mlp").set(64)
    m.consumed.labels("requests", partition).inc(0)
    m.lag.labels("requests", partition).set(0)
    return m


def test_a_worker_groups_series_are_combined_as_one_pipeline() -> None:
    w0, w1 = _worker("0"), _worker("1")
    prev = _group({"0": w0, "1": w1})
    w0.consumed.labels("requests", "0").inc(100)
    w1.consumed.labels("requests", "1").inc(40)
    w1.consumed.labels("requests", "0").inc(0)  # owned it before a rebalance: its series stays
    w0.results.labels("tiny-mlp", "OK").inc(30)
    w1.results.labels("tiny-mlp", "OK").inc(10)
    w0.batch_size.labels("tiny-mlp").observe(10)
    w1.batch_size.labels("tiny-mlp").observe(30)
    _observe_latency(w0, "tiny-mlp", *[0.02] * 30)  # (0.01, 0.025]
    _observe_latency(w1, "tiny-mlp", *[0.3] * 10)  # (0.25, 0.5]
    w0.lag.labels("requests", "0").set(1234)
    w0.in_flight.set(300)
    w1.in_flight.set(21)
    w1.paused.set(1)
    w1.batch_limit.labels("tiny-mlp").set(128)  # its lag steered it up
    f = compute(prev, _group({"0": w0, "1": w1}), dt=2.0)

    assert f.workers == (2, 2)
    assert (f.in_flight, f.assigned, f.paused, f.ready) == (321, 2, 1, 1)
    rows = {r.partition: r for r in f.partitions}
    assert (rows["0"].lag, rows["0"].rate, rows["1"].lag, rows["1"].rate) == (1234, 50.0, 0, 20.0)
    assert {r.paused for r in f.partitions} == {None}  # one of two: which one is not exported
    (mlp,) = [r for r in f.models if r.model == "tiny-mlp"]
    assert mlp.results["OK"] == 20.0  # both workers' results, not the last one's
    assert mlp.batch_mean == 20.0
    assert mlp.batch_limit == 128  # the highest in use
    # The two workers' buckets added: 30 in (0.01, 0.025] and 10 in (0.25, 0.5].
    p50, p99 = mlp.latency
    assert p50 == pytest.approx(0.01 + 0.015 * (20 / 30))
    assert p99 == pytest.approx(0.25 + 0.25 * ((39.6 - 30) / 10))
    assert "READY  workers 2/2 up" in render(f, 120).splitlines()[0]


def test_a_restarted_worker_resets_only_its_own_counters() -> None:
    w0, w1 = _worker("0"), _worker("1")
    w0.consumed.labels("requests", "0").inc(1000)
    w1.consumed.labels("requests", "1").inc(5000)
    prev = _group({"0": w0, "1": w1})
    w0.consumed.labels("requests", "0").inc(10)
    restarted = _worker("1")
    restarted.consumed.labels("requests", "1").inc(7)
    f = compute(prev, _group({"0": w0, "1": restarted}), dt=1.0)
    assert {r.partition: r.rate for r in f.partitions} == {"0": 10.0, "1": 7.0}


def test_a_group_with_a_worker_not_answering_is_not_ready() -> None:
    w0 = _worker("0")
    s = _group({"0": w0}, configured=2)  # worker 1 is being restarted: no series of its own
    f = compute(s, s, dt=1.0)
    assert (f.workers, f.ready) == ((1, 2), 0)
    assert "NOT READY  workers 1/2 up" in render(f, 120).splitlines()[0]


# --- histogram_quantile ------------------------------------------------------------------


def _promql(q: float, buckets: list[tuple[float, float]]) -> float:
    """PromQL's bucketQuantile written out for finite, sorted, monotonic buckets."""
    total = buckets[-1][1]
    rank = q * total
    b = next(i for i, (_, c) in enumerate(buckets) if c >= rank)
    if b == len(buckets) - 1:
        return buckets[-2][0]
    lo, below = (0.0, 0.0) if b == 0 else buckets[b - 1]
    return lo + (buckets[b][0] - lo) * (rank - below) / (buckets[b][1] - below)


BUCKETS = [(0.1, 10.0), (0.5, 30.0), (1.0, 40.0), (INF, 40.0)]


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        (0.5, 0.3),  # rank 20 in (0.1, 0.5]: 0.1 + 0.4·10/20
        (0.99, 0.98),  # rank 39.6 in (0.5, 1]: 0.5 + 0.5·9.6/10
        (0.1, 0.04),  # rank 4 in the first bucket, which starts at 0
        (0.25, 0.1),  # exactly the first bucket's bound
        (1.0, 1.0),
        (0.0, 0.0),
    ],
)
def test_histogram_quantile_interpolates_like_promql(q: float, expected: float) -> None:
    assert histogram_quantile(q, BUCKETS) == pytest.approx(expected)
    assert histogram_quantile(q, BUCKETS) == pytest.approx(_promql(q, BUCKETS))


def test_histogram_quantile_edge_cases() -> None:
    in_inf = [(0.1, 1.0), (1.0, 2.0), (INF, 10.0)]
    assert histogram_quantile(0.9, in_inf) == 1.0  # rank in +Inf → highest finite bound
    assert histogram_quantile(0.9, list(reversed(in_inf))) == 1.0  # order does not matter
    assert math.isnan(histogram_quantile(0.5, [(0.1, 0.0), (INF, 0.0)]))  # nothing observed
    assert math.isnan(histogram_quantile(0.5, [(0.1, 3.0), (1.0, 5.0)]))  # no +Inf bucket
    assert math.isnan(histogram_quantile(0.5, []))
    assert histogram_quantile(-0.1, BUCKETS) == -INF
    assert histogram_quantile(1.1, BUCKETS) == INF
    # A scrape is not atomic: a bucket below its neighbour is raised to it, as in PromQL.
    assert histogram_quantile(0.5, [(0.1, 10.0), (0.5, 8.0), (1.0, 40.0), (INF, 40.0)]) == (
        pytest.approx(0.5 + 0.5 * (20 - 10) / 30)
    )


def test_histogram_quantile_of_a_real_histogram_matches_the_formula() -> None:
    m = _metrics()
    # Evenly over (0.1, 0.25], then a tail in (1, 2.5].
    _observe_latency(m, "tiny-mlp", *(0.1 + 0.15 * (i + 1) / 100 for i in range(100)))
    _observe_latency(m, "tiny-mlp", *[2.0] * 5)
    s = _snap(m)
    buckets = [
        (float(dict(k)["le"]), v)
        for k, v in s.series("kp_end_to_end_latency_seconds_bucket").items()
        if ("model", "tiny-mlp") in k
    ]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1 + 0.15 * 52.5 / 100)
    assert histogram_quantile(0.99, buckets) == pytest.approx(_promql(0.99, sorted(buckets)))
    assert 1.0 < histogram_quantile(0.99, buckets) <= 2.5


# --- render ------------------------------------------------------------------------------


def _frame() -> top.Frame:
    m = _metrics()
    prev = _snap(m)
    _traffic(m)
    return compute(prev, _snap(m), dt=2.0)


def test_render_shows_header_partition_rows_and_model_rows() -> None:
    text = render(_frame(), 120)
    lines = text.splitlines()
    assert lines[0].startswith("kp-pipeline top")
    assert "READY" in lines[0]
    assert "in flight 321 req, 3.0 MiB" in lines[1]
    assert "paused/assigned 0/2" in lines[1]
    part0 = next(line for line in lines if line.startswith("requests") and " 0 " in line)
    assert part0.split() == ["requests", "0", "1234", "0.75", "50.0", "no"]
    row = next(line for line in lines if line.startswith("tiny-mlp"))
    cells = row.split()
    assert cells[:8] == ["tiny-mlp", "20.0", "1.0", "0.0", "2.0", "10.7", "64", "5.0"]
    assert float(cells[8]) == pytest.approx(20.0)  # p50 ms
    assert "  dead letters: timeout 2.0/s" in lines
    assert any(line.startswith("(none) ") for line in lines)  # dead letters with no model
    assert "\x1b[" not in text


def test_render_cuts_lines_to_width_and_colors_only_when_asked() -> None:
    frame = _frame()
    assert all(len(line) <= 40 for line in render(frame, 40).splitlines())
    colored = render(frame, 120, color=True)
    assert "\x1b[31m" in colored  # the model with errors
    assert colored.count("\x1b[0m") >= 3


def test_render_of_an_empty_replica_says_so() -> None:
    s = parse("# TYPE kp_ready gauge\nkp_ready 0\n")
    text = render(compute(s, s, 2.0), 80)
    assert "NOT READY" in text
    assert "(no partitions)" in text
    assert "(no models)" in text


# --- the command, against a real HTTP server ---------------------------------------------


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[], bytes]], str]]:
    servers: list[ThreadingHTTPServer] = []

    def start(body: Callable[[], bytes]) -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                data = body()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kp-pipeline")
    top.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["top", *argv])


def test_once_scrapes_twice_and_prints_one_frame(
    serve: Callable[[Callable[[], bytes]], str], capsys: pytest.CaptureFixture[str]
) -> None:
    m = _metrics()

    def body() -> bytes:  # every scrape finds two seconds' more traffic
        _traffic(m)
        return generate_latest(m.registry)

    address = serve(body)
    args = _args(address, "--once", "--interval", "0.2", "--no-color")
    assert args.func is top.run
    assert args.func(args) == ExitCode.OK
    out = capsys.readouterr().out
    assert f"http://{address}/metrics" in out.splitlines()[0]
    part1 = next(line for line in out.splitlines() if line.startswith("requests") and " 1 " in line)
    rate = float(part1.split()[4])
    assert 50 / 3 < rate < 50 / 0.2  # 50 records over ~0.2 s plus scrape time
    assert any(line.startswith("tiny-mlp") for line in out.splitlines())
    assert "\x1b[" not in out


def test_live_mode_clears_the_screen_each_frame_and_exits_0_on_ctrl_c(
    serve: Callable[[Callable[[], bytes]], str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    m = _metrics()
    address = serve(lambda: generate_latest(m.registry))
    sleeps = iter([None, None, KeyboardInterrupt()])

    def sleep(_: float) -> None:
        if isinstance(step := next(sleeps), BaseException):
            raise step

    monkeypatch.setattr(top.time, "sleep", sleep)
    args = _args("--url", f"http://{address}/metrics", "--no-color")
    assert top.run(args) == 0
    out = capsys.readouterr().out
    assert out.count(top.CLEAR) == 2
    assert out.count("kp-pipeline top") == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_an_unreachable_endpoint_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = _free_port()
    assert top.run(_args(f"127.0.0.1:{port}", "--once", "--interval", "0.1")) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"kp-pipeline top: cannot reach http://127.0.0.1:{port}/metrics: ")
    assert "refused" in err.lower()
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("page", "message"),
    [
        (b"<html><body><h1>It works!</h1></body></html>", "is not Prometheus text exposition"),
        (b"# TYPE up gauge\nup 1\n", "has no kp_ metrics: is it a kp-pipeline replica?"),
        (b"", "has no kp_ metrics"),
    ],
)
def test_a_page_that_is_not_a_replicas_metrics_is_exit_2(
    serve: Callable[[Callable[[], bytes]], str],
    capsys: pytest.CaptureFixture[str],
    page: bytes,
    message: str,
) -> None:
    address = serve(lambda: page)
    assert top.run(_args(address, "--once", "--interval", "0.1")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kp-pipeline top: http://{address}/metrics ")
    assert message in err


@pytest.mark.parametrize(
    ("target", "url"),
    [
        ("localhost:9000", "http://localhost:9000/metrics"),
        ("10.1.2.3", "http://10.1.2.3:9464/metrics"),
        (":9464", "http://127.0.0.1:9464/metrics"),
        ("http://replica-0:9464", "http://replica-0:9464/metrics"),
        ("https://kp.example/prom/metrics", "https://kp.example/prom/metrics"),
        ("[::1]:9464", "http://[::1]:9464/metrics"),
    ],
)
def test_target_forms(target: str, url: str) -> None:
    assert top.target_url(target) == url


def test_defaults_and_interval_validation(capsys: pytest.CaptureFixture[str]) -> None:
    args = _args()
    assert (args.target, args.url, args.interval, args.once, args.no_color) == (
        None,
        top.DEFAULT_URL,
        2.0,
        False,
        False,
    )
    with pytest.raises(SystemExit):
        _args("--interval", "0")
    assert "must be > 0" in capsys.readouterr().err


def test_a_bad_target_or_an_endpoint_that_is_not_there_is_bad_input(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert top.run(_args("host:port")) == ExitCode.BAD_INPUT
    assert "kp-pipeline top: bad target 'host:port'" in capsys.readouterr().err
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert top.run(_args(f"127.0.0.1:{port}", "--once")) == ExitCode.BAD_INPUT
    assert f"127.0.0.1:{port}" in capsys.readouterr().err
