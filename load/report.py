"""Tables, target checks and the machine description of a benchmark run.

Figures on a shared 2-core machine move by up to 1.5x between runs, so every file written
here carries the machine and package versions, and only ratios from one run are compared.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

__all__ = ["Check", "Row", "ScenarioResult", "machine", "machine_line", "markdown", "save", "write"]

PACKAGES = [
    "confluent-kafka",
    "onnxruntime",
    "torch",
    "tensorflow-cpu",
    "fastavro",
    "numpy",
    "pillow",
]


@dataclass
class Row:
    """One contender's figure."""

    variant: str
    requests: int
    seconds: float
    note: str = ""

    @property
    def rate(self) -> float:
        """Requests per second."""
        return self.requests / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Check:
    """A target from the issue: kp-pipeline's rate over a contender's, and the minimum."""

    name: str
    measured: float
    wanted: float

    @property
    def passed(self) -> bool:
        """Whether the target is met (strictly by the figure; see the noise note)."""
        return self.measured >= self.wanted


@dataclass
class ScenarioResult:
    """Everything measured for one model."""

    name: str
    title: str
    rows: list[Row] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)  # markdown lines after the tables

    def rate(self, variant: str) -> float:
        """The rate of the row named ``variant``."""
        return next(r.rate for r in self.rows if r.variant == variant)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = "unknown"
    mem_gib = 0.0
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
        kib = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal:")
        )
        mem_gib = round(kib / 2**20, 1)
    except (OSError, StopIteration):
        pass
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = "absent"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "broker": "Tansu (memory storage) on loopback, in the same machine",
        "packages": packages,
    }


def table(sc: ScenarioResult) -> list[str]:
    """The scenario's markdown tables: figures, then the targets."""
    kp = sc.rate("kp-pipeline")
    lines = [
        f"### {sc.title}",
        "",
        "| variant | requests | seconds | requests/s | kp-pipeline ÷ this |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in sc.rows:
        note = f" ({r.note})" if r.note else ""
        lines.append(
            f"| {r.variant}{note} | {r.requests} | {r.seconds:.2f} | {r.rate:,.1f} | "
            f"{kp / r.rate if r.rate else 0:.2f}x |"
        )
    lines += ["", "| target | measured | wanted | |", "|---|---:|---:|---|"]
    for c in sc.checks:
        verdict = "PASS" if c.passed else "MISS"
        lines.append(f"| {c.name} | {c.measured:.2f}x | ≥ {c.wanted:g}x | {verdict} |")
    return [*lines, "", *sc.extra]


def markdown(scenarios: list[ScenarioResult], m: dict[str, Any]) -> str:
    """The whole report: one section per scenario, then the machine."""
    lines = []
    for sc in scenarios:
        lines += table(sc)
    lines += [
        machine_line(m),
        "",
        "Timed from each variant's first consumed record to its last output acknowledged "
        "(group joins excluded). Ratios under ~1.2x are within this machine's noise.",
    ]
    return "\n".join(lines) + "\n"


def machine_line(m: dict[str, Any]) -> str:
    """The machine, its packages and the date, in one sentence."""
    pkgs = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    return (
        f"Machine: {m['nproc']} × {m['cpu']}, {m['memory_gib']} GiB RAM, Python {m['python']}, "
        f"{m['broker']}; {pkgs}; {m['date']}."
    )


def save(out: Path, stem: str, text: str, doc: dict[str, Any]) -> None:
    """Write ``stem``.md and ``stem``.json under ``out``, overwriting."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text, encoding="utf-8")
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def write(out: Path, scenarios: list[ScenarioResult], args: dict[str, Any]) -> str:
    """Write latest.json and latest.md under ``out`` (overwriting); returns the markdown."""
    m = machine()
    text = markdown(scenarios, m)
    doc = {
        "machine": m,
        "args": args,
        "scenarios": [
            {
                "name": sc.name,
                "title": sc.title,
                "rows": [{**asdict(r), "rate": r.rate} for r in sc.rows],
                "checks": [{**asdict(c), "passed": c.passed} for c in sc.checks],
            }
            for sc in scenarios
        ],
    }
    save(out, "latest", text, doc)
    return text
