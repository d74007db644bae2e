"""What a person looks at after a load run: per-second series, PNGs, a text summary.

Four pictures, each answering one question:

- latency.png: did latency drift or spike during the run? (every request, by send time,
  with per-second p50/p99 lines)
- latency_cdf.png: what does the tail look like? (histogram and CDF, the client's
  latency beside the pipeline's own ``timings.end_to_end_ms``)
- throughput.png: was the offered load sent, and did the pipeline keep up? (sent and
  received per second against the target)
- backlog.png: did work pile up? (outstanding = sent − received, and the consumer lag
  scraped from /metrics when a URL was given)

matplotlib is imported inside the functions and draws on the Agg canvas directly (no
pyplot, no global state), so importing this module costs nothing and it is thread-safe.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from load.generator import LoadReport, Samples

__all__ = ["outstanding", "per_second", "percentiles", "summary", "write_all"]

PNGS = ("latency.png", "latency_cdf.png", "throughput.png", "backlog.png")
SCATTER_MAX = 50_000  # points drawn in latency.png; beyond that every k-th request


def percentiles(values: np.ndarray[Any, Any]) -> dict[str, float | None]:
    """count, mean, min, p50, p90, p99, p99.9 and max, ignoring NaN (numpy's linear method).

    None, not NaN, where there is nothing to summarise: the report is strict JSON.
    """
    v = _finite(np.asarray(values, dtype=np.float64))
    if v.size == 0:
        return {"count": 0, **dict.fromkeys(("mean", "min", "p50", "p90", "p99", "p99.9", "max"))}
    qs = np.percentile(v, [50, 90, 99, 99.9]).tolist()
    out: dict[str, float | None] = {"count": v.size, "mean": float(v.mean()), "min": float(v.min())}
    out |= dict(zip(("p50", "p90", "p99", "p99.9"), qs, strict=True))
    return out | {"max": float(v.max())}


def _finite(a: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    out: np.ndarray[Any, Any] = a[~np.isnan(a)]
    return out


def _q(a: np.ndarray[Any, Any], q: float) -> float | None:
    a = _finite(a)
    return float(np.percentile(a, q)) if a.size else None


def per_second(s: Samples, duration: float) -> dict[str, list[float | None]]:
    """One row per second of the run: sent, received, outstanding at its end, lag, latency.

    Latency percentiles are of the requests *sent* in that second (so a slow second shows
    where the load was offered); lag is the largest value scraped in that second.
    """
    ends = [duration, *(np.nanmax(a) for a in (s.sent_s, s.recv_s) if _finite(a).size)]
    edges = np.arange(math.ceil(max(ends)) + 1, dtype=np.float64)
    sent = np.histogram(_finite(s.sent_s), edges)[0]
    received = np.histogram(_finite(s.recv_s), edges)[0]
    second = np.floor(np.nan_to_num(s.sent_s, nan=-1.0)).astype(int)
    latency, late = s.latency_ms, (s.sent_s - s.due_s) * 1000.0
    lag = np.asarray(s.lag, dtype=np.float64).reshape(-1, 3)
    lag_second = np.clip(np.floor(lag[:, 0]), 0, None).astype(int)
    rows: dict[str, list[float | None]] = {
        k: []
        for k in (
            "t",
            "sent",
            "received",
            "outstanding",
            "p50_ms",
            "p99_ms",
            "max_lateness_ms",
            "lag_messages",
            "lag_seconds",
        )
    }
    backlog = np.cumsum(sent) - np.cumsum(received)
    for k in range(len(edges) - 1):
        mask, scraped = second == k, lag[lag_second == k]
        rows["t"].append(float(k))
        rows["sent"].append(float(sent[k]))
        rows["received"].append(float(received[k]))
        rows["outstanding"].append(float(backlog[k]))
        rows["p50_ms"].append(_q(latency[mask], 50))
        rows["p99_ms"].append(_q(latency[mask], 99))
        rows["max_lateness_ms"].append(float(late[mask].max()) if mask.any() else None)
        rows["lag_messages"].append(float(scraped[:, 1].max()) if len(scraped) else None)
        rows["lag_seconds"].append(float(scraped[:, 2].max()) if len(scraped) else None)
    return rows


def outstanding(s: Samples, step: float = 0.1) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """(times, requests sent and not yet answered at each time), every ``step`` seconds."""
    sent, recv = np.sort(_finite(s.sent_s)), np.sort(_finite(s.recv_s))
    end = max([0.0, *(a[-1] for a in (sent, recv) if a.size)])
    t = np.arange(0.0, end + step, step)
    return t, np.searchsorted(sent, t, "right") - np.searchsorted(recv, t, "right")


def summary(r: LoadReport) -> str:
    """A few lines for the terminal: what was asked, what was sent, what came back."""
    c, lat, own = r.config, r.latency_ms, r.pipeline_e2e_ms

    def ms(stats: dict[str, float | None]) -> str:
        return "  ".join(
            f"{k} {stats[k]:.1f}" if stats[k] is not None else f"{k} -"
            for k in ("p50", "p90", "p99", "p99.9", "max")
        )

    n, mix, t = r.counts, ", ".join(f"{k} {v:.0%}" for k, v in r.mix.items()), r.target
    lines = [
        f"target     {', '.join(t['models'])}: {t['input']} → {t['output']} ({t['where']})",
        f"schedule   {c.arrival} {c.rate:,.0f}/s for {c.duration:g} s, seed {c.seed}, mix {mix}: "
        f"{n['scheduled']:,} requests ({r.rates['scheduled']:,.1f}/s)",
        f"sent       {n['sent']:,} at {r.achieved_rate:,.1f}/s achieved; lateness p99 "
        f"{r.lateness_ms['p99'] or 0:.2f} ms, worst {r.lateness_ms['max'] or 0:.2f} ms; "
        f"{n['send_failures']} send failures",
        f"outcomes   {n['ok']:,} results, {n['error']:,} errors, {n['dead_letter']:,} dead "
        f"letters; {n['missing']:,} missing, {n['duplicates']:,} duplicates; the last "
        f"{r.drain_s:.2f} s after the last send",
        f"latency    {ms(lat)} ms  (client: produce() called → outcome read)",
        f"pipeline   {ms(own)} ms  (its timings.end_to_end_ms: record timestamp → result)",
    ]
    if r.lag["scrapes"]:
        most = max(v or 0 for v in r.series["lag_messages"])
        worst = max(v or 0 for v in r.series["lag_seconds"])
        lines.append(
            f"lag        max {most:,.0f} records, max {worst:.2f} s "
            f"({len(r.lag['scrapes'])} scrapes of {t['metrics']})"
        )
    else:
        lines.append("lag        not scraped (no --metrics URL)")
    if r.files:
        names = ", ".join(Path(f).name for f in r.files)
        lines.append(f"files      {Path(r.files[0]).parent}/: {names}")
    return "\n".join(lines)


def write_all(r: LoadReport, out: Path) -> list[Path]:
    """report.json, samples.csv and the four PNGs under ``out``; sets ``r.files``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "samples.csv", *(out / p for p in PNGS)]
    r.files = [str(p) for p in paths]
    s = r.samples
    if s is not None:
        _csv(s, paths[1])
        for draw, path in zip((_latency, _cdf, _throughput, _backlog), paths[2:], strict=True):
            fig = _figure()
            draw(fig, r, s)
            fig.savefig(path, dpi=110)
    paths[0].write_text(r.to_json())
    return paths


