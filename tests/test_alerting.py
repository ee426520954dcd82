"""The alerting and recording rules, checked by promtool and run by a real Prometheus against the real service.

``docker/prometheus/rules/onestage.yml`` is the one source of the rules: the compose stack mounts it, and
``deploy/kubernetes/base/prometheusrule.yaml`` carries the same groups for the Prometheus operator (rewritten from
it by ``python -m tests.test_alerting``; a test holds them equal). ``promtool check rules`` validates both and
``promtool test rules`` runs ``tests/prometheus/onestage_rules_test.yml`` (input series -> expected alerts, a
firing and a silent case for every alerting rule). Every alert is documented: a severity, a summary, a
description and a runbook section in docs/operations.md.

``amtool`` checks the Alertmanager route tree (docker/alertmanager/alertmanager.yml).

Then Debian's ``prometheus`` (2.42) scrapes ``python -m service`` on loopback with the repository's scrape config
and rules, under normal load, under overload and after it, and sends its alerts to Debian's Alertmanager (0.25)
with that route tree; every dashboard query, the Prometheus adapter's HPA query, the alerts and the notifications
are read back (the last test's docstring says how its clock is compressed).

promtool, prometheus, amtool and prometheus-alertmanager come from Debian's ``prometheus`` and
``prometheus-alertmanager`` packages, which the README's test command installs: a missing binary fails these tests
rather than skipping them.
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
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
ALERTMANAGER = REPO / "docker" / "alertmanager" / "alertmanager.yml"
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
    """The path of a binary of Debian's ``prometheus`` or ``prometheus-alertmanager`` package; the README's test
    command installs them, so a missing one is a failure, not a skip."""
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(
            f"{name} not found: run the README's test command (apt-get install prometheus prometheus-alertmanager)"
        )
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


def test_alertmanager_pages_on_critical_and_files_the_rest_as_tickets() -> None:
    amtool = binary("amtool")
    check = subprocess.run([amtool, "check-config", str(ALERTMANAGER)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    for rule in alerting_rules():
        expected = "page" if rule["labels"]["severity"] == "critical" else "ticket"
        labels = [f"{key}={value}" for key, value in {"alertname": rule["alert"], **rule["labels"]}.items()]
        routed = subprocess.run(
            [amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER}", *labels],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert routed.returncode == 0 and routed.stdout.split() == [expected], (rule["alert"], routed.stdout)


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


def test_the_alert_table_of_the_docs_matches_the_rules() -> None:
    """docs/operations.md's table: every alert once, with its rules' severities and (for one rule) its ``for``."""
    rows = re.findall(r"^\| \[(\w+)\]\(#(\w+)\) \| ([\w /]+) \| .* \| ([\w-]+) \|$", OPERATIONS.read_text(), flags=re.M)
    assert sorted(row[0] for row in rows) == sorted(alert_names())
    for name, link, severities, duration in rows:
        rules = [rule for rule in alerting_rules() if rule["alert"] == name]
        assert link == anchor(name) and set(severities.split(" / ")) == {r["labels"]["severity"] for r in rules}
        if len(rules) == 1:
            assert duration == rules[0]["for"], name


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
ALERT_WAIT_S = 30.0
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


def scrape_config(service_port: int, rules: Path, alertmanager: str) -> dict[str, Any]:
    """docker/prometheus/prometheus.yml on loopback: the service's job at its port with the target labels the
    PodMonitor would add, the DCGM job at a port nothing listens on (as without the gpu-metrics profile), the
    compressed rules, the test's interval, and the Alertmanager at ``alertmanager`` (host:port)."""
    config = yaml.safe_load(PROMETHEUS.read_text())
    config["global"] = {"scrape_interval": INTERVAL, "evaluation_interval": INTERVAL}
    config["rule_files"] = [str(rules)]
    config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"onestage", "dcgm"}, set(jobs)
    jobs["onestage"]["static_configs"] = [
        {"targets": [f"127.0.0.1:{service_port}"], "labels": {"namespace": NAMESPACE, "pod": POD}}
    ]
    jobs["dcgm"]["static_configs"] = [{"targets": [f"127.0.0.1:{free_port()}"]}]
    return config


