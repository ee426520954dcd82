"""The deployment files, checked without a Docker engine.

docker/Dockerfile, docker-compose.yml (+ docker-compose.cpu.yml), the Prometheus scrape config and the
Grafana provisioning are parsed and cross-checked: referenced files exist, the scrape target is the
service's compose host and port, the compose environment is valid service settings, the image installs
with the README's own commands and probes readiness as a non-root user. Every metric a dashboard query
uses is checked against the /metrics of a real `python -m service` (a tiny checkpoint, one request served).
"""

from __future__ import annotations

import io
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tomllib
import yaml
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.launcher import ServiceProcess, free_port
from service.settings import Settings, bundled_models, environment_names
from tests.service_models import tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
CPU_OVERRIDE = REPO / "docker-compose.cpu.yml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
PROMETHEUS = REPO / "docker" / "prometheus" / "prometheus.yml"
RULES = REPO / "docker" / "prometheus" / "rules"  # recording and alerting rules (tests/test_alerting.py)
PROVISIONING = REPO / "docker" / "grafana" / "provisioning"
DASHBOARDS = REPO / "docker" / "grafana" / "dashboards"
SERVICE = "onestage"
VARIANTS = ("gpu", "cpu")
# NVIDIA/dcgm-exporter etc/default-counters.csv: the fields the exporter serves without extra configuration.
DCGM_DEFAULT_COUNTERS = {
    "DCGM_FI_DEV_SM_CLOCK",
    "DCGM_FI_DEV_MEM_CLOCK",
    "DCGM_FI_DEV_MEMORY_TEMP",
    "DCGM_FI_DEV_GPU_TEMP",
    "DCGM_FI_DEV_POWER_USAGE",
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
    "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
    "DCGM_FI_DEV_GPU_UTIL",
    "DCGM_FI_DEV_MEM_COPY_UTIL",
    "DCGM_FI_DEV_ENC_UTIL",
    "DCGM_FI_DEV_DEC_UTIL",
    "DCGM_FI_DEV_XID_ERRORS",
    "DCGM_FI_DEV_FB_FREE",
    "DCGM_FI_DEV_FB_USED",
}
PROMQL_FUNCTIONS = {
    "sum",
    "max",
    "min",
    "avg",
    "count",
    "rate",
    "increase",
    "histogram_quantile",
    "clamp_min",
    "clamp_max",
    "scalar",
    "vector",
    "absent",
    "avg_over_time",
    "sum_over_time",
}
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset"}


# ---------------------------------------------------------------- compose files
class _Reset:
    """Compose's ``!reset`` tag: the key is dropped from the merged model."""


RESET = _Reset()


class ComposeLoader(yaml.SafeLoader):
    pass


ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)


def load_compose(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=ComposeLoader)


def merge(base: Any, override: Any) -> Any:
    """Compose's merge rules as far as these files use them: mappings merge key by key, sequences append,
    scalars are replaced, ``!reset`` removes the key."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if value is RESET:
                merged.pop(key, None)
            else:
                merged[key] = merge(base[key], value) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(override, list):
        return base + override
    return override


_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: Any) -> Any:
    """``${NAME:-default}`` -> default, as `docker compose up` sees it with no .env file."""
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, str):
        for match in _VARIABLE.finditer(value):
            assert match[2] is not None, f"${{{match[1]}}} has no default: `docker compose up` would need a .env file"
        return _VARIABLE.sub(lambda m: m[2], value)
    return value


def configurations() -> dict[str, dict[str, Any]]:
    """The compose model of each variant: GPU (docker-compose.yml) and CPU (with docker-compose.cpu.yml)."""
    base = load_compose(COMPOSE)
    return {"gpu": interpolate(base), "cpu": interpolate(merge(base, load_compose(CPU_OVERRIDE)))}


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "write environment as a mapping (the CPU override merges into it by key)"
    return {key: str(value) for key, value in env.items()}


def container_ports(service: dict[str, Any]) -> list[int]:
    return [int(str(p).split(":")[-1].split("/")[0]) for p in service.get("ports", [])]


def mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each short-syntax volume."""
    return [tuple(str(v).split(":")[:2]) for v in service.get("volumes", [])]  # type: ignore[misc]


def bind_source(source: str) -> Path | None:
    return (REPO / source).resolve() if source.startswith((".", "/")) else None


