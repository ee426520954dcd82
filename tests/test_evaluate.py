"""Evaluation: COCO metrics through the Predictor (any runtime), the results file, the best-F1 operating point,
and the CLI on a checkpoint."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from export.metadata import DETECTION_OUTPUTS, MASK_OUTPUT, GraphMetadata
from inference.predictor import Predictor
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import load_config
from model.detector import OneStageDetector
from model.input_contract import InputContract, resized_shape
from training.evaluate import best_f1_threshold, evaluate, load_coco, main

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# (file, height, width, [(category_id, x, y, w, h)]): rectangles, so exact masks are easy to emit.
IMAGES = [
    ("a.png", 60, 80, [(7, 10, 12, 30, 20), (3, 50, 30, 20, 25)]),
    ("b.png", 48, 36, [(3, 4, 6, 20, 30)]),
    ("c.png", 40, 40, []),
]
MIN_SIZE, MAX_SIZE = 64, 200


@pytest.fixture(scope="module")
def dataset_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("rectangles")
    images, annotations = [], []
    for image_id, (name, height, width, boxes) in enumerate(IMAGES, start=1):
        pixels = np.full((height, width, 3), 30, dtype=np.uint8)
        for category, x, y, w, h in boxes:
            pixels[y : y + h, x : x + w] = 200
            mask = np.zeros((height, width), dtype=np.uint8)
            mask[y : y + h, x : x + w] = 1
            rle = mask_utils.encode(np.asfortranarray(mask))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "segmentation": rle,
                }
            )
        Image.fromarray(pixels).save(root / name)
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
    categories = [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}]
    (root / "annotations.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return str(root / "annotations.json"), str(root)


def metadata(mask_kind: str | None, category_ids: tuple[int, int] = (3, 7)) -> GraphMetadata:
    return GraphMetadata(
        method="meinst" if mask_kind else "fcos",
        mask_kind=mask_kind,
        class_names=["three", "seven"],
        category_ids=list(category_ids),
        score_threshold=0.05,
        nms_threshold=0.6,
        max_detections=3,
        pre_nms_topk=1000,
        strides=[8, 16, 32, 64, 128],
        mask_threshold=0.5 if mask_kind else None,
        mask_size=28 if mask_kind else None,
        input=InputContract(pad_value=[124, 116, 104], size_divisibility=32, min_size=MIN_SIZE, max_size=MAX_SIZE),
        output_names=[*DETECTION_OUTPUTS, *([MASK_OUTPUT] if mask_kind else [])],
    )


class GroundTruthRuntime:
    """Answers every image, in dataset order, with its ground-truth rectangles at input scale (plus one
    padded slot past ``num_dets`` that must be ignored) and all-ones box-relative masks."""

    def __init__(self, with_masks: bool, max_dets: int = 3) -> None:
        self.pending = list(IMAGES)
        self.with_masks = with_masks
        self.max_dets = max_dets

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        assert images.dtype == np.uint8 and images.shape[2] % 32 == 0 and images.shape[3] % 32 == 0
        batch = len(images)
        out = {
            "num_dets": np.zeros(batch, dtype=np.int64),
            "boxes": np.tile(np.array([0, 0, 20, 20], dtype=np.float32), (batch, self.max_dets, 1)),
            "scores": np.full((batch, self.max_dets), 0.99, dtype=np.float32),
            "classes": np.zeros((batch, self.max_dets), dtype=np.int64),
            "masks": np.ones((batch, self.max_dets, 28, 28), dtype=np.float32),
        }
        for i in range(batch):
            _, height, width, boxes = self.pending.pop(0)
            new_h, new_w = resized_shape(height, width, MIN_SIZE, MAX_SIZE)
            sx, sy = new_w / width, new_h / height
            out["num_dets"][i] = len(boxes)
            for k, (category, x, y, w, h) in enumerate(boxes):
                out["boxes"][i, k] = [x * sx, y * sy, (x + w) * sx, (y + h) * sy]
                out["scores"][i, k] = 0.9 - 0.1 * k
                out["classes"][i, k] = [3, 7].index(category)
        if not self.with_masks:
            del out["masks"]
        return out


def test_ground_truth_answers_score_100_and_the_results_file_is_coco(
    dataset_files: tuple[str, str], tmp_path: Path
) -> None:
    annotations, images = dataset_files
    results_path = tmp_path / "results.json"
    predictor = Predictor(GroundTruthRuntime(with_masks=True), metadata("box28"), batch_size=2)
    metrics = evaluate(predictor, load_coco(annotations), images, results_path=results_path)
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AP"] == pytest.approx(100.0)
        assert metrics[iou_type]["AP75"] == pytest.approx(100.0)
        assert metrics[iou_type]["APm"] is None  # no medium objects: COCO defines no value

    gt = COCO(annotations)
    results = json.loads(results_path.read_text())
    assert len(results) == 3
    detections = gt.loadRes(str(results_path))
    for det in detections.anns.values():
        truth = next(a for a in gt.imgToAnns[det["image_id"]] if a["category_id"] == det["category_id"])
        assert det["bbox"] == pytest.approx(truth["bbox"], abs=1e-3)
        assert np.array_equal(mask_utils.decode(det["segmentation"]), gt.annToMask(truth))


def test_boxes_only_and_no_detections(dataset_files: tuple[str, str]) -> None:
    annotations, images = dataset_files
    coco = load_coco(annotations)
    metrics = evaluate(Predictor(GroundTruthRuntime(with_masks=False), metadata(None), batch_size=3), coco, images)
    assert set(metrics) == {"bbox", "f1"} and metrics["bbox"]["AP"] == pytest.approx(100.0)

    class Blind(GroundTruthRuntime):
        def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
            out = super().infer(images)
            out["num_dets"][:] = 0
            return out

    metrics = evaluate(Predictor(Blind(with_masks=True), metadata("box28")), coco, images)
    assert metrics["segm"] == {name: 0.0 for name in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    assert metrics["f1"]["f1"] == 0.0
    with pytest.raises(ValueError, match="category ids"):
        evaluate(Predictor(Blind(with_masks=True), metadata("box28", (1, 2))), coco, images)


def test_cli_prints_one_json_line_for_a_checkpoint(dataset_files: tuple[str, str], tmp_path: Path) -> None:
    annotations, images = dataset_files
    cfg = load_config(
        CONFIGS / "embedmask_MNV2_nucleus.yaml",
        [
            "model.num_classes=2",
            "model.class_names=[three,seven]",
            "model.backbone.weights=null",
            "model.backbone.weights_sha256=null",
            "model.fpn.out_channels=32",
            "model.head.channels=32",
            "model.head.num_convs=1",
            "model.head.num_groups=8",
            "model.head.score_threshold=0.0",
            "model.head.max_detections=5",
            "model.embedmask.pixel_convs=1",
            "model.embedmask.pixel_channels=32",
            f"data.min_size_test={MIN_SIZE}",
            f"data.max_size_test={MAX_SIZE}",
        ],
    )
    torch.manual_seed(0)
    model = OneStageDetector(cfg.model)
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(
        {
            "model": model.state_dict(),
            "config": cfg.model_dump(mode="json"),
            "class_names": ["three", "seven"],
            "category_ids": [3, 7],
            "iteration": 0,
            "metrics": {},
        },
        checkpoint,
    )
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        main(
            [
                "--checkpoint",
                str(checkpoint),
                "--annotations",
                annotations,
                "--images",
                images,
                "--output",
                str(tmp_path / "results.json"),
                "--batch-size",
                "2",
                "--runtime",
                "onnxruntime",
                "--cache-dir",
                str(tmp_path / "cache"),
            ]
        )
    lines = stdout.getvalue().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["images"] == 3 and summary["runtime"] == "onnxruntime" and summary["score_threshold"] == 0.0
    assert 0.0 <= summary["f1"]["threshold"] <= 1.0
    for iou_type in ("bbox", "segm"):
        assert set(summary[iou_type]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    results = json.loads((tmp_path / "results.json").read_text())
    assert 0 < len(results) <= 3 * 5 and {r["category_id"] for r in results} <= {3, 7}
    assert all(
        r["segmentation"]["size"] == [IMAGES[r["image_id"] - 1][1], IMAGES[r["image_id"] - 1][2]] for r in results
    )
    COCO(annotations).loadRes(results)


def test_best_f1_threshold_is_where_false_detections_start_to_cost_more_than_they_find(
    dataset_files: tuple[str, str],
) -> None:
    """Three true objects found at 0.9, 0.8, 0.6 and two false detections at 0.7 and 0.5: F1 is 2*2/(2+3)=0.8 at
    0.8, 2*3/(4+3)=0.857 at 0.6 and 2*3/(5+3)=0.75 at 0.5, so the best threshold is 0.6."""
    annotations, _ = dataset_files
    coco = COCO(annotations)
    truths = [a for a in coco.dataset["annotations"]]
    results = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": score}
        for a, score in zip(truths, (0.9, 0.8, 0.6))
    ]
    results += [
        {"image_id": 3, "category_id": 3, "bbox": [1, 1, 5, 5], "score": 0.7},
        {"image_id": 3, "category_id": 7, "bbox": [20, 20, 5, 5], "score": 0.5},
    ]
    best = best_f1_threshold(coco, results, "bbox")
    assert best["threshold"] == pytest.approx(0.6)
    assert best["f1"] == pytest.approx(6 / 7) and best["precision"] == pytest.approx(0.75) and best["recall"] == 1.0


def test_choose_scale_stores_the_best_val_scale_and_rescales_what_depends_on_it(
    nucleus_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """training.choose_scale tries each candidate on the val split through the pipeline, keeps the best segm AP
    as data.scale_test and rescales the recorded object size (x new/old) and density (x (old/new)^2)."""
    from tests.service_models import tiny_checkpoint
    from training.choose_scale import main as choose_scale

    extra = ("data.resize=scale", "data.scale_test=1.0", "data.intensity=percentile", "model.num_classes=1")
    path = tiny_checkpoint("embedmask", tmp_path / "model.pt", extra=extra, object_size=12.0)
    saved = load_checkpoint(path)
    saved.update(class_names=["nucleus"], category_ids=[1], object_density=100.0)
    save_checkpoint(saved, path)
    choose_scale(
        [
            *("--checkpoint", str(path), "--annotations", str(nucleus_root / "val.json")),
            *("--images", str(nucleus_root / "val"), "--scales", "0.5", "1.0", "--runtime", "onnxruntime"),
            *("--cache-dir", str(tmp_path / "cache")),
        ]
    )
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    best = report["scale_test"]
    assert set(report["segm_AP"]) == {"0.5", "1.0"} and report["segm_AP"][str(best)] == max(report["segm_AP"].values())
    chosen = load_checkpoint(path)
    assert chosen["config"]["data"]["scale_test"] == best
    assert chosen["object_size"] == pytest.approx(12.0 * best) and chosen["object_density"] == pytest.approx(
        100 / best**2
    )
