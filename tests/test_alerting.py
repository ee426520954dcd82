"""The alerting and recording rules, checked by promtool and run by a real Prometheus against the real service.

``docker/prometheus/rules/onestage.yml`` is the one source of the rules: the compose stack mounts it, and
``deploy/kubernetes/base/prometheusrule.yaml`` carries the same groups for the Prometheus operator (rewritten from
it by ``python -m tests.test_alerting``; a test holds them equal). ``promtool check rules`` validates both and
``promtool test rules`` runs ``tests/prometheus/onestage_rules_test.yml`` (input series -> expected alerts, a
firing and a silent case for every alerting rule). Every alert is documented: a severity, a summary, a
description and a runbook section in docs/operations.md.

Then Debian's ``prometheus`` (2.42) scrapes ``python -m service`` on loopback with the repository's scrape config
and rules, under normal load, under overload and after it, and every dashboard query, the Prometheus adapter's HPA
query and the alerts are read back from it (the last test's docstring says how its clock is compressed).

promtool and prometheus come from Debian's ``prometheus`` package, which the README's test command installs: a
missing binary fails these tests rather than skipping them.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, get_args

import httpx
import numpy as np
import yaml
from PIL import Image

from export.onnx_export import export_onnx
from service.launcher import ServiceProcess, free_port
from service.metrics import LATENCY_BUCKETS, METRICS, MODEL_STATES
from service.models import State
from tests.service_models import CATEGORY_IDS, CLASS_NAMES, tiny_detector
from tests.test_deployment import (
    DCGM_DEFAULT_COUNTERS,
    PROMETHEUS,
    PROVISIONING,
    RULES,
    dashboard_queries,
    dashboards,
    promql_parts,
    recorded_series,
    rule_groups,
)

REPO = Path(__file__).resolve().parents[1]
RULE_FILE = RULES / "onestage.yml"
RULE_TESTS = REPO / "tests" / "prometheus" / "onestage_rules_test.yml"
PROMETHEUS_RULE = REPO / "deploy" / "kubernetes" / "base" / "prometheusrule.yaml"
KUSTOMIZATION = REPO / "deploy" / "kubernetes" / "base" / "kustomization.yaml"
ADAPTER_VALUES = REPO / "deploy" / "kubernetes" / "prometheus-adapter" / "values.yaml"
OPERATIONS = REPO / "docs" / "operations.md"
SEVERITIES = ("critical", "warning", "info")
RUNBOOK_PARTS = ("**What it means.**", "**How to check.**", "**What to do.**")
TARGET_LABELS = {"job", "instance", "namespace", "pod"}  # added by Prometheus (compose) or the PodMonitor (operator)
PROMETHEUS_RULE_HEADER = """\
# The rules of docker/prometheus/rules/onestage.yml as a PrometheusRule for the Prometheus operator: the same
# groups, written by `python -m tests.test_alerting` (tests/test_alerting.py fails while they differ: edit the
# compose rule file, then rerun it). The operator's Prometheus loads it when its ruleSelector selects it:
# kube-prometheus-stack selects the label `release: <its release name>` unless ruleSelectorNilUsesHelmValues is
# false (docs/operations.md, "Loading the rules").
"""


# ---------------------------------------------------------------- binaries and rules
def binary(name: str) -> str:
    """The path of a Debian ``prometheus`` package binary; the README's test command installs it, so a missing one
    is a failure, not a skip."""
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} not found: run the README's test command (apt-get install prometheus)")
    return path


def alerting_rules() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"] if "alert" in rule]


def alert_names() -> set[str]:
    return {rule["alert"] for rule in alerting_rules()}


def rule_constant(record: str) -> dict[str, Any]:
    (rule,) = [rule for group in rule_groups() for rule in group["rules"] if rule.get("record") == record]
    return rule


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def runbook_sections() -> dict[str, str]:
    """Anchor -> text of every ``###`` section of docs/operations.md."""
    sections: dict[str, str] = {}
    for chunk in re.split(r"^### ", OPERATIONS.read_text(), flags=re.M)[1:]:
        heading, _, body = chunk.partition("\n")
        sections[anchor(heading)] = body.split("\n## ")[0]
    return sections


