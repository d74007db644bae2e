"""The documentation site's reference pages, generated from the code they document.

The topology reference walks the pydantic models that load a topology
(`pipeline.config.topology`); the stage and backend pages read each installed plugin's
parameter model (``Params``, ``Options``) and docstrings; the metrics catalog reads the
metrics a replica registers (`pipeline.observability.metrics`). The site's build
(``mkdocs build``, through ``docs/hooks.py``) writes them at every build, so a page cannot
drift from the code; `undocumented` lists what has no words yet, and a test fails on it.
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

__all__ = ["PAGES", "pages", "results", "undocumented"]

COMMON = {
    "input": "The column the stage reads (a tensor of the request, or one an earlier stage wrote).",
    "output": "The column it writes; where the stage gives no default, its input's, "
    "replaced in place.",
    "keep_input": "Keep the input column for later stages (by default it is dropped, so "
    "results carry only what postprocessing made).",
    "labels": "A text file of class names, one per line, relative to the topology file.",
}
"""Parameters that mean the same in every stage that has them."""


def _doc(obj: Any) -> str:
    return inspect.cleandoc(obj.__doc__ or "")


def _type(annotation: Any) -> str:
    text = repr(annotation) if not isinstance(annotation, type) else annotation.__name__
    for noise in ("<class '", "'>"):
        text = text.replace(noise, "")
    text = re.sub(r"\b(?:[a-z_][a-z0-9_]*\.)+(?=[A-Za-z])", "", text)  # module paths
    return text.replace(" | ", " or ")  # a pipe would end the table cell


def _bounds(field: FieldInfo) -> str:
    """A field's numeric and length limits (``≥ 1, ≤ 64``), from its metadata."""
    signs = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "length ≥",
             "max_length": "length ≤", "pattern": "matches"}  # fmt: skip
    found = []
    for item in field.metadata:
        for attr, sign in signs.items():
            value = getattr(item, attr, None)
            if value is not None:
                found.append(f"{sign} `{value}`" if attr == "pattern" else f"{sign} {value}")
    return f" ({', '.join(found)})" if found else ""


def _default(field: FieldInfo) -> str:
    if field.default is PydanticUndefined:
        return "required" if field.default_factory is None else "(empty)"
    value = field.default
    if isinstance(value, BaseModel):
        return "(its defaults)"
    return f"`{value!r}`" if value is not None else "`null`"


def _words(name: str, field: FieldInfo, owner_doc: str) -> str | None:
    """A field's documentation: its own, the common one, or its owner's mention of it."""
    if field.description:
        return field.description
    if name in COMMON:
        return COMMON[name]
    if f"``{name}``" in owner_doc or f"`{name}`" in owner_doc:
        return "See the description above."
    return None


def _nested(annotation: Any) -> list[type[BaseModel]]:
    found = []
    for t in [annotation, *typing.get_args(annotation)]:
        for inner in [t, *typing.get_args(t)]:
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                found.append(inner)
    return found