def alertmanager_config(webhook: str) -> dict[str, Any]:
    """docker/alertmanager/alertmanager.yml with a webhook on loopback for each receiver (``<webhook>/<receiver>``)
    and its grouping times divided by TIME_SCALE, as the rules' durations are."""
    config = yaml.safe_load(ALERTMANAGER.read_text())
    for receiver in config["receivers"]:
        assert set(receiver) == {"name"}, "the committed receivers have no integration"
        receiver["webhook_configs"] = [{"url": f"{webhook}/{receiver['name']}", "send_resolved": True}]
    for route in (config["route"], *config["route"]["routes"]):
        for key in ("group_wait", "group_interval", "repeat_interval"):
            if key in route:
                route[key] = f"{duration_seconds(route[key]) * 1000 // TIME_SCALE}ms"
    return config


class Daemon:
    """A Debian ``prometheus`` package daemon on a free loopback port, stopped on exit; its log is printed when the
    block fails."""

    name = ""  # the binary
    ready_path = "/-/ready"

    def __init__(self, workdir: Path, args: Callable[[str], list[str]]) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = workdir / f"{self.name}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [binary(self.name), *args(self.url.removeprefix("http://"))], stdout=log, stderr=subprocess.STDOUT
            )

    def __enter__(self) -> Daemon:
        def ready() -> bool:
            assert self.process.poll() is None, f"{self.name} exited:\n{self.log_path.read_text()}"
            try:
                return httpx.get(f"{self.url}{self.ready_path}", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, 30, f"{self.name} ready")
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: Any) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if kind is not None:
            print(f"---- {self.name} log\n{self.log_path.read_text()[-4000:]}", file=sys.stderr)


class Prometheus(Daemon):
    """Debian's prometheus with ``config``, its TSDB in ``workdir``."""

    name = "prometheus"

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        path = workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        super().__init__(
            workdir,
            lambda address: [
                f"--config.file={path}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address={address}",
                "--log.level=warn",
            ],
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


class Alertmanager(Daemon):
    """Debian's prometheus-alertmanager with ``config``, no cluster listener (it would bind every interface)."""

    name = "prometheus-alertmanager"

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        path = workdir / "alertmanager.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        super().__init__(
            workdir,
            lambda address: [
                f"--config.file={path}",
                f"--storage.path={workdir / 'alertmanager'}",
                f"--web.listen-address={address}",
                "--cluster.listen-address=",
                "--log.level=warn",
            ],
        )


