"""deploy/prometheus: the configuration and the rules, checked and unit-tested by promtool.

``promtool`` comes with Debian's ``prometheus`` package; without it these tests fail
(naming the install command), they never skip: `make setup` installs it on CI.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e.prometheus import DEPLOY, tool

PROMETHEUS = DEPLOY / "prometheus"
CONFIG = PROMETHEUS / "prometheus.yml"
KUBERNETES_CONFIG = PROMETHEUS / "prometheus-kubernetes.yml"
ALERTS = PROMETHEUS / "alerts.yml"
ALERTS_TEST = PROMETHEUS / "alerts_test.yml"
# What tests/e2e/test_dashboard_pipe.py strips to get an alert's left-hand side.
THRESHOLD = re.compile(
    r"^(?P<lhs>.+?)\s*(?:==|!=|>=|<=|>|<)\s*(?:bool\s+)?[-+]?[\d.eE+]+\s*$", re.S
)


def promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def _ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"{' '.join(result.args)}:\n{result.stdout}{result.stderr}"


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


def _alerts() -> list[dict[str, Any]]:
    return [r for g in _load(ALERTS)["groups"] for r in g["rules"] if "alert" in r]


def test_prometheus_config_is_valid() -> None:
    result = promtool("check", "config", str(CONFIG))
    _ok(result)
    assert "1 rule files found" in result.stdout + result.stderr


def _kubernetes_sd_supported(tmp: Path) -> bool:
    probe = tmp / "probe.yml"
    probe.write_text("scrape_configs:\n  - job_name: probe\n    kubernetes_sd_configs: []\n")
    return promtool("check", "config", str(probe)).returncode == 0


def test_kubernetes_config_is_valid(tmp_path: Path) -> None:
    config = _load(KUBERNETES_CONFIG)
    (job,) = config["scrape_configs"]
    assert [sd["role"] for sd in job["kubernetes_sd_configs"]] == ["pod"]
    keep = {
        tuple(r["source_labels"]): r["regex"]
        for r in job["relabel_configs"]
        if r.get("action") == "keep"
    }
    assert keep[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)] == "kp-pipeline"
    assert keep[("__meta_kubernetes_pod_container_port_name",)] == "metrics"
    if _kubernetes_sd_supported(tmp_path):
        _ok(promtool("check", "config", str(KUBERNETES_CONFIG)))
        return
    # Debian's promtool is built without Kubernetes service discovery: check everything
    # else (globals, relabeling, rule files) with the discovery swapped for a file one.
    print("promtool lacks kubernetes_sd_configs (Debian's build): checking the rest")
    job["file_sd_configs"] = [{"files": [str(tmp_path / "targets.json")]}]
    del job["kubernetes_sd_configs"]
    config["rule_files"] = [str(PROMETHEUS / f) for f in config["rule_files"]]
    swapped = tmp_path / "prometheus-kubernetes.yml"
    swapped.write_text(yaml.safe_dump(config))
    _ok(promtool("check", "config", str(swapped)))


def test_rules_are_valid() -> None:
    result = promtool("check", "rules", str(ALERTS))
    _ok(result)


def test_alerts_fire_and_stay_silent_as_unit_tested() -> None:
    _ok(promtool("test", "rules", str(ALERTS_TEST)))


def test_every_alert_is_unit_tested_both_ways() -> None:
    cases: dict[str, list[list[Any]]] = {}
    for test in _load(ALERTS_TEST)["tests"]:
        for case in test.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], []).append(case.get("exp_alerts") or [])
    for alert in _alerts():
        name = alert["alert"]
        assert any(cases.get(name, [])), f"{name}: no unit test where it fires"
        assert any(not c for c in cases.get(name, [])), f"{name}: no unit test where it is silent"


@pytest.mark.parametrize("alert", _alerts(), ids=lambda a: str(a["alert"]))
def test_alert_is_actionable(alert: dict[str, Any]) -> None:
    assert alert["labels"]["severity"] in ("warning", "critical")
    assert {"summary", "description"} <= set(alert["annotations"])
    assert alert.get("for"), "alerts wait before firing: no `for` means one bad scrape pages"
    assert THRESHOLD.match(alert["expr"].strip()), "expr must be `<left side> <op> <threshold>`"
