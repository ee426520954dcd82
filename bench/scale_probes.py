"""How well ``scale=auto`` finds each image's scale, and how other probe choices would: the evidence the size
estimate (``inference.pipeline.ImagePipeline.auto_scale``) is designed and tuned on.

    python -m bench.scale_probes [--checkpoints models/embedmask_nucleus/model.pt ...]
        [--sets data/val_shifted/sets.json] [--probe-scales 0.333 0.5 1 2 3] [--output bench/results/scale_probes.json]

For every image of every set (by default the HeLa val fields resampled to 0.33-3x and with photometric
changes, ``python -m training.shifted val``; never a test set), the ideal scale is the one that brings the
median ground-truth object to the model's expected diameter. Each model runs a boxes-only probe at each probe
scale on the image's probe region, as ``auto_scale`` does (``probe_region``; ``inference.scale.probe_evidence``:
the scale its median confident object implies and its support). Strategies are replayed on these records with
the pipeline's own functions (``choose_estimate``, the ``AUTO_SNAP`` rule): ``shipped`` (``AUTO_PROBE_SCALES``,
what ``auto_scale`` runs), ``own`` (the model's own scale's probe alone, the estimate before it) and ``all``
(every probe scale measured). Reported per set and strategy: the share of images whose chosen scale is
within 1.25x of the ideal, and the median and worst factor off; and the seconds each probe took.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.domains import val_sets
from inference.pipeline import AUTO_PROBE_SCALES, AUTO_PROBE_SHRINK, AUTO_SNAP, SegmentOptions
from inference.predictor import Predictor, in_process_options
from inference.scale import AUTO_MIN_SCORE, ProbeEvidence, choose_estimate, probe_evidence
from training.evaluate import load_coco

RESULTS = Path(__file__).resolve().parent / "results"
NEAR = 1.25  # a chosen scale within this factor of the ideal counts as right


def probe(predictor: Predictor, image: np.ndarray, scale: float) -> tuple[ProbeEvidence, float]:
    """One boxes-only probe of ``image`` at caller scale ``scale`` on its probe region, as ``auto_scale`` runs
    it: its evidence and seconds."""
    pipeline = predictor.pipeline
    region = pipeline.probe_region(image, scale, 1 if scale == 1.0 else AUTO_PROBE_SHRINK)
    started = time.perf_counter()
    answer = predictor(region, SegmentOptions(scale=scale, mask_format="none", score_threshold=AUTO_MIN_SCORE))
    seconds = time.perf_counter() - started
    boxes = np.array([i.box for i in answer.instances], dtype=np.float32).reshape(-1, 4)
    scores = np.array([i.score for i in answer.instances], dtype=np.float32)
    return probe_evidence(pipeline.contract, boxes, scores, region.shape[:2], scale), seconds


def chosen_scale(evidence: list[ProbeEvidence]) -> float:
    """What ``auto_scale`` makes of these probes: the believed probe's estimate, snapped to the own scale."""
    best = choose_estimate(evidence)
    if best is None or best.estimate is None:
        return 1.0
    return 1.0 if abs(np.log(best.estimate.scale)) <= np.log(AUTO_SNAP) else best.estimate.scale


def strategies(probes: dict[float, ProbeEvidence]) -> dict[str, float]:
    return {
        "shipped": chosen_scale([probes[s] for s in AUTO_PROBE_SCALES if s in probes]),
        "own": chosen_scale([probes[1.0]]) if 1.0 in probes else 1.0,
        "all": chosen_scale(list(probes.values())),
    }


def summary(images: list[dict[str, Any]]) -> dict[str, Any]:
    rows = {}
    for name in images[0]["chosen"]:
        off = np.array([abs(np.log(image["chosen"][name] / image["ideal"])) for image in images])
        rows[name] = {
            "within_1.25x": float(np.mean(off <= np.log(NEAR))),
            "median_factor_off": float(np.exp(np.median(off))),
            "worst_factor_off": float(np.exp(off.max())),
        }
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoints", nargs="+", default=["models/meinst_nucleus/model.pt", "models/embedmask_nucleus/model.pt"]
    )
    parser.add_argument("--sets", default="data/val_shifted/sets.json", help="training.shifted's val sets")
    parser.add_argument("--only", nargs="*", default=None, help="only these set names")
    parser.add_argument(
        "--probe-scales",
        type=float,
        nargs="+",
        default=sorted({*AUTO_PROBE_SCALES, 0.5, 2.0}),
        help="probe scales to measure (default: auto_scale's and 0.5, 2); the shipped strategy reads its own",
    )
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--output", default=str(RESULTS / "scale_probes.json"))
    args = parser.parse_args(argv)

    sets = val_sets(args.sets)
    if args.only:
        sets = {name: files for name, files in sets.items() if name in args.only}
    report: dict[str, Any] = {"models": {}}
    for checkpoint in args.checkpoints:
        predictor = Predictor.open(checkpoint, in_process_options(engine="onnxruntime"), cache_dir=args.cache_dir)
        expected = predictor.pipeline.expected_diameter
        if expected is None:
            raise SystemExit(f"{checkpoint} records no object size: scale=auto does not apply")
        per_set = {}
        for set_name, (labels, folder) in sets.items():
            coco = load_coco(labels)
            images = []
            for image_id in sorted(coco.getImgIds()):
                sides = [np.sqrt(a["bbox"][2] * a["bbox"][3]) for a in coco.imgToAnns[image_id]]
                if not sides:
                    continue
                data = (Path(folder) / coco.imgs[image_id]["file_name"]).read_bytes()
                decoded = predictor.pipeline.decode(data).rgb
                measured = {scale: probe(predictor, decoded, scale) for scale in args.probe_scales}
                evidence = {scale: record for scale, (record, _) in measured.items()}
                images.append(
                    {
                        "image_id": image_id,
                        "ideal": expected / float(np.median(sides)),
                        "chosen": strategies(evidence),
                        "probes": {
                            f"{scale:.3g}": {**record._asdict(), "seconds": seconds}
                            for scale, (record, seconds) in measured.items()
                        },
                    }
                )
            per_set[set_name] = {"summary": summary(images), "images": images}
            print(Path(checkpoint).parent.name, set_name, json.dumps(per_set[set_name]["summary"]), flush=True)
        report["models"][Path(checkpoint).parent.name] = per_set
    names = ("shipped", "own", "all")
    print("\n| model | set | " + " | ".join(f"{s}: within 1.25x / median / worst" for s in names) + " |")
    print("|---|---|" + "---|" * len(names))
    for model, per_set in report["models"].items():
        for set_name, entry in per_set.items():
            cells = " | ".join(
                f"{v['within_1.25x']:.0%} / {v['median_factor_off']:.2f} / {v['worst_factor_off']:.2f}"
                for v in entry["summary"].values()
            )
            print(f"| {model} | {set_name} | {cells} |")
    report["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "load": list(os.getloadavg())}
    report["command"] = " ".join(sys.argv)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
