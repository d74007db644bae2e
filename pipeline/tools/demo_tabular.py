"""The tabular demo's requests and report: the breast-cancer rows, checked against the library.

Every row of the data set goes to every served version of the model (each request names
its version), with its 30 features by name, plus one request that misspells a feature
(its dead letter names it). The report sets each version's answers beside the library's
own ``predict_proba``/``predict`` on the same float32 rows, run here in the demo's
process: the largest probability difference, and whether every label agrees.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config.topology import ModelSettings, Topology
from pipeline.tools.zoo.tabular import breast_cancer
from schemas.errors import KpError
from schemas.messages import DeadLetter, Request, Result

__all__ = ["TABULAR", "is_tabular", "library_answers", "report_rows", "row_requests"]

TABULAR = ("xgboost", "lightgbm", "sklearn")
Echo = Callable[[str], None]


def is_tabular(model: ModelSettings) -> bool:
    """Whether the demo serves ``model`` rows (its backend, or its artifact's, is tabular)."""
    backend = model.backend
    if backend is None:
        from backends.detect import detect

        try:
            backend = detect(model.artifact)[0]
        except KpError:
            return False
    return backend in TABULAR


def row_requests(topology: Topology, rows: int) -> tuple[list[Request], int]:
    """The requests (each row to each version, one misspelt) and how many should answer."""
    name = topology.models[0].name
    versions = [m.version for m in topology.models if m.name == name]
    x, _, names = breast_cancer()
    requests = []
    for i in range(rows):
        row = {n: x[i % len(x), j : j + 1] for j, n in enumerate(names)}
        for v in versions:
            requests.append(Request(f"demo-{i:05d}-{v}", name, row, model_version=v))
    bad = {
        ("mean radios" if n == "mean radius" else n): x[0, j : j + 1] for j, n in enumerate(names)
    }
    requests.append(Request("demo-misspelt", name, bad, model_version=versions[0]))
    return requests, rows * len(versions)


def library_answers(model: ModelSettings, x: np.ndarray[Any, Any]) -> tuple[Any, Any]:
    """``(predict_proba, predict)`` of the artifact by its own library, on rows ``x``."""
    from backends.detect import detect

    path = Path(model.artifact)
    backend = model.backend or detect(path)[0]
    names = breast_cancer()[2]
    if backend == "xgboost":
        import xgboost

        clf = xgboost.XGBClassifier()
        clf.load_model(str(path))
        return clf.predict_proba(x), clf.predict(x)
    if backend == "lightgbm":
        import lightgbm

        p = np.asarray(lightgbm.Booster(model_file=str(path)).predict(x), dtype=np.float64)
        return np.column_stack([1 - p, p]), (p > 0.5).astype(np.int64)
    import pandas as pd
    import skops.io as sio

    est = sio.load(path, trusted=sio.get_untrusted_types(file=path))
    frame = pd.DataFrame(x, columns=names)
    return est.predict_proba(frame), est.predict(frame)


def report_rows(
    topology: Topology, results: list[Result], letters: list[DeadLetter], dlq: str, echo: Echo
) -> None:
    """Each version's accuracy and its agreement with the library, then the dead letter."""
    x, y, _ = breast_cancer()
    name = topology.models[0].name
    echo("")
    echo(f"{'version':<10} {'results':>7} {'accuracy':>8} {'max |p - library p|':>20} labels")
    worst = 0.0
    for model in (m for m in topology.models if m.name == name):
        mine = sorted((r for r in results if r.model_version == model.version), key=lambda r: r.id)
        rows = np.array([int(r.id.split("-")[1]) % len(x) for r in mine])
        probs = np.stack([r.outputs["probabilities"] for r in mine])
        labels = np.array([int(r.outputs["label"][0]) for r in mine])
        ref_p, ref_label = library_answers(model, x[rows])
        diff = float(np.max(np.abs(probs - ref_p.astype(np.float32))))
        same = bool(np.array_equal(labels, np.asarray(ref_label).astype(np.int64)))
        worst = max(worst, diff if same else np.inf)
        accuracy = float(np.mean(labels == y[rows]))
        agree = "the library's own predict" if same else "DIFFER from the library's predict"
        echo(f"{model.version:<10} {len(mine):>7} {accuracy:>8.1%} {diff:>20.2e} {agree}")
    echo("(accuracy on the rows the models were trained on: the answers are the models', not a")
    echo(" measure of how well they generalise)")
    for d in letters:
        echo(f"dead letter: {d.id} → {dlq}: {d.reason}: {d.error[:100]}")
    echo("")
    if worst > 1e-6:
        raise KpError("the pipeline's answers differ from the library's own on the same rows")