# ---------------------------------------------------------------- Dockerfile
@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction]


def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, continuation lines joined and comments dropped."""
    logical, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
        else:
            logical.append(pending + line.strip())
            pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), " ".join(args.split())
        if keyword == "FROM":
            words = args.split()
            stages.append(
                Stage(
                    base=words[0],
                    name=words[2] if len(words) == 3 and words[1].upper() == "AS" else None,
                    instructions=[],
                )
            )
        elif not stages and keyword == "ARG":
            name, _, default = args.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append(Instruction(keyword, args))
    return global_args, stages


def variant_instructions(variant: str) -> list[Instruction]:
    """The instructions that build the final stage for ``--build-arg VARIANT=variant``, base stages first."""
    _, stages = dockerfile()
    by_name = {stage.name: stage for stage in stages if stage.name}
    chain, stage = [], stages[-1]
    while True:
        chain.append(stage)
        base = stage.base.replace("${VARIANT}", variant)
        if base not in by_name:
            break
        stage = by_name[base]
    return [instruction for stage in reversed(chain) for instruction in stage.instructions]


def run_steps(args: str) -> list[str]:
    """A RUN's shell command as its ``&&`` steps, without the RUN flags (``--mount=...``)."""
    command = re.sub(r"^(--\S+\s+)+", "", args)
    return [" ".join(step.split()) for step in command.split("&&")]


def env_values(instructions: list[Instruction]) -> dict[str, str]:
    values: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "ENV":
            values.update(word.split("=", 1) for word in shlex.split(instruction.args))  # type: ignore[arg-type]
    return values