def prometheus_rule() -> dict[str, Any]:
    """The PrometheusRule that carries the compose rule file's groups."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "onestage"},
        "spec": {"groups": yaml.safe_load(RULE_FILE.read_text())["groups"]},
    }


class _BlockStrings(yaml.SafeDumper):
    """Multi-line strings (the longer PromQL expressions) as ``|`` blocks, as in the compose rule file."""


_BlockStrings.add_representer(
    str,
    lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None),
)


def render_prometheus_rule() -> str:
    body = yaml.dump(prometheus_rule(), Dumper=_BlockStrings, sort_keys=False, width=120, allow_unicode=True)
    return PROMETHEUS_RULE_HEADER + body


# ---------------------------------------------------------------- promtool
def test_promtool_checks_the_compose_rules_and_the_prometheus_rule(tmp_path: Path) -> None:
    count = sum(len(group["rules"]) for group in rule_groups())
    spec = tmp_path / "prometheusrule-spec.yml"
    spec.write_text(yaml.safe_dump(yaml.safe_load(PROMETHEUS_RULE.read_text())["spec"]))
    for path in (RULE_FILE, spec):
        result = subprocess.run(
            [binary("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"SUCCESS: {count} rules found" in result.stdout, result.stdout


def test_promtool_unit_tests_fire_and_stay_silent() -> None:
    result = subprocess.run(
        [binary("promtool"), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr
    # each alerting rule (name and its own labels: a burn-rate window pair) fires in some case, and each alert
    # name is expected silent in some case
    cases = [
        case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test.get("alert_rule_test", [])
    ]
    firing = [(c["alertname"], a["exp_labels"]) for c in cases for a in c["exp_alerts"]]
    for rule in alerting_rules():
        assert any(name == rule["alert"] and rule["labels"].items() <= labels.items() for name, labels in firing), (
            f"no promtool case fires {rule['alert']} {rule['labels']}"
        )
    silent = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert alert_names() <= silent, f"no silent case for {alert_names() - silent}"


# ---------------------------------------------------------------- the rules against the service and the docs
def test_every_alert_has_a_severity_summary_description_and_runbook() -> None:
    sections = runbook_sections()
    for rule in alerting_rules():
        name = rule["alert"]
        assert name.startswith("OneStage"), f"{name}: the dashboard's alert list filters on the OneStage prefix"
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description", "runbook_url"}, name
        assert annotations["summary"].strip() and len(annotations["description"]) > len(annotations["summary"])
        path, _, fragment = annotations["runbook_url"].partition("#")
        assert path == OPERATIONS.relative_to(REPO).as_posix() and fragment == anchor(name), annotations["runbook_url"]
        assert fragment in sections, f"docs/operations.md has no section {name}"
        for part in RUNBOOK_PARTS:
            assert part in sections[fragment], f"the runbook of {name} lacks {part}"


def test_rules_read_only_series_the_service_and_dcgm_export() -> None:
    """Every selector names a family of service.metrics.METRICS (by the labels it exports, plus the target labels),
    a default DCGM exporter counter, ``up``, or a series some rule records; label values it matches exist."""
    exported: dict[str, set[str]] = {}
    for spec in METRICS:
        suffixes = ("_bucket", "_count", "_sum") if spec.kind == "histogram" else ("",)
        for suffix in suffixes:
            exported[spec.name + suffix] = set(spec.labels) | ({"le"} if suffix == "_bucket" else set())
    recorded = recorded_series()
    for group in rule_groups():
        for rule in group["rules"]:
            selectors, grouping = promql_parts(rule["expr"])
            for selector in selectors:
                if selector.metric in recorded:
                    continue
                if selector.metric.startswith("DCGM_"):
                    assert selector.metric in DCGM_DEFAULT_COUNTERS, rule["expr"]
                elif selector.metric == "up":
                    assert selector.labels == {"job"}, rule["expr"]
                else:
                    assert selector.metric in exported, f"{selector.metric} is not in /metrics: {rule['expr']}"
                    assert selector.labels <= exported[selector.metric] | TARGET_LABELS, rule["expr"]
            assert grouping <= {"model", "le"}, f"recorded and alerting series are per model: {rule['expr']}"
    states = set(re.findall(r'state="(\w+)"', RULE_FILE.read_text()))
    assert states and states <= set(MODEL_STATES), states
    assert MODEL_STATES == get_args(State), "the metric's states are the registry's states"


def test_objectives_are_ratios_and_the_latency_threshold_is_a_bucket_bound() -> None:
    for record in ("onestage:slo_availability_objective", "onestage:slo_latency_objective"):
        match = re.fullmatch(r"vector\((0\.\d+)\)", rule_constant(record)["expr"])
        assert match and 0.9 <= float(match[1]) < 1, f"{record}: an objective is a ratio such as 0.999"
    threshold = rule_constant("onestage:slo_latency_threshold")["labels"]["le"]
    # the `le` label as prometheus_client writes it (repr of the float: "2.5", "1.0"), or `and on (le)` matches nothing
    assert threshold in {repr(float(bound)) for bound in LATENCY_BUCKETS}, threshold


def test_prometheus_rule_carries_the_compose_groups() -> None:
    """One source of truth: the PrometheusRule is the compose rule file's groups, and is in the kustomize base."""
    written = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert written == prometheus_rule()
    assert PROMETHEUS_RULE.read_text() == render_prometheus_rule(), "rewrite it: python -m tests.test_alerting"
    assert PROMETHEUS_RULE.name in yaml.safe_load(KUSTOMIZATION.read_text())["resources"]