def _table(model: type[BaseModel], owner_doc: str) -> list[str]:
    lines = ["| key | type (allowed values) | default | what it does |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        nested = _nested(field.annotation)
        words = _words(name, field, owner_doc)
        if words is None and nested:
            words = _doc(nested[0]).split("\n\n")[0].replace("\n", " ")
        text = (words or "**undocumented**").replace("\n", " ").replace("|", "\\|")
        kind = f"`{_type(field.annotation)}`{_bounds(field)}"
        lines.append(f"| `{name}` | {kind} | {_default(field)} | {text} |")
    return lines


def _models(root: type[BaseModel]) -> Iterator[tuple[str, type[BaseModel]]]:
    """Every model under ``root``, with the dotted path it is reached by, once each."""
    seen: set[type[BaseModel]] = set()
    todo: list[tuple[str, type[BaseModel]]] = [("", root)]
    while todo:
        path, model = todo.pop(0)
        if model in seen:
            continue
        seen.add(model)
        yield path, model
        for name, field in model.model_fields.items():
            for inner in _nested(field.annotation):
                todo.append((f"{path}.{name}".lstrip("."), inner))


def topology_reference() -> str:
    """Every section and key of topology.yaml."""
    from pipeline.config.topology import Topology

    out = [
        "# Topology reference",
        "",
        "Generated from the configuration models (`pipeline/config/`) at every build of "
        "this site. `kp-pipeline schema` prints the same as a JSON Schema, and "
        "`kp-pipeline validate topology.yaml` checks a file against it and loads its "
        "models. `${VAR}` and `${VAR:-default}` may stand for any value.",
        "",
    ]
    for path, model in _models(Topology):
        title = f"`{path}`" if path else "The top level"
        out += [f"## {title}", "", _doc(model), "", *_table(model, _doc(model)), ""]
    return "\n".join(out)


def _plugins(group: str, attr: str) -> Iterator[tuple[str, Any, type[BaseModel] | None]]:
    from schemas.plugins import available, load_plugin

    for name in sorted(available(group)):
        try:
            plugin = load_plugin(group, name, kind=attr)
        except Exception:
            yield name, None, None
            continue
        params = getattr(plugin, attr, None)
        ok = isinstance(params, type) and issubclass(params, BaseModel)
        yield name, plugin, params if ok else None


def plugins_reference(group: str, attr: str, title: str, intro: str) -> str:
    """One section per installed plugin: its docstrings and its parameters."""
    out = [f"# {title}", "", intro, ""]
    for name, plugin, params in _plugins(group, attr):
        out += [f"## `{name}`", ""]
        if plugin is None:
            out += ["Not importable on the machine that built this site.", ""]
            continue
        module = inspect.getmodule(plugin)
        text = _doc(plugin) if attr == "Params" else _doc(module)
        out += [text, ""]
        if params is not None:
            owner = f"{_doc(params)}\n{text}"
            if attr == "Params":
                out += [_doc(params), ""]
            out += [*_table(params, owner), ""]
    return "\n".join(out)


def metrics_reference() -> str:
    """Every metric a replica exports: name, type, labels, help."""
    from pipeline.observability.metrics import Metrics

    out = [
        "# Metrics catalog",
        "",
        "Generated from the metrics a replica registers "
        "(`pipeline/observability/metrics.py`). Counters are exported with `_total`; "
        "histograms with `_bucket`, `_sum` and `_count`.",
        "",
        "| metric | type | labels | what it counts |",
        "|---|---|---|---|",
    ]
    for family in _families(Metrics()):
        name, kind, labels, text = family
        out.append(f"| `{name}` | {kind} | {', '.join(labels) or '—'} | {text} |")
    return "\n".join(out) + "\n"


def _families(metrics: Any) -> list[tuple[str, str, list[str], str]]:
    found = []
    for collector in list(metrics.registry._collector_to_names):
        name = getattr(collector, "_name", None)
        if name is None or not name.startswith("kp_"):
            continue
        kind = getattr(collector, "_type", "")
        suffix = "_total" if kind == "counter" else ""
        labels = list(getattr(collector, "_labelnames", ()))
        found.append((name + suffix, kind, labels, getattr(collector, "_documentation", "")))
    return sorted(found)


PAGES = {
    "reference/topology.md": topology_reference,
    "reference/stages.md": lambda: plugins_reference(
        "kp_pipeline.stages",
        "Params",
        "Stages",
        "Every installed preprocessing and postprocessing stage, from its class and its "
        "parameter model. In topology.yaml a stage is `{stage: <name>, <parameters>}`; "
        "`kp-pipeline stages` lists what is installed.",
    ),
    "reference/backends.md": lambda: plugins_reference(
        "kp_pipeline.backends",
        "Options",
        "Backends",
        "Every installed backend, from its module's documentation and its `options` "
        "model. `kp-pipeline backends` says which can run on a machine, and why not.",
    ),
    "reference/metrics.md": metrics_reference,
}
"""The generated pages, by their path in the site."""


def pages() -> dict[str, str]:
    """Every generated page's text."""
    return {path: make() for path, make in PAGES.items()}


def results(root: Path) -> dict[str, str | bytes]:
    """The benchmark results page and its plots, from ``load/results/`` as committed.

    The files `load.bench`, `load.backends`, `load.backlog` and the others write are shown
    as they are, with the latency runs' plots, so the site shows the latest figures of
    each benchmark without a copy that could go stale.
    """
    folder = root / "load" / "results"
    out: dict[str, str | bytes] = {}
    text = [
        "# Benchmark results",
        "",
        "The result files the benchmarks wrote (`load/results/`), as committed; how each "
        "was measured and what the figures say is on [Benchmarks](../benchmarks.md).",
        "",
    ]
    for md in sorted(folder.glob("*.md")):
        body = md.read_text().replace("\n# ", "\n### ").replace("\n## ", "\n### ")
        body = body[2:] if body.startswith("# ") else body
        text += [f"## `{md.name}`", "", body.strip(), ""]
    for run in sorted(p for p in folder.glob("latency-*") if p.is_dir()):
        text += [f"## Latency run: {run.name.removeprefix('latency-')}", ""]
        for png in sorted(run.glob("*.png")):
            out[f"benchmarks/{run.name}/{png.name}"] = png.read_bytes()
            text += [f"![{png.stem}]({run.name}/{png.name})", ""]
    out["benchmarks/results.md"] = "\n".join(text)
    return out


def undocumented() -> list[str]:
    """Config fields, stage parameters, backend options and metrics without words."""
    from pipeline.config.topology import Topology
    from pipeline.observability.metrics import Metrics

    missing = []
    for path, model in _models(Topology):
        for name, field in model.model_fields.items():
            nested = _nested(field.annotation)
            if _words(name, field, "") is None and not (nested and _doc(nested[0])):
                missing.append(f"topology {path}.{name}".replace(" .", " "))
    for group, attr in (("kp_pipeline.stages", "Params"), ("kp_pipeline.backends", "Options")):
        for plugin_name, plugin, params in _plugins(group, attr):
            if plugin is None or params is None:
                continue
            owner = f"{_doc(params)}\n{_doc(plugin)}\n{_doc(inspect.getmodule(plugin))}"
            for name, field in params.model_fields.items():
                if _words(name, field, owner) is None:
                    missing.append(f"{attr.lower()} {plugin_name}.{name}")
    missing += [f"metric {n}" for n, _, _, text in _families(Metrics()) if not text.strip()]
    return missing