def healthcheck_command() -> list[str]:
    healthchecks = [i.args for i in variant_instructions("gpu") if i.keyword == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    _, _, command = healthchecks[0].partition(" CMD ")
    return json.loads(command)


def readme_run_steps() -> list[str]:
    """The README's "install everything and run the main job" command as its ``&&`` steps."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    runs = [
        steps
        for steps in ([" ".join(s.split()) for s in b.split("&&")] for b in blocks)
        if steps[-1] == "python -m service"
    ]
    assert len(runs) == 1, "the README should have one command that installs and ends in `python -m service`"
    return runs[0]


# ---------------------------------------------------------------- PromQL
@dataclass(frozen=True)
class Selector:
    metric: str
    labels: frozenset[str]


def promql_parts(expr: str) -> tuple[list[Selector], set[str]]:
    """The metric selectors of ``expr`` (with the labels they match on) and the labels of its grouping
    clauses. Raises on an identifier that is neither a known function nor a metric."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values (and Grafana variables in them)
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    grouping: set[str] = set()
    for match in re.finditer(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text):
        grouping |= {label.strip() for label in match[1].split(",") if label.strip()}
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"(?<![\w:])\d+(?:\.\d+)?(?:e[+-]?\d+)?", " ", text)  # numbers
    selectors = []
    for match in re.finditer(r"([A-Za-z_:][\w:]*)\s*(\{[^}]*\})?\s*(\()?", text):
        name, braces, call = match[1], match[2], match[3]
        if call and not braces:
            assert name in PROMQL_FUNCTIONS, f"unknown PromQL function {name!r} in {expr}"
        elif name not in PROMQL_KEYWORDS:
            labels = frozenset(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", braces or ""))
            selectors.append(Selector(name, labels))
    return selectors, grouping


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    exprs = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            exprs.extend(target["expr"] for target in panel.get("targets", []))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    return exprs


def dashboards() -> dict[str, dict[str, Any]]:
    files = sorted(DASHBOARDS.glob("*.json"))
    assert files, f"no dashboards in {DASHBOARDS}"
    return {f.name: json.loads(f.read_text()) for f in files}


def template_metrics(dashboard: dict[str, Any]) -> list[Selector]:
    """``label_values(metric, label)`` queries of the template variables."""
    selectors = []
    for variable in dashboard["templating"]["list"]:
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
        assert match, f"unexpected variable query {query!r}"
        selectors.append(Selector(match[1], frozenset({match[2]})))
    return selectors


def rule_groups() -> list[dict[str, Any]]:
    """Every rule group of the rule files Prometheus loads (docker/prometheus/rules/*.yml)."""
    files = sorted(RULES.glob("*.yml"))
    assert files, f"no rule files in {RULES}"
    return [group for f in files for group in yaml.safe_load(f.read_text())["groups"]]


def recorded_series() -> set[str]:
    """Names the recording rules write (``level:metric:operations``; never exported by the service itself)."""
    return {rule["record"] for group in rule_groups() for rule in group["rules"] if "record" in rule}


# ---------------------------------------------------------------- the running service
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """One tiny MEInst model, one 128x192 bucket (short warm-up), batches of up to 2."""
    workdir = tmp_path_factory.mktemp("deployment")
    checkpoint = tiny_checkpoint("meinst", workdir / "meinst.pt")
    models = [{"name": "meinst", "path": str(checkpoint), "buckets": ["128x192"]}]
    process = ServiceProcess(
        [
            "--models",
            json.dumps(models),
            "--cache-dir",
            str(workdir / "cache"),
            "--max-batch-size",
            "2",
            "--max-delay-ms",
            "0",
        ],
        workdir / "server.log",
    )
    try:
        process.wait_ready()
        yield process
    finally:
        process.terminate()


@pytest.fixture(scope="module")
def exported(server: ServiceProcess) -> dict[str, set[str]]:
    """Sample name -> label names in /metrics after one served request (so labelled histograms have series)."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(128, 192, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    response = httpx.post(
        f"{server.url}/segment", content=png.getvalue(), headers={"Content-Type": "image/png"}, timeout=60
    )
    assert response.status_code == 200, response.text
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


# ---------------------------------------------------------------- compose
@pytest.mark.parametrize("variant", VARIANTS)
def test_compose_references_existing_files(variant: str) -> None:
    config = configurations()[variant]
    services = config["services"]
    assert {SERVICE, "prometheus", "grafana"} <= services.keys()
    build = services[SERVICE]["build"]
    context = REPO / build["context"]
    assert context.resolve() == REPO and (context / build["dockerfile"]).resolve() == DOCKERFILE
    assert build["args"]["VARIANT"] == variant
    global_args, stages = dockerfile()
    assert global_args["VARIANT"] == "gpu", "a plain `docker build` should give the GPU image"
    assert stages[-1].base == "${VARIANT}-base" and f"{variant}-base" in {stage.name for stage in stages}
    named = set(config.get("volumes", {}))
    for name, service in services.items():
        for source, target in mounts(service):
            path = bind_source(source)
            assert path.exists() if path else source in named, (
                f"{name}: volume source {source} ({target}) does not exist"
            )


def test_gpu_service_reserves_a_gpu_and_the_cpu_override_drops_it() -> None:
    configs = configurations()
    devices = configs["gpu"]["services"][SERVICE]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert environment(configs["gpu"]["services"][SERVICE])["ONESTAGE_RUNTIME__ENGINE"] == "tensorrt"
    cpu = configs["cpu"]["services"][SERVICE]
    assert "deploy" not in cpu and environment(cpu)["ONESTAGE_RUNTIME__ENGINE"] == "auto"  # OpenVINO on bf16 CPUs
    assert configs["gpu"]["services"][SERVICE]["image"] != cpu["image"]
    # `docker compose up` starts the service, Prometheus and Grafana; DCGM only under its profile
    services = configs["gpu"]["services"]
    assert [name for name, s in services.items() if "profiles" not in s] == [SERVICE, "prometheus", "grafana"]
    assert services["dcgm-exporter"]["profiles"] == ["gpu-metrics"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_compose_environment_is_valid_service_settings(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    service = configurations()[variant]["services"][SERVICE]
    env = environment(service)
    fields = environment_names()
    assert set(env) <= fields, f"not service settings: {set(env) - fields}"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.host == "0.0.0.0"
    assert settings.runtime.engine == env["ONESTAGE_RUNTIME__ENGINE"]
    # the engine cache lives in the named volume, at the image's cache directory
    image_env = env_values(variant_instructions(variant))
    assert str(settings.cache_dir) == image_env["ONESTAGE_CACHE_DIR"]
    volumes = dict((target, source) for source, target in mounts(service))
    assert bind_source(volumes[str(settings.cache_dir)]) is None, "the engine cache should be a named volume"
    assert [i.args for i in variant_instructions(variant) if i.keyword == "VOLUME"] == [str(settings.cache_dir)]
    # one port everywhere: the setting, the published container port, the image
    assert container_ports(service) == [settings.port] and image_env["ONESTAGE_PORT"] == str(settings.port)
    assert [i.args for i in variant_instructions(variant) if i.keyword == "EXPOSE"] == [str(settings.port)]


def test_prometheus_scrapes_the_service_at_its_compose_host_and_port() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    services = configurations()["gpu"]["services"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    port = environment(services[SERVICE])["ONESTAGE_PORT"]
    assert [t for c in jobs[SERVICE]["static_configs"] for t in c["targets"]] == [f"{SERVICE}:{port}"]
    assert jobs[SERVICE].get("metrics_path", "/metrics") == "/metrics"
    assert [t for c in jobs["dcgm"]["static_configs"] for t in c["targets"]] == ["dcgm-exporter:9400"]
    for job in jobs.values():
        for target in (t for c in job["static_configs"] for t in c["targets"]):
            assert target.split(":")[0] in services, f"{job['job_name']}: {target} is no compose service"
    binds = [(bind_source(s), t) for s, t in mounts(services["prometheus"])]
    assert (PROMETHEUS.resolve(), "/etc/prometheus/prometheus.yml") in binds
    # the rule files, mounted where the config's rule_files glob finds every one of them
    (rules_target,) = [t for source, t in binds if source == RULES.resolve()]
    files = {f.name for f in RULES.iterdir()}
    loaded = {name for name in files if any(fnmatch(f"{rules_target}/{name}", p) for p in config["rule_files"])}
    assert files and loaded == files, f"Prometheus would not load {files - loaded}"


def test_grafana_provisions_the_prometheus_datasource_and_the_dashboards() -> None:
    services = configurations()["gpu"]["services"]
    grafana = services["grafana"]
    binds = {target: bind_source(source) for source, target in mounts(grafana)}
    assert binds["/etc/grafana/provisioning"] == PROVISIONING.resolve()
    (datasource,) = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    assert 9090 in container_ports(services["prometheus"])
    (provider,) = yaml.safe_load((PROVISIONING / "dashboards" / "onestage.yml").read_text())["providers"]
    dashboards_dir = provider["options"]["path"]
    assert binds[dashboards_dir] == DASHBOARDS.resolve()
    home = environment(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dashboards_dir + "/") and (DASHBOARDS / home[len(dashboards_dir) + 1 :]).is_file()
    for name, dashboard in dashboards().items():
        uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
        uids |= {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
        assert uids == {datasource["uid"]}, f"{name} uses datasources {uids}"


# ---------------------------------------------------------------- dashboard vs /metrics
def test_dashboard_covers_latency_errors_batching_queue_and_finishing() -> None:
    dashboard = dashboards()["onestage.json"]
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["model"]
    exprs = dashboard_queries(dashboard)
    for q in ("0.5", "0.95", "0.99"):
        for histogram in ("onestage_request_duration_seconds", "onestage_mask_finishing_seconds"):
            assert any(e.startswith(f"histogram_quantile({q}, ") and f"{histogram}_bucket" in e for e in exprs), (
                q,
                histogram,
            )
    used = {s.metric for e in exprs for s in promql_parts(e)[0]}
    assert {
        "onestage_request_duration_seconds_count",
        "onestage_failures_total",
        "onestage_queue_wait_seconds_sum",
        "onestage_inference_duration_seconds_sum",
        "onestage_batch_size_bucket",
        "onestage_queue_depth",
        "onestage_mask_finishing_seconds_bucket",
        "DCGM_FI_DEV_GPU_UTIL",
        "DCGM_FI_DEV_FB_USED",
    } <= used
    for expr in exprs:
        selectors, grouping = promql_parts(expr)
        if any(s.metric.startswith("onestage_") for s in selectors):
            assert all("model" in s.labels for s in selectors), f"not filtered by $model: {expr}"
        if "histogram_quantile" in expr:
            assert "le" in grouping and all(s.metric.endswith("_bucket") for s in selectors), expr


def test_every_dashboard_metric_is_exported_by_the_running_service(exported: dict[str, set[str]]) -> None:
    for name, dashboard in dashboards().items():
        queries = [(expr, *promql_parts(expr)) for expr in dashboard_queries(dashboard)]
        queries.append(("template variables", template_metrics(dashboard), set()))
        for expr, selectors, grouping in queries:
            recorded = {s.metric for s in selectors if ":" in s.metric}
            assert recorded <= recorded_series(), f"{name}: {recorded - recorded_series()} are recorded by no rule"
            ours = [s for s in selectors if not s.metric.startswith("DCGM_") and s.metric not in recorded]
            for selector in ours:
                assert selector.metric in exported, f"{name}: {selector.metric} is not in /metrics ({expr})"
                assert selector.labels <= exported[selector.metric], f"{name}: {selector} labels not exported"
            if ours:
                available = set.union(*(exported[s.metric] for s in ours))
                assert grouping <= available, f"{name}: grouping labels {grouping - available} not exported ({expr})"
            dcgm = {s.metric for s in selectors if s.metric.startswith("DCGM_")}
            assert dcgm <= DCGM_DEFAULT_COUNTERS, (
                f"{name}: {dcgm - DCGM_DEFAULT_COUNTERS} are not default DCGM counters"
            )


# ---------------------------------------------------------------- Dockerfile
@pytest.mark.parametrize("variant", VARIANTS)
def test_image_installs_with_the_readme_commands(variant: str) -> None:
    readme = readme_run_steps()
    pip_steps, run = readme[:-1], readme[-1]
    assert pip_steps and all(step.startswith("pip install") for step in pip_steps)
    instructions = variant_instructions(variant)
    runs = [run_steps(i.args) for i in instructions if i.keyword == "RUN"]
    assert pip_steps in runs, f"no RUN is exactly the README's {pip_steps}"
    (cmd,) = [json.loads(i.args) for i in instructions if i.keyword == "CMD"]
    assert " ".join(cmd) == run
    # other pip installs (the CPU torch wheels) keep pyproject.toml's pins
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(d.split("==", 1) for d in dependencies if "==" in d)
    extra = [
        w
        for steps in runs
        for step in steps
        if step.startswith("pip install") and step not in pip_steps
        for w in step.split()
    ]
    for word in extra:
        name, _, version = word.partition("==")
        if name in pins:
            assert version == pins[name], f"{word} differs from pyproject.toml's {name}=={pins[name]}"
    if variant == "gpu":
        assert any(step.startswith("pip install tensorrt") for steps in runs for step in steps)


def test_image_runs_as_a_non_root_user_it_creates() -> None:
    instructions = variant_instructions("gpu")
    users = [i.args for i in instructions if i.keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    keywords = [i.keyword for i in instructions]
    assert keywords.index("USER") > max(n for n, k in enumerate(keywords) if k == "RUN"), (
        "installs run as root, the service not"
    )
    setup = " ".join(i.args for i in instructions if i.keyword == "RUN")
    assert re.search(rf"useradd .*\b{users[-1]}\b", setup) and f"chown {users[-1]}:" in setup


def test_image_copies_existing_sources_and_the_bundled_models() -> None:
    patterns = [
        p.strip() for p in (REPO / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    assert not any(p.startswith("!") for p in patterns), "this check does not model exception patterns"

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        return any(
            fnmatch(prefix, p) or fnmatch(prefix, p.removeprefix("**/")) for prefix in prefixes for p in patterns
        )

    copied = []
    for instruction in variant_instructions("gpu"):
        if instruction.keyword == "COPY" and "--from" not in instruction.args:
            sources = instruction.args.split()[:-1]
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: missing from the build context"
                assert not ignored(source), f"COPY {source}: excluded by .dockerignore"
            copied += sources
    for spec in bundled_models():
        relative = spec.path.relative_to(REPO).as_posix()
        assert any(relative == s or relative.startswith(s.rstrip("/") + "/") for s in copied), (
            f"{relative} is not copied"
        )
        assert spec.path.is_file() and not ignored(relative), (
            f"bundled model {relative} missing: the image would serve nothing"
        )


def test_healthcheck_reports_readiness(server: ServiceProcess) -> None:
    command = healthcheck_command()
    assert command[0] == "python" and any("/v2/health/ready" in word for word in command)
    probe = [sys.executable, *command[1:]]
    ok = subprocess.run(probe, env={"ONESTAGE_PORT": str(server.port)}, capture_output=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    down = subprocess.run(probe, env={"ONESTAGE_PORT": str(free_port())}, capture_output=True, timeout=30)
    assert down.returncode == 1