class Webhook:
    """An HTTP server on loopback that records Alertmanager's webhook notifications, by receiver (the path)."""

    def __init__(self) -> None:
        self.notifications: list[tuple[str, dict[str, Any]]] = []
        received = self.notifications

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                received.append((self.path.strip("/"), body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Webhook:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def alerts(self, receiver: str, name: str, status: str) -> list[dict[str, Any]]:
        """The alerts named ``name`` that ``receiver`` was notified of with ``status`` (firing or resolved)."""
        return [
            alert
            for path, body in list(self.notifications)
            if path == receiver
            for alert in body["alerts"]
            if alert["labels"]["alertname"] == name and alert["status"] == status
        ]


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
    rules, and sends its alerts to Debian's Alertmanager 0.25 with the repository's route tree, whose receivers
    post to a webhook here. A client sends normal load, then overload, then normal load again; the shedding alert
    must go pending, fire, reach the `ticket` receiver and resolve there, the broken model's load failure must
    reach `page`; then every dashboard query and the adapter's HPA query must return data, and no alert that the
    load does not explain may be active.

    The clock is compressed, not the rules: every range and ``for`` in the rules (and the Alertmanager's grouping
    times) is divided by 60, one minute of the rules being one second here, and Prometheus scrapes and evaluates
    every second. Only durations change, so the expressions, the recording chain, label matching and thresholds
    run exactly as committed; without it, the shedding alert's 5-minute window and ``for: 5m`` (right for
    operators: a few minutes of shedding while the autoscaler adds replicas is the design working) would need over
    10 minutes to fire and clear. The rules' real timing is what ``promtool test rules`` checks, at full scale.
    The service serves a tiny random-weight MEInst (exported to ONNX here, so the server starts without torch)
    with a queue of one and batches of one, so that concurrent clients get 503, and a model whose file is not a
    graph, which must make OneStageModelLoadFailed fire. Bounded by LIMIT_S; everything listens on 127.0.0.1.
    """
    with time_limit(LIMIT_S), ExitStack() as stack:
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
        service = stack.enter_context(running_service(args, tmp_path / "service.log"))
        webhook = stack.enter_context(Webhook())
        alertmanager = stack.enter_context(Alertmanager(alertmanager_config(webhook.url), tmp_path))
        rules = tmp_path / "rules.yml"
        rules.write_text(yaml.safe_dump({"groups": compressed_rule_groups()}, sort_keys=False))
        config = scrape_config(service.port, rules, alertmanager.url.removeprefix("http://"))
        prometheus = stack.enter_context(Prometheus(config, tmp_path))
        check_under_load(service, prometheus, webhook)


@contextmanager
def running_service(args: list[str], log_path: Path) -> Iterator[ServiceProcess]:
    """``python -m service *args``, live; terminated on exit, its log printed when the block fails."""
    service = ServiceProcess(args, log_path)
    try:
        service.wait_live(60)
        yield service
    except BaseException:
        print(f"---- service log\n{service.log()[-4000:]}", file=sys.stderr)
        raise
    finally:
        service.terminate()


def check_under_load(service: ServiceProcess, prometheus: Prometheus, webhook: Webhook) -> None:
    """The phases of the real-Prometheus test (its docstring)."""

    def meinst_ready() -> bool:
        return httpx.get(f"{service.url}/v2/models/meinst/ready", timeout=5).status_code == 200

    wait_for(meinst_ready, 60, "model meinst ready")
    wait_for(lambda: prometheus.query('up{job="onestage"} == 1'), 20, "the service scraped")
    image = png_image()

    def shedding(*states: str) -> list[dict[str, Any]]:
        alerts = prometheus.alerts("OneStageLoadShedding")
        return [a for a in alerts if a["labels"]["model"] == "meinst" and a["state"] in states]

    # normal load: one client, one request at a time
    normal = Load(service.url, "meinst", image, clients=1, pause_s=0.05)
    try:
        time.sleep(NORMAL_S)
        assert not shedding("pending", "firing"), "shedding alert under normal load"
        # overload: eight clients against a queue of one, until the ticket is filed
        overload = Load(service.url, "meinst", image, clients=8, pause_s=0.0)
        try:
            wait_for(lambda: shedding("pending", "firing"), ALERT_WAIT_S, "OneStageLoadShedding pending")
            (alert,) = wait_for(lambda: shedding("firing"), ALERT_WAIT_S, "OneStageLoadShedding firing")
            wait_for(
                lambda: webhook.alerts("ticket", "OneStageLoadShedding", "firing"),
                ALERT_WAIT_S,
                "the shedding ticket notified",
            )
        finally:
            statuses = overload.stop()
        assert alert["labels"]["severity"] == "warning"
        assert alert["annotations"]["runbook_url"] == "docs/operations.md#onestageloadshedding"
        assert statuses[503] > 0 and statuses[200] > 0, statuses
        # back to normal load: the alert clears, and the ticket is resolved
        wait_for(lambda: not shedding("pending", "firing"), ALERT_WAIT_S, "OneStageLoadShedding cleared")
        wait_for(
            lambda: webhook.alerts("ticket", "OneStageLoadShedding", "resolved"),
            ALERT_WAIT_S,
            "the shedding ticket resolved",
        )
        check_queries_rules_and_alerts(prometheus)
    finally:
        statuses = normal.stop()
    assert statuses[200] > 0, statuses
    # routing: the broken model's critical alert pages, the warning did not
    (paged,) = {a["labels"]["model"] for a in webhook.alerts("page", "OneStageModelLoadFailed", "firing")}
    assert paged == "broken"
    assert not webhook.alerts("page", "OneStageLoadShedding", "firing")
    assert not webhook.alerts("ticket", "OneStageModelLoadFailed", "firing")


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
    for name in ("OneStageErrorBudgetBurn", "OneStageLatencyObjectiveUnmeasured", "OneStageModelNotReady"):
        assert not prometheus.alerts(name), prometheus.alerts(name)
    for name in ("OneStageServiceDown", "OneStageTargetDown"):  # one slow scrape on a busy machine: pending only
        assert not [a for a in prometheus.alerts(name) if a["state"] == "firing"], prometheus.alerts(name)


if __name__ == "__main__":
    PROMETHEUS_RULE.write_text(render_prometheus_rule())
    print(f"wrote {PROMETHEUS_RULE.relative_to(REPO)}", file=sys.stderr)
