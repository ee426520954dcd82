"""Every entry point gives the same instances: ``POST /segment``, ``python -m service.predict --url``,
``python -m service.predict --checkpoint`` and ``python -m training.evaluate``'s results file, on the same engine
(onnxruntime on the CPU), for an untiled raw 16-bit image, a raw 16-bit field larger than every bucket (tiled)
and a ``scale=auto`` request; and the three answering entry points default to the model's recommended score
threshold, which evaluation does not apply (it keeps every detection for AP)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tifffile
from pycocotools import mask as mask_utils

from inference.pipeline import SegmentOptions
from inference.predictor import Predictor, in_process_options
from model.checkpoint import load_checkpoint, save_checkpoint
from service.launcher import ServiceProcess
from tests.service_models import tiny_checkpoint
from training.nucleus import HELA_IMAGES, resource

ROOT = Path(__file__).resolve().parents[1]
MICROSCOPY = ("data.resize=scale", "data.scale_test=1.0", "data.intensity=percentile")
OBJECT_SIZE = 12.0  # the tiny model's boxes are ~24 px: scale=auto asks for about 0.5
ENGINE = ["--runtime", "onnxruntime"]
# (name, rows, columns, scale): cut from a raw HeLa frame; the buckets are 128x128 to 192x192.
CASES = [
    ("untiled", (100, 200), (300, 420), "1"),
    ("tiled", (100, 300), (200, 440), "1"),
    ("auto", (100, 300), (200, 440), "auto"),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("parity")


@pytest.fixture(scope="module")
def checkpoint(workdir: Path) -> Path:
    """A tiny microscopy EmbedMask with confident detections (so scale=auto measures objects) whose recommended
    score threshold lies inside its scores on the untiled image: the defaults visibly drop some detections."""
    path = tiny_checkpoint("embedmask", workdir / "nuclei.pt", extra=MICROSCOPY, object_size=OBJECT_SIZE)
    saved = load_checkpoint(path)
    saved["model"]["head.cls_logits.bias"] += 3.0
    save_checkpoint(saved, path)
    predictor = Predictor.open(path, in_process_options(engine="onnxruntime"), cache_dir=workdir / "probe")
    untiled = SegmentOptions(score_threshold=0, scale=1.0)
    scores = [i.score for i in predictor(image_bytes(workdir, CASES[0]), untiled).instances]
    saved["recommended_score_threshold"] = float(np.median(scores))
    save_checkpoint(saved, path)
    return path


def image_bytes(workdir: Path, case: tuple[str, tuple[int, int], tuple[int, int], str]) -> bytes:
    """The case's crop of a raw HeLa frame (uint16 on an offset, as the microscope wrote it) as a TIFF file."""
    name, rows, columns = case[:3]
    path = workdir / "images" / f"{name}.tif"
    if not path.is_file():
        path.parent.mkdir(exist_ok=True)
        tifffile.imwrite(path, tifffile.imread(resource(HELA_IMAGES), key=0)[slice(*rows), slice(*columns)])
    return path.read_bytes()


@pytest.fixture(scope="module")
def server(workdir: Path, checkpoint: Path) -> Iterator[ServiceProcess]:
    models = json.dumps([{"name": "nuclei", "path": str(checkpoint)}])
    process = ServiceProcess(
        ["--models", models, "--cache-dir", str(workdir / "cache"), "--runtime.engine", "onnxruntime"],
        workdir / "server.log",
    )
    try:
        process.wait_ready()
        yield process
    finally:
        process.terminate()


def run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


Instance = tuple[list[float], float, dict[str, Any]]  # xywh box, score, RLE


def from_records(records: list[dict[str, Any]]) -> list[Instance]:
    return sorted(((r["bbox"], r["score"], r["segmentation"]) for r in records), key=lambda i: -i[1])


def assert_same(got: list[Instance], want: list[Instance], where: str) -> None:
    assert len(got) == len(want) > 0, (where, len(got), len(want))
    for (box, score, rle), (want_box, want_score, want_rle) in zip(got, want):
        assert box == pytest.approx(want_box, abs=0.5), where
        assert score == pytest.approx(want_score, abs=1e-4), where
        if rle != want_rle:
            rles = [{**r, "counts": r["counts"].encode()} for r in (rle, want_rle)]
            assert mask_utils.iou(rles[:1], rles[1:], [0])[0, 0] >= 0.99, where


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_every_entry_point_answers_the_same(
    case: tuple[str, tuple[int, int], tuple[int, int], str], server: ServiceProcess, checkpoint: Path, workdir: Path
) -> None:
    name, _, _, scale = case
    data = image_bytes(workdir, case)
    image = workdir / "images" / f"{name}.tif"
    meta = httpx.get(f"{server.url}/v2/models/nuclei").json()
    threshold = meta["recommended_score_threshold"]

    served = httpx.post(
        f"{server.url}/segment", content=data, params={"model": "nuclei", "scale": scale}, timeout=120
    ).json()
    assert served["score_threshold"] == threshold
    api = [(i["bbox"], i["score"], i["segmentation"]) for i in served["instances"]]

    outputs = {}
    for mode, source in (("url", ["--url", server.url]), ("checkpoint", ["--checkpoint", str(checkpoint), *ENGINE])):
        out = workdir / f"predict-{mode}-{name}"
        run(
            "service.predict",
            str(image),
            *source,
            "--out",
            str(out),
            "--scale",
            scale,
            "--cache-dir",
            str(workdir / "cache"),
        )
        outputs[mode] = from_records(json.loads((out / "results.json").read_text()))

    height, width = served["height"], served["width"]
    annotations = workdir / f"{name}.json"
    annotations.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": image.name, "height": height, "width": width}],
                "annotations": [],
                "categories": [{"id": i, "name": n} for i, n in zip(meta["category_ids"], meta["class_names"])],
            }
        )
    )
    results = workdir / f"evaluate-{name}.json"
    summary = run(
        "training.evaluate",
        "--checkpoint", str(checkpoint),
        "--annotations", str(annotations),
        "--images", str(image.parent),
        "--output", str(results),
        "--scale", scale,
        "--cache-dir", str(workdir / "cache"),
        *ENGINE,
    )  # fmt: skip
    assert json.loads(summary.stdout.splitlines()[-1])["score_threshold"] == 0.0
    evaluated = from_records(json.loads(results.read_text()))
    kept = [i for i in evaluated if i[1] >= threshold]
    assert 0 < len(kept) < len(evaluated) or name != "untiled"  # the default threshold drops some here

    assert_same(api, kept, f"{name}: POST /segment vs training.evaluate")
    assert_same(outputs["url"], kept, f"{name}: predict --url vs training.evaluate")
    assert_same(outputs["checkpoint"], kept, f"{name}: predict --checkpoint vs training.evaluate")
    if name == "tiled":
        assert json.loads(summary.stdout.splitlines()[-1])["images"] == 1 and width > 192
    if name == "auto":
        assert served["scale"] != 1.0  # estimated (which probe a random model's answer is believed: arbitrary)
