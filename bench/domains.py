"""Other microscopes: segm AP at default settings, with ``scale=auto`` and at the best fixed scale, ours and the
peer, on the HeLa test fields resampled to other magnifications and on the CHO slices (another microscope).

    python -m bench.domains [--split test|val] [--checkpoints models/meinst_nucleus/model.pt ...]
        [--peer runs/maskrcnn_nucleus/model.pt] [--factors 0.33 0.5 1 2 3] [--output bench/results/domains.json]

``--split test`` (the report): the raw 16-bit HeLa test fields resampled by each factor (as a camera with that
much more or less magnification would have seen them; ``rescaled_fields``) and the CHO
test slices (``python -m training.shifted cho --out data/cho``: never used for training, tuning or choosing
anything). ``--split val`` (where the size estimate is designed and tuned): the sets ``python -m
training.shifted val --out data/val_shifted`` makes from the HeLa val fields (magnifications 0.33-3x and
photometric changes).

Per model and set: ``default`` (no scale and no diameter: what a user gets), ``auto`` (``scale=auto``), ``own``
(the model's own scale), and ``best fixed``: the best of three fixed scales around the one that brings the
set's median ground-truth object to the model's expected diameter (an oracle: it reads the annotations, so it
is a ceiling to compare with, never a setting). Our models run through ``training.evaluate`` (the service's
pipeline); the peer (``bench.accuracy``'s Mask R-CNN) has no size estimate: its default is its own test scale.
Prints a markdown table and saves JSON with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tifffile
import torch
from pycocotools import mask as mask_utils

from bench.accuracy import build_maskrcnn, coco_metrics, peer_dataset, predict_maskrcnn
from inference.pipeline import Scale
from inference.predictor import Predictor, in_process_options
from model.checkpoint import load_checkpoint
from model.config import Config
from training.evaluate import evaluate, load_coco

RESULTS = Path(__file__).resolve().parent / "results"
ORACLE_STEPS = (1 / 1.4, 1.0, 1.4)  # fixed scales tried around the annotations' ideal one
Sets = dict[str, tuple[str, str]]  # name -> (annotations, images)
Evaluate = Callable[[str, str, "Scale | None"], dict[str, Any]]  # (annotations, images, caller scale) -> metrics


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


def test_sets(fields: str, factors: list[float], cho: str, work: Path) -> Sets:
    sets = {f"hela x{factor:g}": rescaled_fields(fields, factor, work) for factor in factors}
    sets["cho"] = (cho, str(Path(cho).with_suffix("")))
    return sets


def val_sets(index: str) -> Sets:
    root = Path(index).parent
    listed = json.loads(Path(index).read_text())["sets"]
    return {entry["name"]: (str(root / f"{entry['name']}.json"), str(root / entry["name"])) for entry in listed}


def median_diameter(annotations: str) -> float:
    """The median box side sqrt(w * h) of a set's ground-truth objects, image pixels."""
    boxes = [a["bbox"] for a in json.loads(Path(annotations).read_text())["annotations"]]
    return float(np.median([np.sqrt(w * h) for _, _, w, h in boxes]))


def ours(checkpoint: str, cache_dir: Path | None) -> tuple[Evaluate, float | None]:
    """Our checkpoint through the service's pipeline (onnxruntime, fp32), and the diameter it expects."""
    predictor = Predictor.open(checkpoint, in_process_options(engine="onnxruntime"), cache_dir=cache_dir)

    def run(annotations: str, images: str, scale: Scale | None) -> dict[str, Any]:
        return evaluate(predictor, load_coco(annotations), images, scale)

    return run, predictor.pipeline.expected_diameter


def peer(checkpoint: str, mask_head_channels: int | None) -> Evaluate:
    """The Mask R-CNN peer (``bench.accuracy``) on its recipe's input contract (a caller scale multiplies its
    recipe's test scale, as ours)."""
    saved = load_checkpoint(checkpoint)
    cfg = Config.model_validate(saved["config"])
    model = build_maskrcnn(cfg, mask_head_channels or cfg.model.head.channels, imagenet=False)
    model.load_state_dict(saved["model"])

    def run(annotations: str, images: str, scale: Scale | None) -> dict[str, Any]:
        dataset = peer_dataset(cfg, annotations, images, 1.0 if scale is None else float(scale))
        with torch.no_grad():
            results = predict_maskrcnn(model, dataset)
        return {iou_type: coco_metrics(dataset.coco, results, iou_type) for iou_type in ("bbox", "segm")}

    return run


