"""Mask finishing speed: `model.finishing.finish_image` vs the full-frame route.

The full-frame route is what detectron2 and EM-mrcnn evaluation do: paste each instance into a canvas of
the whole image with torch (grid_sample for MEInst, F.interpolate for EmbedMask), threshold, and call
`pycocotools.mask.encode` on the Fortran-ordered full mask. Both routes get the same synthetic outputs for
100 instances (boxes 5-30% of the image side, soft elliptic masks with noise) and must give identical RLE
strings. Ours runs on one thread and on two (``finish_image(workers=2)``: the compiled kernel releases the
GIL, so two threads share one image's instances).

    python -m bench.finishing [--runs 21] [--full-runs 5] [--sizes 512x512 800x1333]
        [--out bench/results/finishing.json]

Prints a table and writes bench/results/finishing.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from model.finishing import finish_image, scale_boxes
from model.mask_contract import LOGPROB_STRIDE, OUTSIDE_LOG_PROB

SIZES = ["512x512", "800x1333"]  # HxW
INSTANCES = 100
PAD = 32  # the graph's input size divisibility


def synthetic_outputs(kind: str, size: tuple[int, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One image's graph outputs: 100 boxes inside the image and soft elliptic masks of each kind."""
    height, width = size
    bw, bh = rng.uniform(0.05, 0.3, INSTANCES) * width, rng.uniform(0.05, 0.3, INSTANCES) * height
    x0, y0 = rng.uniform(0, width - bw), rng.uniform(0, height - bh)
    boxes = np.stack([x0, y0, x0 + bw, y0 + bh], axis=1).astype(np.float32)
    scores = np.sort(rng.uniform(0.05, 1.0, INSTANCES))[::-1].astype(np.float32)
    classes = rng.integers(0, 80, INSTANCES)
    if kind == "box28":
        t = (np.arange(28) + 0.5) / 14 - 1
        ry, rx = rng.uniform(0.5, 1, (2, INSTANCES, 1, 1))
        radius2 = t[None, :, None] ** 2 / ry + t[None, None, :] ** 2 / rx
        logits = 6 * (1 - radius2) + rng.normal(0, 0.5, (INSTANCES, 28, 28))
        masks = (1 / (1 + np.exp(-logits))).astype(np.float32)
    else:
        h4, w4 = math.ceil(height / PAD) * PAD // LOGPROB_STRIDE, math.ceil(width / PAD) * PAD // LOGPROB_STRIDE
        ys, xs = (np.arange(h4) + 0.5) * LOGPROB_STRIDE, (np.arange(w4) + 0.5) * LOGPROB_STRIDE
        masks = np.empty((INSTANCES, h4, w4), dtype=np.float32)
        for k, (bx0, by0, bx1, by1) in enumerate(boxes):
            cx, cy, rx, ry = (bx0 + bx1) / 2, (by0 + by1) / 2, (bx1 - bx0) / 2, (by1 - by0) / 2
            radius2 = ((xs[None, :] - cx) / rx) ** 2 + ((ys[:, None] - cy) / ry) ** 2
            logprob = math.log(0.53) * radius2 + rng.normal(0, 0.05, (h4, w4))  # log(0.53) on the ellipse
            cells = np.floor(np.array([bx0, by0, bx1, by1]) / LOGPROB_STRIDE)
            inside = ((np.arange(h4) >= cells[1] - 2) & (np.arange(h4) <= cells[3] + 2))[:, None] & (
                (np.arange(w4) >= cells[0] - 2) & (np.arange(w4) <= cells[2] + 2)
            )[None, :]
            masks[k] = np.where(inside, logprob, OUTSIDE_LOG_PROB)
    return {"num_dets": np.int64(INSTANCES), "boxes": boxes, "scores": scores, "classes": classes, "masks": masks}


def full_frame(kind: str, outputs: dict[str, np.ndarray], size: tuple[int, int]) -> list[str]:
    """Paste every instance into a full-image canvas with torch, threshold, encode with pycocotools."""
    height, width = size
    scaled, _ = scale_boxes(outputs["boxes"], size, size)
    strings = []
    for k in range(int(outputs["num_dets"])):
        if kind == "box28":
            x0, y0, x1, y1 = torch.from_numpy(scaled[k])
            gy = ((torch.arange(height, dtype=torch.float32) + 0.5) - y0) / (y1 - y0) * 2 - 1
            gx = ((torch.arange(width, dtype=torch.float32) + 0.5) - x0) / (x1 - x0) * 2 - 1
            grid = torch.stack([gx[None, :].expand(height, width), gy[:, None].expand(height, width)], dim=2)[None]
            mask = (
                F.grid_sample(torch.from_numpy(outputs["masks"][k])[None, None], grid, align_corners=False)[0, 0] >= 0.5
            )
        else:
            h4, w4 = outputs["masks"].shape[1:]
            h_in, w_in = size  # the bench feeds the image at its own size
            canvas = (math.ceil(h4 * LOGPROB_STRIDE * height / h_in), math.ceil(w4 * LOGPROB_STRIDE * width / w_in))
            up = F.interpolate(
                torch.from_numpy(outputs["masks"][k])[None, None], size=canvas, mode="bilinear", align_corners=False
            )
            mask = up[0, 0, :height, :width] > math.log(0.53)
        rle = mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
        strings.append(rle["counts"].decode("ascii"))
    return strings