def test_documented_overlay_patch_changes_the_latency_threshold() -> None:
    """docs/operations.md's kustomize patch for another latency threshold addresses the threshold's ``le``."""
    blocks = re.findall(r"```yaml\n(patches:.*?)```", OPERATIONS.read_text(), flags=re.S)
    assert len(blocks) == 1, "docs/operations.md should show one overlay patch"
    (patch,) = yaml.safe_load(blocks[0])["patches"]
    assert patch["target"] == {"kind": "PrometheusRule", "name": prometheus_rule()["metadata"]["name"]}
    (operation,) = yaml.safe_load(patch["patch"])
    assert operation["op"] == "replace"
    *rule_path, labels, leaf = operation["path"].strip("/").split("/")
    node: Any = prometheus_rule()
    for key in rule_path:
        node = node[int(key)] if isinstance(node, list) else node[key]
    assert node.get("record") == "onestage:slo_latency_threshold" and labels == "labels", operation["path"]
    assert leaf == "le" and operation["value"] in {repr(float(bound)) for bound in LATENCY_BUCKETS}


def test_dashboard_shows_the_objectives_and_the_alerts() -> None:
    dashboard = dashboards()["onestage.json"]
    (datasource,) = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasource["jsonData"]["manageAlerts"] is True, (
        "Grafana lists a datasource's rules only when it manages them"
    )
    (alerts,) = [panel for panel in dashboard["panels"] if panel["type"] == "alertlist"]
    options = alerts["options"]
    assert options["datasource"] == datasource["name"], "the alert list names its datasource by name"
    assert all(options["alertName"] in name for name in alert_names())
    assert options["stateFilter"]["firing"] and options["stateFilter"]["pending"]
    exprs = dashboard_queries(dashboard)
    for slo in ("availability", "latency"):
        for window in ("1h", "6h", "3d"):
            assert any(f"model:onestage_slo_{slo}_errors:ratio_rate{window}" in e for e in exprs), (slo, window)
    for expr in exprs:
        for selector in promql_parts(expr)[0]:
            if selector.metric.startswith("model:"):
                assert "model" in selector.labels, f"not filtered by $model: {expr}"
    # thresholds drawn on the burn-rate panel are the paging factors of the rules
    (burn,) = [p for p in dashboard["panels"] if p["title"] == "Error-budget burn rate"]
    steps = {step["value"] for step in burn["fieldConfig"]["defaults"]["thresholds"]["steps"]} - {None}
    factors = {float(m) for m in re.findall(r"> ([\d.]+) \*", RULE_FILE.read_text())}
    critical = {
        float(re.search(r"> ([\d.]+) \*", rule["expr"])[1])
        for rule in alerting_rules()
        if rule["labels"].get("slo") and rule["labels"]["severity"] == "critical"
    }
    assert critical == steps and critical < factors