def rows_for(name: str, run: Evaluate, expected: float | None, sets: Sets, with_auto: bool) -> list[dict[str, Any]]:
    rows = []
    for set_name, (labels, images) in sets.items():
        ideal = expected / median_diameter(labels) if expected else 1.0
        settings: dict[str, Scale | None] = {"default": None, "own": 1.0}
        if with_auto:
            settings["auto"] = "auto"
        settings |= {f"fixed {ideal * step:.3g}": ideal * step for step in ORACLE_STEPS}
        measured: dict[str, Any] = {}
        for setting, scale in settings.items():
            started = time.perf_counter()
            metrics = run(labels, images, scale)
            measured[setting] = {
                "scale": scale,
                "segm_AP": metrics["segm"]["AP"],
                "bbox_AP": metrics["bbox"]["AP"],
                "seconds": round(time.perf_counter() - started, 1),
            }
            print(f"{name} {set_name} {setting}: segm AP {metrics['segm']['AP']:.1f}", file=sys.stderr, flush=True)
        fixed = {k: v for k, v in measured.items() if k.startswith("fixed")}
        best = max(fixed, key=lambda k: fixed[k]["segm_AP"])
        rows.append({"model": name, "set": set_name, "ideal_scale": ideal, "best_fixed": best, "settings": measured})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | set | default | auto | own scale | best fixed (scale) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        s = row["settings"]
        auto = f"{s['auto']['segm_AP']:.1f}" if "auto" in s else "-"
        best = s[row["best_fixed"]]
        lines.append(
            f"| {row['model']} | {row['set']} | {s['default']['segm_AP']:.1f} | {auto} | {s['own']['segm_AP']:.1f} "
            f"| {best['segm_AP']:.1f} ({best['scale']:.2f}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=["test", "val"], default="test")
    parser.add_argument(
        "--checkpoints", nargs="*", default=["models/meinst_nucleus/model.pt", "models/embedmask_nucleus/model.pt"]
    )
    parser.add_argument("--peer", default=None, help="the Mask R-CNN peer's checkpoint (bench.accuracy's model.pt)")
    parser.add_argument(
        "--mask-head-channels", type=int, default=None, help="the peer's, as bench.accuracy built it (default: ours)"
    )
    parser.add_argument("--fields", default="data/nucleus/test_fields.json", help="--split test: the HeLa fields")
    parser.add_argument("--factors", type=float, nargs="+", default=[0.33, 0.5, 1.0, 2.0, 3.0])
    parser.add_argument("--cho", default="data/cho/cho.json", help="--split test: the CHO slices")
    parser.add_argument("--val-sets", default="data/val_shifted/sets.json", help="--split val: the tuning sets")
    parser.add_argument("--only", nargs="*", default=None, help="evaluate only these set names")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where a .pt is exported (default: the service's)")
    parser.add_argument("--output", default=None, help="default: bench/results/domains_<split>.json")
    args = parser.parse_args(argv)

    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        sets = (
            test_sets(args.fields, args.factors, args.cho, Path(tmp))
            if args.split == "test"
            else val_sets(args.val_sets)
        )
        if args.only:
            sets = {name: files for name, files in sets.items() if name in args.only}
        rows, expected = [], None
        for checkpoint in args.checkpoints:
            run, expected = ours(checkpoint, args.cache_dir)
            rows += rows_for(Path(checkpoint).parent.name, run, expected, sets, with_auto=True)
        if args.peer:
            # The peer learned from the same training set, so it expects the diameter our models record.
            rows += rows_for("maskrcnn", peer(args.peer, args.mask_head_channels), expected, sets, with_auto=False)
    print(table(rows))
    output = Path(args.output or RESULTS / f"domains_{args.split}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    machine = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_at_end": list(os.getloadavg()),
        "minutes": round((time.time() - started) / 60, 1),
    }
    output.write_text(json.dumps({"machine": machine, "command": " ".join(sys.argv), "rows": rows}, indent=1) + "\n")
    print(f"saved {output}")


if __name__ == "__main__":
    main()
