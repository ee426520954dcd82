"""What users get through each entry point, at default settings, scored on a COCO set: the check that what is
measured is what is served.

    python -m bench.entry_points [--checkpoints models/meinst_nucleus/model.pt models/embedmask_nucleus/model.pt]
        [--annotations data/nucleus/test_fields.json] [--images data/nucleus/test_fields]
        [--output bench/results/entry_points.json]

For each model, with no setting changed anywhere (the default engine, scale and score threshold): ``POST
/segment`` on ``python -m service`` (driven by ``python -m service.predict --url``, which writes the service's
answers as a COCO results file), ``python -m service.predict --checkpoint`` (in process) and ``python -m
training.evaluate`` (which keeps every detection, as COCO AP asks). Reported per entry point: bbox and segm AP,
the instance count, and for the answering entry points the AP of their answers (cut at the model's recommended
score threshold, so below evaluation's by the detections they leave out) and how many of their instances
evaluation's results hold too (the same box within 0.5 px and score within 1e-4). Saves JSON with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from service.launcher import ServiceProcess
from training.evaluate import coco_metrics, load_coco

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def run(module: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, check=False, timeout=7200
    )
    if done.returncode != 0:
        raise RuntimeError(f"python -m {module} failed: {done.stderr[-3000:]}")
    return done.stdout


def matched(answers: list[dict[str, Any]], evaluated: list[dict[str, Any]]) -> int:
    """How many answered instances evaluation's results hold too (same image and category, box within 0.5 px,
    score within 1e-4)."""
    by_image: dict[int, list[dict[str, Any]]] = {}
    for record in evaluated:
        by_image.setdefault(record["image_id"], []).append(record)
    count = 0
    for answer in answers:
        for record in by_image.get(answer["image_id"], []):
            same_box = np.allclose(answer["bbox"], record["bbox"], atol=0.5)
            if (
                record["category_id"] == answer["category_id"]
                and same_box
                and abs(answer["score"] - record["score"]) <= 1e-4
            ):
                count += 1
                break
    return count


def by_file_name(results: list[dict[str, Any]], images: dict[str, Any], dataset: Any) -> list[dict[str, Any]]:
    """service.predict's results (image ids in input order) renumbered to the dataset's ids by file name."""
    ids = {Path(info["file_name"]).name: info["id"] for info in dataset.imgs.values()}
    names = {image["id"]: Path(image["file_name"]).name for image in images["images"]}
    return [{**record, "image_id": ids[names[record["image_id"]]]} for record in results]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoints", nargs="+", default=["models/meinst_nucleus/model.pt", "models/embedmask_nucleus/model.pt"]
    )
    parser.add_argument("--annotations", default="data/nucleus/test_fields.json")
    parser.add_argument("--images", default="data/nucleus/test_fields")
    parser.add_argument("--cache-dir", type=Path, default=None, help="(default: the service's)")
    parser.add_argument("--output", default=str(RESULTS / "entry_points.json"))
    args = parser.parse_args(argv)
    dataset = load_coco(args.annotations)
    cache = ["--cache-dir", str(args.cache_dir)] if args.cache_dir else []
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        evaluated: dict[str, list[dict[str, Any]]] = {}
        for checkpoint in args.checkpoints:
            name = Path(checkpoint).parent.name
            results = work / f"{name}.evaluate.json"
            summary = json.loads(
                run(
                    "training.evaluate",
                    *("--checkpoint", checkpoint, "--annotations", args.annotations, "--images", args.images),
                    *("--output", str(results), *cache),
                ).splitlines()[-1]
            )
            evaluated[name] = json.loads(results.read_text())
            rows.append(
                {
                    "model": name,
                    "entry_point": "training.evaluate",
                    "runtime": summary.get("runtime"),
                    "precision": summary.get("precision"),
                    "instances": len(evaluated[name]),
                    "bbox_AP": summary["bbox"]["AP"],
                    "segm_AP": summary["segm"]["AP"],
                }
            )
            out = work / f"{name}.local"
            run("service.predict", args.images, "--checkpoint", checkpoint, "--out", str(out), *cache)
            rows.append(answered(name, "service.predict --checkpoint", out, dataset, evaluated[name]))
        models = json.dumps([{"name": Path(c).parent.name, "path": c} for c in args.checkpoints])
        server = ServiceProcess(["--models", models, *cache], work / "service.log")
        try:
            server.wait_ready(timeout=1800)
            for checkpoint in args.checkpoints:
                name = Path(checkpoint).parent.name
                out = work / f"{name}.url"
                run("service.predict", args.images, "--url", server.url, "--model", name, "--out", str(out))
                rows.append(answered(name, "POST /segment (service.predict --url)", out, dataset, evaluated[name]))
        finally:
            server.terminate()
    print("| model | entry point | segm AP | bbox AP | instances | held by evaluation's results |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        held = f"{row['held_by_evaluation']}" if "held_by_evaluation" in row else "-"
        print(
            f"| {row['model']} | {row['entry_point']} | {row['segm_AP']:.1f} | {row['bbox_AP']:.1f} "
            f"| {row['instances']} | {held} |"
        )
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": list(os.getloadavg())}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(
        json.dumps({"machine": machine, "command": " ".join(sys.argv), "rows": rows}, indent=1)
    )
    print(f"saved {args.output}")


def answered(name: str, entry: str, out: Path, dataset: Any, evaluated: list[dict[str, Any]]) -> dict[str, Any]:
    """A row for an answering entry point, from the COCO results service.predict wrote under ``out``."""
    results = by_file_name(
        json.loads((out / "results.json").read_text()), json.loads((out / "images.json").read_text()), dataset
    )
    return {
        "model": name,
        "entry_point": entry,
        "instances": len(results),
        "bbox_AP": coco_metrics(dataset, results, "bbox")["AP"],
        "segm_AP": coco_metrics(dataset, results, "segm")["AP"],
        "held_by_evaluation": f"{matched(results, evaluated)} of {len(results)}",
    }


if __name__ == "__main__":
    main()