# ---------------------------------------------------------------- a real Prometheus against the real service
TIME_SCALE = 60  # the rules' durations are divided by this: one minute of theirs is one second of the test
INTERVAL = "1s"  # scrape and rule evaluation
TEMPLATE_VARIABLES = {  # Grafana's, as the dashboard would fill them on a 1 s scrape interval
    "$model": ".*",  # "All"
    "$__rate_interval": "10s",
    "$__range": "5m",  # the whole test
}
NAMESPACE, POD = "onestage-test", "onestage-0"  # the target labels the operator's PodMonitor adds
NORMAL_S = 6.0  # longer than the compressed 5-minute window, so the shed ratio is read over normal load only
ALERT_WAIT_S = 40.0
LIMIT_S = 180.0  # hard wall-clock limit of the whole run (it takes about 40 s on 2 busy cores)
T = TypeVar("T")


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the test (main thread) after ``seconds``, whatever it waits on."""

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"the real-Prometheus run took over {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def wait_for(probe: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll ``probe`` every 0.25 s until it returns something other than None (or False); that is returned."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := probe():
            return value
        time.sleep(0.25)
    raise TimeoutError(f"{what}: not within {timeout} s")


def duration_seconds(text: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    match = re.fullmatch(r"(\d+)([smhdw])", text)
    assert match, f"unexpected duration {text!r}"
    return int(match[1]) * units[match[2]]


def compress(text: str) -> str:
    """A rule duration divided by TIME_SCALE (every duration in the rules is a whole number of minutes)."""
    seconds = duration_seconds(text)
    assert seconds % TIME_SCALE == 0, text
    return f"{seconds // TIME_SCALE}s"


def compressed_rule_groups() -> list[dict[str, Any]]:
    """The rule file with every range (``[5m]``) and ``for`` divided by TIME_SCALE, nothing else changed."""
    groups = yaml.safe_load(RULE_FILE.read_text())["groups"]
    for group in groups:
        for rule in group["rules"]:
            rule["expr"] = re.sub(r"\[(\w+)\]", lambda m: f"[{compress(m[1])}]", rule["expr"])
            if "for" in rule:
                rule["for"] = compress(rule["for"])
    return groups


def scrape_config(service_port: int, rules: Path) -> dict[str, Any]:
    """docker/prometheus/prometheus.yml on loopback: the service's job at its port with the target labels the
    PodMonitor would add, the DCGM job at a port nothing listens on (as without the gpu-metrics profile), the
    compressed rules, and the test's interval."""
    config = yaml.safe_load(PROMETHEUS.read_text())
    config["global"] = {"scrape_interval": INTERVAL, "evaluation_interval": INTERVAL}
    config["rule_files"] = [str(rules)]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"onestage", "dcgm"}, set(jobs)
    jobs["onestage"]["static_configs"] = [
        {"targets": [f"127.0.0.1:{service_port}"], "labels": {"namespace": NAMESPACE, "pod": POD}}
    ]
    jobs["dcgm"]["static_configs"] = [{"targets": [f"127.0.0.1:{free_port()}"]}]
    return config