def ours(kind: str, outputs: dict[str, np.ndarray], size: tuple[int, int], workers: int = 1) -> list[str]:
    instances = finish_image(**outputs, mask_kind=kind, input_size=size, image_size=size, workers=workers)
    return [inst.rle["counts"] for inst in instances]


def _measure(fn: Callable[[], object]) -> tuple[float, float]:
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - start_wall) * 1e3, (time.process_time() - start_cpu) * 1e3


def _summary(samples: list[tuple[float, float]]) -> dict:
    wall, cpu = [w for w, _ in samples], [c for _, c in samples]
    return {
        "wall_ms_median": round(statistics.median(wall), 2),
        "cpu_ms_median": round(statistics.median(cpu), 2),
        "wall_ms_runs": [round(t, 2) for t in wall],
    }


def timed(fn: Callable[[], object], runs: int) -> dict:
    """Median wall-clock and process-CPU milliseconds over `runs` calls after one warm-up call. CPU time
    is the steadier figure on a shared machine (it leaves out waiting for a core); torch's full-frame
    ops run on torch's threads, so their CPU time can exceed their wall time."""
    fn()
    return _summary([_measure(fn) for _ in range(runs)])


def timed_pair(first: Callable[[], object], second: Callable[[], object], runs: int) -> tuple[dict, dict]:
    """`timed` for two variants, alternating call by call so that load on the machine hits both alike."""
    first(), second()
    samples = [(_measure(first), _measure(second)) for _ in range(runs)]
    return _summary([a for a, _ in samples]), _summary([b for _, b in samples])


def machine() -> dict[str, object]:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    model = next(
        (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor()
    )
    return {
        "cpu_model": model,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1min_at_start": os.getloadavg()[0],
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
    }


def image_size(text: str) -> tuple[int, int]:
    """ "HxW" -> (H, W)."""
    height, _, width = text.partition("x")
    return int(height), int(width)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21, help="timed runs of ours (median reported)")
    parser.add_argument("--full-runs", type=int, default=5, help="timed runs of the full-frame route")
    parser.add_argument("--sizes", type=image_size, nargs="+", default=[image_size(s) for s in SIZES], help="HxW")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "finishing.json"))
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    results: dict[str, Any] = {"machine": machine(), "instances": INSTANCES, "cases": []}
    print(
        f"{'size':>9} {'kind':>11} {'ours 1 thread ms (cpu)':>23} {'ours 2 threads ms':>18} "
        f"{'full-frame ms (cpu)':>21} {'speed-up':>9}  identical"
    )
    for size in args.sizes:
        for kind in ("box28", "logprob_s4"):
            outputs = synthetic_outputs(kind, size, rng)
            reference = full_frame(kind, outputs, size)
            identical = ours(kind, outputs, size) == reference == ours(kind, outputs, size, workers=2)
            one, two = timed_pair(
                lambda: ours(kind, outputs, size), lambda: ours(kind, outputs, size, workers=2), args.runs
            )
            full = timed(lambda: full_frame(kind, outputs, size), args.full_runs)
            boxes = outputs["boxes"]
            results["cases"].append(
                {
                    "image_size": list(size),
                    "mask_kind": kind,
                    "identical_rle": identical,
                    "mean_box_area_px": round(
                        float(np.mean((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
                    ),
                    "speedup_wall": round(full["wall_ms_median"] / one["wall_ms_median"], 1),
                    "ours": one,
                    "ours_2_threads": two,
                    "full_frame": full,
                }
            )
            print(
                f"{size[0]}x{size[1]:<5} {kind:>11} {one['wall_ms_median']:13.1f} ({one['cpu_ms_median']:5.1f})"
                f" {two['wall_ms_median']:18.1f} {full['wall_ms_median']:13.1f} ({full['cpu_ms_median']:6.1f})"
                f" {full['wall_ms_median'] / one['wall_ms_median']:8.1f}x  {identical}"
            )
    results["machine"]["loadavg_1min_at_end"] = os.getloadavg()[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
