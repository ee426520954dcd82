"""Where OpenVINO's memory goes, per way of compiling engines, against onnxruntime on the same graph.

    python -m bench.openvino_memory --graph models/embedmask_nucleus/model.pt [--buckets 256x256,512x512]
        [--batch 8] [--streams 1] [--threads 1] [--repeats 5] [--variants static,dynamic_batch,batch1,ort]
        [--interleaved] [--models JSON] [--cache-dir DIR] [--output bench/results/openvino_memory.json]

Each variant runs in its own child process (resident memory is per process) and reports ``VmRSS`` after the
imports, after reading the graph, after compiling each bucket's engines, after running each engine once
(warm-up: batch 1 and ``--batch`` on every bucket, once per stream) and at the end; then the latency of batch 1
and of ``--batch`` on every bucket, interleaved (b1, bN, b1, bN, ...), as medians over ``--repeats``.
Latencies of different variants come from different processes run one after the other, so on a shared
machine compare them with ``--interleaved``: one more child that times every way of running a batch in one
process, round after round (``interleaved_latency``), and keeps the median and the fastest round.

``--graph`` is an exported ``.onnx`` graph or a checkpoint, exported once before the variants run
(``inference.runtime.export_checkpoint``, into a temporary directory), as are the ``service-*`` variants'
checkpoints: no variant's figures include an export.

Variants (OpenVINO: CPU, ``INFERENCE_PRECISION_HINT`` bf16 where the CPU has it, ``--streams`` streams of
``--threads`` threads, one infer request per stream):

- ``static``: one engine per (batch, height, width): batch 1 and ``--batch`` on every bucket.
- ``dynamic_batch``: one engine per bucket, batch dimension ``1..--batch``, height and width static.
- ``batch1``: one static batch-1 engine per bucket; a batch runs as consecutive batch-1 inferences.
- ``dynamic_hw``: one batch-1 engine for every bucket, height and width dynamic up to the largest bucket's;
  a batch runs as consecutive batch-1 inferences.
- ``batch1_release``: as ``batch1``, and ``CompiledModel.release_memory()`` after every inference.
- ``batch1_ir``: as ``batch1``, the graph read as OpenVINO IR (``ov.save_model`` without fp16 compression
  into a temporary directory, then ``read_model``, which maps the weights file) instead of ONNX.
- ``batch1_nosnippets``: as ``batch1`` with the CPU plugin's internal ``SNIPPETS_MODE=DISABLE`` (not a
  documented setting; measured to see what the plugin's generated kernels cost).
- ``runtime``: ``export.openvino_runtime.OpenVinoRuntime`` as the service builds it (batch-1 engines).
- ``ort``: onnxruntime's ``CPUExecutionProvider``, one session of ``--threads`` threads per stream (memory
  arena off), as the service runs it.
- ``service-onnxruntime``, ``service-openvino``: both bundled models (``--models`` takes others, the service's
  JSON; ``--graph`` and ``--buckets`` do not apply) loaded by ``service.models.load_model`` as the service
  loads them, default buckets and warm-up included; list ``service-openvino`` twice to time a restart on the
  model cache the first one left (both use one cache directory per variant name).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
IDLE_S = 3.0  # service-* variants: idle time before the last memory reading
VARIANTS = (
    "static",
    "dynamic_hw",
    "batch1_ir",
    "batch1_nosnippets",
    "dynamic_batch",
    "batch1",
    "batch1_release",
    "runtime",
    "ort",
    "service-onnxruntime",
    "service-openvino",
)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmRSS")


def parse_buckets(text: str) -> list[tuple[int, int]]:
    return [(int(h), int(w)) for h, w in (item.split("x") for item in text.split(","))]


def openvino_infer(
    variant: str, graph: str, batch: int, streams: int, threads: int, largest: tuple[int, int]
) -> tuple[Callable, Callable]:
    """(prepare(height, width), infer(images)) for one OpenVINO variant; ``largest``: the largest bucket (the
    bound of ``dynamic_hw``'s height and width)."""
    import openvino as ov

    from export.openvino_runtime import resolve_precision

    core = ov.Core()
    precision = resolve_precision("auto", core=core)
    config = {
        "INFERENCE_PRECISION_HINT": "f32" if precision == "fp32" else "bf16",
        "PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT",
        "NUM_STREAMS": streams,
        "INFERENCE_NUM_THREADS": streams * threads,
    }
    if variant == "batch1_nosnippets":
        config["SNIPPETS_MODE"] = "DISABLE"
    if variant == "batch1_ir":
        ir = Path(tempfile.mkdtemp(prefix="onestage-ir-")) / "graph.xml"
        atexit.register(shutil.rmtree, ir.parent, True)
        ov.save_model(core.read_model(graph), ir, compress_to_fp16=False)
        graph = str(ir)
    model = core.read_model(graph)
    name = model.inputs[0].get_any_name()
    engines: dict[tuple[int, int, int], Any] = {}

    def compile_shape(shape: list[Any]) -> Any:
        clone = model.clone()
        clone.reshape({name: ov.PartialShape(shape)})
        compiled = core.compile_model(clone, "CPU", config)
        return compiled, [compiled.create_infer_request() for _ in range(streams)]

    def prepare(height: int, width: int) -> None:
        if variant == "static":
            for size in sorted({1, batch}):
                engines[(size, height, width)] = compile_shape([size, 3, height, width])
        elif variant == "dynamic_batch":
            engines[(0, height, width)] = compile_shape([ov.Dimension(1, batch), 3, height, width])
        elif variant == "dynamic_hw":
            if not engines:
                engines[(1, 0, 0)] = compile_shape([1, 3, ov.Dimension(32, largest[0]), ov.Dimension(32, largest[1])])
        else:
            engines[(1, height, width)] = compile_shape([1, 3, height, width])

    state = {"stream": 0}

    def run(key: tuple[int, int, int], images: np.ndarray) -> list[np.ndarray]:
        compiled, requests = engines[key]
        request = requests[state["stream"] % streams]
        request.infer({0: images})
        outputs = [request.get_output_tensor(i).data.copy() for i in range(len(compiled.outputs))]
        if variant == "batch1_release":
            compiled.release_memory()
        return outputs

    def infer(images: np.ndarray, stream: int = 0) -> list[np.ndarray]:
        state["stream"] = stream
        count, _, height, width = images.shape
        if variant == "static":
            return run((count, height, width), images)
        if variant == "dynamic_batch":
            return run((0, height, width), images)
        key = (1, 0, 0) if variant == "dynamic_hw" else (1, height, width)
        chunks = [run(key, images[i : i + 1]) for i in range(count)]
        return [np.concatenate(parts) for parts in zip(*chunks)]

    return prepare, infer


def images_per_run(key: str, n: int) -> int:
    """How many images one timed run of ``key`` (an ``interleaved_latency`` key) infers."""
    return n if key.endswith(f"batch{n}") or f"_{n}x_" in key else 1


def interleaved_latency(args: argparse.Namespace) -> dict[str, Any]:
    """Latency of every way of running a batch, all in this one process and interleaved on each bucket, so
    that the load of a shared machine falls on all of them alike: OpenVINO batch 1, a static batch-N engine,
    N consecutive batch-1 inferences, a dynamic-batch engine at N and at 1, and onnxruntime at 1 and N.
    Medians over ``--repeats`` rounds (after one untimed round)."""
    import openvino as ov

    from export.openvino_runtime import resolve_precision
    from export.runtimes import OnnxRuntime

    core = ov.Core()
    config = {
        "INFERENCE_PRECISION_HINT": "f32" if resolve_precision("auto", core=core) == "fp32" else "bf16",
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
        "INFERENCE_NUM_THREADS": args.threads,
    }
    model = core.read_model(args.graph)
    name = model.inputs[0].get_any_name()

    def request(shape: list[Any]) -> Any:
        clone = model.clone()
        clone.reshape({name: ov.PartialShape(shape)})
        return core.compile_model(clone, "CPU", config).create_infer_request()

    ort = OnnxRuntime(args.graph, providers=["CPUExecutionProvider"], threads=args.threads, cpu_arena=False)
    rng = np.random.default_rng(0)
    n = args.batch
    result: dict[str, Any] = {}
    for bucket in parse_buckets(args.buckets):
        one, static, dynamic = (
            request([1, 3, *bucket]),
            request([n, 3, *bucket]),
            request([ov.Dimension(1, n), 3, *bucket]),
        )
        images = rng.integers(0, 256, (n, 3, *bucket), dtype=np.uint8)
        runs: dict[str, Callable[[], Any]] = {
            "openvino_batch1": lambda: one.infer({0: images[:1]}),
            f"openvino_static_batch{n}": lambda: static.infer({0: images}),
            f"openvino_{n}x_batch1": lambda: [one.infer({0: images[i : i + 1]}) for i in range(n)],
            f"openvino_dynamic_batch{n}": lambda: dynamic.infer({0: images}),
            "openvino_dynamic_batch1": lambda: dynamic.infer({0: images[:1]}),
            "onnxruntime_batch1": lambda: ort.infer(images[:1]),
            f"onnxruntime_batch{n}": lambda: ort.infer(images),
        }
        times: dict[str, list[float]] = {key: [] for key in runs}
        for round_ in range(args.repeats + 1):
            for key, run in runs.items():
                started = time.perf_counter()
                run()
                if round_:
                    times[key].append(time.perf_counter() - started)
        medians = {key: statistics.median(t) * 1000 for key, t in times.items()}
        result[f"{bucket[0]}x{bucket[1]}"] = {
            "median_ms": {key: round(v, 1) for key, v in medians.items()},
            "min_ms": {key: round(min(t) * 1000, 1) for key, t in times.items()},
            "median_per_image_ms": {key: round(v / images_per_run(key, n), 1) for key, v in medians.items()},
        }
    return result


def service_models(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--models`` graphs loaded as the service loads them (``service.models.load_model``: its default
    buckets, warm-up at batch 1 and ``--batch`` once per stream, ``--streams`` x ``--threads``) on the engine
    ``args.variant[8:]``, one after the other on one cache directory (``--cache-dir``): VmRSS once each is
    warm and after idling, and the seconds each load took."""
    from inference.runtime import RuntimeOptions
    from service.models import load_model
    from service.settings import Settings

    engine = args.variant.removeprefix("service-")
    specs = model_specs(args.models)
    settings = Settings(
        models=specs,
        cache_dir=Path(args.cache_dir),
        runtime=RuntimeOptions(
            engine=engine, providers=["CPUExecutionProvider"], streams=args.streams, threads=args.threads
        ),
        max_batch_size=args.batch,
    )
    record: dict[str, Any] = {"variant": args.variant, "rss_mb": {"imports": rss_mb()}, "load_s": {}}
    loaded = {}
    for spec in specs:
        started = time.perf_counter()
        loaded[spec.name] = load_model(spec, settings)
        record["load_s"][spec.name] = round(time.perf_counter() - started, 1)
        record["rss_mb"][f"{spec.name} warm"] = rss_mb()
    record["buckets"] = {name: [f"{h}x{w}" for h, w in pipeline.buckets] for name, (_, pipeline) in loaded.items()}
    record["providers"] = {name: opened.providers for name, (opened, _) in loaded.items()}
    time.sleep(IDLE_S)
    record["rss_mb"]["idle"] = rss_mb()
    return record


def model_specs(text: str | None) -> list[Any]:
    """``--models`` (JSON, the service's form) as model specs; None: the bundled models."""
    from service.settings import ModelSpec, bundled_models

    return [ModelSpec.model_validate(m) for m in json.loads(text)] if text else bundled_models()


def onnx_graph(path: Path, directory: Path) -> Path:
    """``path`` itself when it is a graph, else the checkpoint exported to ONNX under ``directory`` (once)."""
    from inference.runtime import cached_name, export_checkpoint

    return path if path.suffix == ".onnx" else export_checkpoint(path, directory / cached_name(path, ".onnx"))


def child(args: argparse.Namespace) -> dict[str, Any]:
    record: dict[str, Any] = {"variant": args.variant, "rss_mb": {"imports": rss_mb()}}
    buckets = parse_buckets(args.buckets)
    if args.variant == "ort":
        from export.runtimes import OnnxRuntime

        sessions = [
            OnnxRuntime(args.graph, providers=["CPUExecutionProvider"], threads=args.threads, cpu_arena=False)
            for _ in range(args.streams)
        ]

        def prepare(height: int, width: int) -> None:
            pass

        def infer(images: np.ndarray, stream: int = 0) -> Any:
            return sessions[stream].infer(images)

    elif args.variant == "runtime":
        from export.openvino_runtime import OpenVinoRuntime

        ov_runtime = OpenVinoRuntime(args.graph, threads=args.threads, streams=args.streams)

        def prepare(height: int, width: int) -> None:
            pass

        def infer(images: np.ndarray, stream: int = 0) -> Any:
            return ov_runtime.infer(images)

    else:
        largest = (max(h for h, _ in buckets), max(w for _, w in buckets))
        prepare, infer = openvino_infer(args.variant, args.graph, args.batch, args.streams, args.threads, largest)
    record["rss_mb"]["read"] = rss_mb()
    rng = np.random.default_rng(0)
    images = {bucket: rng.integers(0, 256, (args.batch, 3, *bucket), dtype=np.uint8) for bucket in buckets}
    started = time.perf_counter()
    for bucket in buckets:
        prepare(*bucket)
        record["rss_mb"][f"compiled {bucket[0]}x{bucket[1]}"] = rss_mb()
        for size in sorted({1, args.batch}):
            for stream in range(args.streams):
                infer(images[bucket][:size], stream)
        record["rss_mb"][f"warm {bucket[0]}x{bucket[1]}"] = rss_mb()
    record["warm_up_s"] = round(time.perf_counter() - started, 2)
    record["rss_mb"]["warm"] = rss_mb()
    latency: dict[str, Any] = {}
    for bucket in buckets:
        times: dict[int, list[float]] = {1: [], args.batch: []}
        for _ in range(args.repeats):
            for size in times:
                started = time.perf_counter()
                infer(images[bucket][:size])
                times[size].append(time.perf_counter() - started)
        b1, bn = statistics.median(times[1]), statistics.median(times[args.batch])
        latency[f"{bucket[0]}x{bucket[1]}"] = {
            "batch1_ms": round(b1 * 1000, 1),
            f"batch{args.batch}_ms": round(bn * 1000, 1),
            f"batch{args.batch}_per_image_ms": round(bn * 1000 / args.batch, 1),
            "all_ms": {str(k): [round(t * 1000, 1) for t in v] for k, v in times.items()},
        }
    record["latency"] = latency
    record["rss_mb"]["end"] = rss_mb()
    peak = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    record["peak_rss_mb"] = round(int(peak.split()[1]) / 1024, 1)
    return record


def exported_flags(args: argparse.Namespace, variants: list[str], directory: Path) -> list[str]:
    """Flags that point the children at ONNX graphs: ``--graph`` (engine variants and ``--interleaved``) and
    ``--models`` (``service-*`` variants), their checkpoints exported here once, under ``directory``."""
    flags = []
    if args.interleaved or any(not variant.startswith("service-") for variant in variants):
        flags += ["--graph", str(onnx_graph(Path(args.graph), directory))]
    if any(variant.startswith("service-") for variant in variants):
        specs = [
            spec.model_copy(update={"path": onnx_graph(spec.path, directory)}) for spec in model_specs(args.models)
        ]
        flags += ["--models", json.dumps([spec.model_dump(mode="json") for spec in specs])]
    return flags


def run_child(command: list[str], what: str) -> dict[str, Any]:
    """The JSON record a child process prints last, or SystemExit with its stderr."""
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=os.environ)
    if done.returncode != 0:
        raise SystemExit(f"{what} failed: {done.stderr[-3000:]}")
    record: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.openvino_memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--graph", default="models/embedmask_nucleus/model.pt", help="an .onnx graph or a checkpoint")
    parser.add_argument("--buckets", default="256x256,512x512")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", default="static,dynamic_batch,batch1,ort")
    parser.add_argument(
        "--interleaved", action="store_true", help="also time every way of batching in one process, interleaved"
    )
    parser.add_argument("--models", help='service-* variants: JSON [{"name", "path"}] (default: the bundled models/)')
    parser.add_argument(
        "--cache-dir", default=None, help="service-* variants: the cache directory (default: a new temporary one)"
    )
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # set in the child processes
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.variant == "interleaved":
        print(json.dumps(interleaved_latency(args)))
        return
    if args.variant and args.variant.startswith("service-"):
        print(json.dumps(service_models(args)))
        return
    if args.variant:
        print(json.dumps(child(args)))
        return
    variants = args.variants.split(",")
    unknown = [variant for variant in variants if variant not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    records = []
    interleaved = None
    with tempfile.TemporaryDirectory(prefix="onestage-ovmem-") as tmp:
        # The children get the exported graphs (argparse keeps the last of a repeated flag).
        own = [sys.executable, "-m", "bench.openvino_memory", *(argv or sys.argv[1:])]
        own += exported_flags(args, variants, Path(tmp) / "graphs")
        for variant in variants:
            command = [*own, "--variant", variant]
            if variant.startswith("service-") and args.cache_dir is None:
                command += ["--cache-dir", str(Path(tmp) / variant)]
            record = run_child(command, variant)
            records.append(record)
            print(json.dumps({k: v for k, v in record.items() if k != "latency"}), flush=True)
            for bucket, row in record.get("latency", {}).items():
                print(f"  {bucket}: { ({k: v for k, v in row.items() if k != 'all_ms'}) }", flush=True)
        if args.interleaved:
            interleaved = run_child([*own, "--variant", "interleaved"], "interleaved latency")
            for bucket, row in interleaved.items():
                print(f"  interleaved {bucket} median per image ms: {row['median_per_image_ms']}", flush=True)
    if args.output:
        from bench.serve import machine

        settings = {k: getattr(args, k) for k in ("graph", "buckets", "batch", "streams", "threads", "repeats")}
        result = {"machine": machine(), "settings": settings, "records": records, "interleaved_latency": interleaved}
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