class Prometheus:
    """Debian's prometheus on a free loopback port, its TSDB in ``workdir``."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = workdir / "prometheus.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    binary("prometheus"),
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={workdir / 'tsdb'}",
                    f"--web.listen-address={self.url.removeprefix('http://')}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def api(self, path: str, **params: str) -> Any:
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.api("query", query=expr)["result"]

    def alerts(self, name: str) -> list[dict[str, Any]]:
        return [a for a in self.api("alerts")["alerts"] if a["labels"]["alertname"] == name]

    def wait_ready(self, timeout: float) -> None:
        def ready() -> bool:
            assert self.process.poll() is None, f"prometheus exited:\n{self.log_path.read_text()}"
            try:
                return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout, "prometheus ready")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Load:
    """``clients`` threads posting one image to ``POST /segment?model=...`` in a loop until ``stop``; counts the
    answers by status."""

    def __init__(self, url: str, model: str, image: bytes, clients: int, pause_s: float) -> None:
        self.statuses: Counter[int] = Counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()

        def client() -> None:
            with httpx.Client(timeout=30) as http:
                while not self._stop.is_set():
                    status = http.post(
                        f"{url}/segment",
                        params={"model": model},
                        content=image,
                        headers={"Content-Type": "image/png"},
                    ).status_code
                    with self._lock:
                        self.statuses[status] += 1
                    self._stop.wait(pause_s)

        self._threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> Counter[int]:
        self._stop.set()
        for thread in self._threads:
            thread.join(35)
        return self.statuses


def png_image() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, size=(128, 192, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def substitute(expr: str) -> str:
    for variable, value in TEMPLATE_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable the test does not fill: {expr}"
    return expr


def adapter_query() -> tuple[str, str]:
    """The Prometheus adapter rule's series query, and its metrics query as the adapter sends it for the HPA's
    per-pod metric in NAMESPACE (template filled as prometheus-adapter fills it for a pods resource)."""
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    series = re.fullmatch(r"(\w+)\{.*\}", rule["seriesQuery"])
    assert series, rule["seriesQuery"]
    query = (
        rule["metricsQuery"]
        .replace("<<.Series>>", series[1])
        .replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}",pod=~"{POD}"')
        .replace("<<.GroupBy>>", "pod")
    )
    assert "<<" not in query, query
    return rule["seriesQuery"], query


def test_real_prometheus_scrapes_the_service_and_alerts_on_overload(tmp_path: Path) -> None:
    """Debian's Prometheus 2.42 scrapes ``python -m service`` on loopback with the repository's scrape config and
    rules; a client sends normal load, then overload, then normal load again; then every dashboard query and the
    adapter's HPA query must return data, and the alerts must be the ones the load explains.

    The clock is compressed, not the rules: every range and ``for`` in the rules is divided by 60 (one minute
    of the rules is one second here) and Prometheus scrapes and evaluates every second. Only durations change,
    so the expressions, the recording chain, label matching and thresholds run exactly as committed; without
    it, the shedding alert's 5-minute window and ``for: 5m`` (right for operators: a few minutes of shedding
    while the autoscaler adds replicas is the design working) would need over 10 minutes to fire and clear.
    The rules' real timing is what ``promtool test rules`` checks, at full scale. The service serves a tiny
    random-weight MEInst (exported to ONNX here, so the server starts without torch) with a queue of one and
    batches of one, so that concurrent clients get 503, and a model whose file is not a graph, which must
    make OneStageModelLoadFailed fire. Bounded by LIMIT_S; everything listens on 127.0.0.1.
    """
    with time_limit(LIMIT_S):
        model, cfg = tiny_detector("meinst")
        graph = tmp_path / "meinst.onnx"
        export_onnx(model, cfg, {"class_names": CLASS_NAMES, "category_ids": CATEGORY_IDS}, graph)
        broken = tmp_path / "broken.onnx"
        broken.write_bytes(b"not an ONNX graph")
        models = [
            {"name": "meinst", "path": str(graph), "buckets": ["128x192"]},
            {"name": "broken", "path": str(broken)},
        ]
        args = ["--models", json.dumps(models), "--cache-dir", str(tmp_path / "cache")]
        args += ["--max-queue-size", "1", "--max-batch-size", "1", "--max-delay-ms", "0"]
        service = ServiceProcess(args, tmp_path / "service.log")
        try:
            service.wait_live(60)
            rules = tmp_path / "rules.yml"
            rules.write_text(yaml.safe_dump({"groups": compressed_rule_groups()}, sort_keys=False))
            prometheus = Prometheus(scrape_config(service.port, rules), tmp_path)
            try:
                prometheus.wait_ready(30)
                check_under_load(service, prometheus)
            except BaseException:
                print(prometheus.log_path.read_text()[-4000:], file=sys.stderr)
                raise
            finally:
                prometheus.stop()
        except BaseException:
            print(service.log()[-4000:], file=sys.stderr)
            raise
        finally:
            service.terminate()


def check_under_load(service: ServiceProcess, prometheus: Prometheus) -> None:
    """The phases of the real-Prometheus test (its docstring)."""

    def meinst_ready() -> bool:
        return httpx.get(f"{service.url}/v2/models/meinst/ready", timeout=5).status_code == 200

    wait_for(meinst_ready, 60, "model meinst ready")
    wait_for(lambda: prometheus.query('up{job="onestage"} == 1'), 20, "the service scraped")
    image = png_image()

    def shedding() -> list[dict[str, Any]]:
        return [a for a in prometheus.alerts("OneStageLoadShedding") if a["labels"]["model"] == "meinst"]

    # normal load: one client, one request at a time
    normal = Load(service.url, "meinst", image, clients=1, pause_s=0.05)
    try:
        time.sleep(NORMAL_S)
        assert not shedding(), "shedding alert under normal load"
        # overload: eight clients against a queue of one
        overload = Load(service.url, "meinst", image, clients=8, pause_s=0.0)
        try:
            (alert,) = wait_for(shedding, ALERT_WAIT_S, "OneStageLoadShedding pending or firing under overload")
        finally:
            statuses = overload.stop()
        assert alert["state"] in ("pending", "firing") and alert["labels"]["severity"] == "warning"
        assert alert["annotations"]["runbook_url"] == "docs/operations.md#onestageloadshedding"
        assert statuses[503] > 0 and statuses[200] > 0, statuses
        # back to normal load: the alert clears
        wait_for(lambda: not shedding(), ALERT_WAIT_S, "OneStageLoadShedding cleared after the overload")
        check_queries_rules_and_alerts(prometheus)
    finally:
        statuses = normal.stop()
    assert statuses[200] > 0, statuses


def check_queries_rules_and_alerts(prometheus: Prometheus) -> None:
    # every rule evaluates without error, and every alert of the rule file is loaded
    loaded = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
    assert len(loaded) == sum(len(group["rules"]) for group in rule_groups())
    failing = {rule["name"]: rule.get("lastError") for rule in loaded if rule["health"] != "ok"}
    assert not failing, failing
    assert {rule["name"] for rule in loaded if rule["type"] == "alerting"} == alert_names()
    # every dashboard query returns data (but the DCGM exporter's: there is no GPU), so does the model variable
    for name, dashboard in dashboards().items():
        for expr in dashboard_queries(dashboard):
            if any(s.metric.startswith("DCGM_") for s in promql_parts(expr)[0]):
                continue
            assert prometheus.query(substitute(expr)), f"{name}: no data for {expr}"
        models = prometheus.api("label/model/values", **{"match[]": "onestage_queue_depth"})
        assert "meinst" in models, models
    # the Prometheus adapter finds the series and answers the HPA's per-pod query
    series_query, hpa_query = adapter_query()
    assert prometheus.api("series", **{"match[]": series_query})
    (per_pod,) = prometheus.query(hpa_query)
    assert per_pod["metric"] == {"pod": POD}, per_pod
    # the objectives read the real histogram: its le="2.5" bucket matches the threshold, and the 503s of the
    # overload spent no availability budget
    assert prometheus.query('model:onestage_requests_fast:rate5m{model="meinst"} > 0')
    (errors,) = prometheus.query('model:onestage_slo_availability_errors:ratio_rate1h{model="meinst"}')
    assert float(errors["value"][1]) == 0.0, errors
    # the broken model's load failure fires; nothing that the load does not explain does
    failed = prometheus.alerts("OneStageModelLoadFailed")
    assert {a["labels"]["model"] for a in failed} == {"broken"}, failed
    for name in (
        "OneStageServiceDown",
        "OneStageTargetDown",
        "OneStageErrorBudgetBurn",
        "OneStageLatencyObjectiveUnmeasured",
        "OneStageModelNotReady",
    ):
        assert not prometheus.alerts(name), prometheus.alerts(name)


if __name__ == "__main__":
    PROMETHEUS_RULE.write_text(render_prometheus_rule())
    print(f"wrote {PROMETHEUS_RULE.relative_to(REPO)}", file=sys.stderr)
