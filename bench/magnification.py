"""Other magnifications: does ``scale=auto`` beat the recipe's fixed scale on fields from another microscope?

    python -m bench.magnification [--checkpoints models/meinst_nucleus/model.pt models/embedmask_nucleus/model.pt]
        [--fields data/nucleus/test_fields.json] [--factors 0.5 0.75 1.0 1.5 2.0] [--runtime onnxruntime|torch]
        [--cache-dir DIR] [--output bench/results/magnification.json]

The test fields (raw 16-bit, whole width, never used for tuning) are resampled by each factor, as a camera
with that much more (factor > 1) or less magnification would have seen them: the image with area averaging
(down) or bilinear interpolation (up), kept in 16 bits, the ground-truth masks with nearest neighbours. Each
model is then evaluated on every set by ``training.evaluate`` (the service's pipeline, ``inference.Predictor``)
with its recipe's own scale and with ``scale=auto`` (a first pass whose median box side is compared with the
training objects' median size, recorded in the checkpoint). Prints a table and saves JSON under
``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import tifffile
from pycocotools import mask as mask_utils

from inference.predictor import Predictor, in_process_options
from training.evaluate import evaluate, load_coco

RESULTS = Path(__file__).resolve().parent / "results"


def rescaled_fields(annotations: str, factor: float, out: Path) -> tuple[str, str]:
    """A copy of a COCO set of 16-bit fields resampled by ``factor`` (images and masks); returns (json, dir)."""
    data = json.loads(Path(annotations).read_text())
    images_dir = Path(annotations).with_suffix("")
    target = out / f"x{factor:g}"
    target.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for info in data["images"]:
        raw = tifffile.imread(images_dir / info["file_name"])
        height, width = max(1, round(raw.shape[0] * factor)), max(1, round(raw.shape[1] * factor))
        interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
        tifffile.imwrite(target / info["file_name"], cv2.resize(raw, (width, height), interpolation=interpolation))
        sizes[info["id"]] = (height, width)
        info.update(height=height, width=width)
    annotations_out = []
    for ann in data["annotations"]:
        height, width = sizes[ann["image_id"]]
        mask = cv2.resize(mask_utils.decode(ann["segmentation"]), (width, height), interpolation=cv2.INTER_NEAREST)
        if mask.sum() == 0:
            continue
        rle = mask_utils.encode(np.asfortranarray(mask))
        rle["counts"] = rle["counts"].decode("ascii")
        ann.update(segmentation=rle, area=int(mask.sum()), bbox=[float(v) for v in mask_utils.toBbox(rle)])
        annotations_out.append(ann)
    data["annotations"] = annotations_out
    path = out / f"x{factor:g}.json"
    path.write_text(json.dumps(data))
    return str(path), str(target)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoints", nargs="+", default=["models/meinst_nucleus/model.pt", "models/embedmask_nucleus/model.pt"]
    )
    parser.add_argument("--fields", default="data/nucleus/test_fields.json")
    parser.add_argument("--factors", type=float, nargs="+", default=[0.5, 0.75, 1.0, 1.5, 2.0])
    parser.add_argument("--runtime", default="onnxruntime", choices=["torch", "onnxruntime"])
    parser.add_argument("--cache-dir", type=Path, default=None, help="where a .pt is exported (default: the service's)")
    parser.add_argument("--output", default=str(RESULTS / "magnification.json"))
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sets = {factor: rescaled_fields(args.fields, factor, Path(tmp)) for factor in args.factors}
        for checkpoint in args.checkpoints:
            options = in_process_options(engine=args.runtime)
            predictor = Predictor.open(checkpoint, options, cache_dir=args.cache_dir)
            for factor, (annotations, images) in sets.items():
                coco = load_coco(annotations)
                for scale in ("recipe", "auto"):
                    start = time.perf_counter()
                    metrics = evaluate(predictor, coco, images, scale=1.0 if scale == "recipe" else "auto")
                    rows.append(
                        {
                            "checkpoint": checkpoint,
                            "magnification": factor,
                            "scale": scale,
                            "segm_AP": metrics["segm"]["AP"],
                            "bbox_AP": metrics["bbox"]["AP"],
                            "seconds": round(time.perf_counter() - start, 2),
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
    print("\n| model | magnification | segm AP, recipe scale | segm AP, scale=auto | bbox AP, recipe / auto |")
    print("|---|---|---|---|---|")
    for checkpoint in args.checkpoints:
        for factor in args.factors:
            fixed, auto = (
                next(
                    r
                    for r in rows
                    if r["checkpoint"] == checkpoint and r["magnification"] == factor and r["scale"] == s
                )
                for s in ("recipe", "auto")
            )
            print(
                f"| {Path(checkpoint).parent.name} | {factor:g}x | {fixed['segm_AP']:.1f} | {auto['segm_AP']:.1f} "
                f"| {fixed['bbox_AP']:.1f} / {auto['bbox_AP']:.1f} |"
            )
    os.makedirs(Path(args.output).parent, exist_ok=True)
    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()}
    Path(args.output).write_text(
        json.dumps({"machine": machine, "command": " ".join(sys.argv), "rows": rows}, indent=1)
    )
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