def _csv(s: Samples, path: Path) -> None:
    """One row per request; sent_wall (epoch s) joins the rows with other logs."""
    names, kinds = ["", "ok", "error", "dead_letter"], list(s.mix)
    columns = [s.due_s, s.sent_s, s.sent_wall, s.latency_ms, s.pipeline_ms]
    with path.open("w") as f:
        f.write(
            "index,kind,due_s,sent_s,sent_wall,latency_ms,pipeline_e2e_ms,outcome,send_failed\n"
        )
        for i, row in enumerate(zip(*(c.tolist() for c in columns), strict=True)):
            due, sent, wall, lat, own = row
            f.write(
                f"{i},{kinds[s.kind[i]]},{due:.6f},{sent:.6f},{wall:.6f},{_num(lat)},"
                f"{_num(own)},{names[s.outcome[i]]},{int(s.failed[i])}\n"
            )


def _num(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.3f}"


def _figure() -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _log_axis(ax: Axes, which: str) -> None:
    """Log scale labelled 20, 50, 100 (not 2×10¹): latencies span decades under load."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis = ax.xaxis if which == "x" else ax.yaxis
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(plain)
    axis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    axis.set_minor_formatter(plain)


def _title(r: LoadReport, what: str) -> str:
    c = r.config
    return (
        f"{what} — {', '.join(r.target['models'])}, {c.arrival} {c.rate:,.0f}/s "
        f"for {c.duration:g} s (seed {c.seed})"
    )


def _latency(fig: Figure, r: LoadReport, s: Samples) -> None:
    ax = fig.add_subplot()
    every = max(1, len(s.sent_s) // SCATTER_MAX)
    for code, label, style in ((1, "result", "."), (2, "error", "x"), (3, "dead letter", "x")):
        pick = np.flatnonzero(s.outcome == code)[::every]
        if pick.size:
            ax.plot(s.sent_s[pick], s.latency_ms[pick], style, ms=2, alpha=0.35, label=label)
    mid = np.asarray(r.series["t"], dtype=float) + 0.5
    for key, color in (("p50_ms", "black"), ("p99_ms", "crimson")):
        y = np.asarray([np.nan if v is None else v for v in r.series[key]], dtype=float)
        ax.plot(mid, y, "-o", color=color, ms=3, lw=1.5, label=f"{key[:-3]} per second")
    ax.axvline(r.config.duration, color="grey", ls=":", label="sending ends")
    _log_axis(ax, "y")
    ax.set_xlabel("send time, s from start")
    ax.set_ylabel("latency, ms (produce() → outcome read)")
    note = f" (every {every}th request)" if every > 1 else ""
    ax.set_title(_title(r, "Latency by send time" + note), fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)


def _cdf(fig: Figure, r: LoadReport, s: Samples) -> None:
    hist, cdf = fig.subplots(1, 2)
    series = [("client", _finite(s.latency_ms)), ("pipeline e2e", _finite(s.pipeline_ms))]
    series = [(name, v[v > 0]) for name, v in series if (v > 0).any()]
    if series:
        lo = min(v.min() for _, v in series)
        hi = max(v.max() for _, v in series)
        bins = np.geomspace(lo, max(hi, lo * 1.01), 60)
        for name, v in series:
            hist.hist(v, bins=bins, histtype="step", lw=1.5, label=name)
            cdf.plot(np.sort(v), np.arange(1, v.size + 1) / v.size, lw=1.5, label=name)
    for key, ls in (("p50", "--"), ("p99", "-."), ("p99.9", ":")):
        value = r.latency_ms[key]
        if value is not None:
            cdf.axvline(value, color="grey", ls=ls, lw=1, label=f"client {key} {value:.1f} ms")
    for ax in (hist, cdf):
        _log_axis(ax, "x")
        ax.set_xlabel("latency, ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    hist.set_ylabel("requests")
    cdf.set_ylabel("fraction of requests ≤ x")
    fig.suptitle(_title(r, "Latency distribution"), fontsize=10)


def _throughput(fig: Figure, r: LoadReport, s: Samples) -> None:
    ax = fig.add_subplot()
    t = np.asarray(r.series["t"], dtype=float)
    edges = np.append(t, t[-1] + 1 if t.size else 1.0)
    for key, label in (("sent", "sent"), ("received", "outcomes received")):
        ax.stairs(np.asarray(r.series[key], dtype=float), edges, lw=1.5, label=label)
    ax.axhline(r.config.rate, color="grey", ls=":", label=f"target {r.config.rate:,.0f}/s")
    ax.set_xlabel("s from start")
    ax.set_ylabel("requests per second")
    ax.set_title(
        _title(r, f"Throughput (achieved send rate {r.achieved_rate:,.1f}/s)"), fontsize=10
    )
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)


def _backlog(fig: Figure, r: LoadReport, s: Samples) -> None:
    ax = fig.add_subplot()
    t, waiting = outstanding(s)
    ax.plot(t, waiting, lw=1.5, label="outstanding (sent − received)")
    lag = np.asarray(s.lag, dtype=np.float64).reshape(-1, 3)
    if len(lag):
        ax.plot(lag[:, 0], lag[:, 1], "o-", ms=3, lw=1, label="consumer lag, records (/metrics)")
        seconds = ax.twinx()
        seconds.plot(
            lag[:, 0],
            lag[:, 2],
            "s--",
            ms=3,
            lw=1,
            color="crimson",
            label="consumer lag, s (right)",
        )
        seconds.set_ylabel("lag, seconds")
        seconds.legend(loc="upper right", fontsize=8)
    ax.axvline(r.config.duration, color="grey", ls=":", label="sending ends")
    ax.set_xlabel("s from start")
    ax.set_ylabel("requests")
    ax.set_title(_title(r, "Backlog"), fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(True, alpha=0.3)
