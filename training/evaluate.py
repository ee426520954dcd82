"""COCO evaluation (bbox and segm AP) of a model through ``inference.Predictor``, the service's own pipeline.

    python -m training.evaluate --checkpoint CKPT --annotations JSON --images DIR [--scale S|auto]
        [--output results.json] [--runtime auto|onnxruntime|openvino|torch|tensorrt] [--precision P]
        [--batch-size N] [--tile-size HxW] [--tile-overlap N]

Every image is read from its file and segmented as the service segments it (decode by the model's input
contract, resize into its shape bucket or cut into tiles, runtime, finishing, merge: ``inference.pipeline``),
so AP measures what users get. Evaluation keeps every detection the graph returns (score threshold 0), as
COCO AP integrates over scores; answers elsewhere default to the model's recommended threshold, which
``best_f1_threshold`` chooses from the same matching. The COCO results file holds the dataset's category
ids, xywh boxes in original pixels and compressed RLE masks. stdout gets exactly one JSON line with AP,
AP50, AP75, APs, APm, APl (in percent) for bbox and segm, and the best-F1 operating point; pycocotools'
own printout goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from inference.cli import CACHE_DIR_HELP, add_runtime_arguments, runtime_options
from inference.pipeline import DEFAULT_SCALE_HELP, Scale, SegmentOptions
from inference.predictor import Predictor
from inference.sizing import Bucket
from inference.tiling import DEFAULT_TILE_OVERLAP
from model.finishing import Instance
from model.input_contract import scale_argument

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# Mask (or box) IoU at which a detection matches an object for the F1 operating point.
F1_IOU = 0.5


def load_coco(annotations: str | Path) -> COCO:
    """COCO annotations, pycocotools' loading chatter on stderr."""
    with contextlib.redirect_stdout(sys.stderr):
        return COCO(str(annotations))


def evaluation_options(scale: Scale | None = None) -> SegmentOptions:
    """What evaluation asks of each image: every detection (AP integrates over scores), RLE masks, at ``scale``
    (None: the model's default, what a caller who gives none gets)."""
    return SegmentOptions(score_threshold=0.0, max_detections=None, mask_format="rle", scale=scale)


def coco_records(image_id: int, instances: list[Instance], category_ids: list[int]) -> list[dict[str, Any]]:
    """One image's instances as COCO result records."""
    records = []
    for instance in instances:
        x0, y0, x1, y1 = instance.box
        record = {
            "image_id": image_id,
            "category_id": category_ids[instance.class_index],
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "score": instance.score,
        }
        if instance.rle is not None:
            record["segmentation"] = instance.rle
        records.append(record)
    return records


def predict(predictor: Predictor, coco: COCO, images: str | Path, scale: Scale | None = None) -> list[dict[str, Any]]:
    """COCO result records of every image of ``coco`` (read from ``images``) through ``predictor``: image_id,
    dataset category_id, bbox xywh and score in original pixels, and the compressed RLE segmentation."""
    options = evaluation_options(scale)
    category_ids = predictor.metadata.category_ids
    results: list[dict[str, Any]] = []
    for image_id in tqdm(sorted(coco.getImgIds()), desc="evaluate", unit="image", file=sys.stderr, leave=False):
        info = coco.imgs[image_id]
        segmentation = predictor((Path(images) / info["file_name"]).read_bytes(), options)
        if segmentation.image_size != (info["height"], info["width"]):
            raise ValueError(
                f"image {image_id}: decoded size {segmentation.image_size} differs from annotated "
                f"{(info['height'], info['width'])}"
            )
        results += coco_records(image_id, segmentation.instances, category_ids)
    return results


def _coco_eval(coco: COCO, results: list[dict[str, Any]], iou_type: str) -> COCOeval:
    """A COCOeval of ``results`` on every image of ``coco``. The segm evaluation drops the result boxes so that
    pycocotools takes each detection's area from its mask, as detectron2 does; the bbox evaluation drops the
    masks."""
    drop = "bbox" if iou_type == "segm" else "segmentation"
    records = [{k: v for k, v in r.items() if k != drop} for r in results]
    with contextlib.redirect_stdout(sys.stderr):
        coco_eval = COCOeval(coco, coco.loadRes(records), iou_type)
    coco_eval.params.imgIds = sorted(coco.getImgIds())
    return coco_eval


def coco_metrics(coco: COCO, results: list[dict[str, Any]], iou_type: str) -> dict[str, float | None]:
    """COCOeval summary in percent; None where COCO defines no value (no ground truth in that size range)."""
    if not results:  # pycocotools cannot load an empty result list; nothing detected scores 0
        return {name: 0.0 for name in METRIC_NAMES}
    coco_eval = _coco_eval(coco, results, iou_type)
    with contextlib.redirect_stdout(sys.stderr):
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return {name: float(v) * 100.0 if v >= 0 else None for name, v in zip(METRIC_NAMES, coco_eval.stats[:6])}


def best_f1_threshold(coco: COCO, results: list[dict[str, Any]], iou_type: str) -> dict[str, float]:
    """The score threshold with the best F1 of detections against objects (matched one to one at IoU >=
    ``F1_IOU``, COCO's greedy matching by score, crowd regions ignored): ``threshold`` (keep scores >= it),
    ``f1``, ``precision`` and ``recall`` there. With no detections: threshold 1, F1 0."""
    if not results:
        return {"threshold": 1.0, "f1": 0.0, "precision": 0.0, "recall": 0.0}
    coco_eval = _coco_eval(coco, results, iou_type)
    params = coco_eval.params
    params.iouThrs = np.array([F1_IOU])
    params.areaRng, params.areaRngLbl = [params.areaRng[0]], ["all"]
    params.maxDets = [max(len(results), 1)]
    with contextlib.redirect_stdout(sys.stderr):
        coco_eval.evaluate()
    scores, matched, objects = [], [], 0
    for image in coco_eval.evalImgs:
        if image is None:
            continue
        objects += int(np.sum(~np.asarray(image["gtIgnore"], dtype=bool)))
        keep = ~np.asarray(image["dtIgnore"][0], dtype=bool)
        scores.extend(np.asarray(image["dtScores"])[keep].tolist())
        matched.extend((np.asarray(image["dtMatches"][0])[keep] > 0).tolist())
    order = np.argsort(-np.asarray(scores), kind="stable")
    sorted_scores = np.asarray(scores)[order]
    true_positives = np.cumsum(np.asarray(matched, dtype=np.float64)[order])
    kept = np.arange(1, len(order) + 1)
    # Only the last detection of a run of equal scores is a threshold anyone can choose.
    last = np.append(sorted_scores[1:] != sorted_scores[:-1], True)
    f1 = np.where(last, 2 * true_positives / (kept + objects), -1.0)
    best = int(np.argmax(f1))
    return {
        "threshold": float(sorted_scores[best]),
        "f1": float(f1[best]),
        "precision": float(true_positives[best] / kept[best]),
        "recall": float(true_positives[best] / max(objects, 1)),
    }


def evaluate(
    predictor: Predictor,
    coco: COCO,
    images: str | Path,
    scale: Scale | None = None,
    results_path: str | Path | None = None,
) -> dict[str, Any]:
    """bbox and (for mask models) segm metrics of ``predictor`` on the dataset ``coco`` (images under ``images``)
    at ``scale``, and ``f1``: the best-F1 operating point of the masks, or boxes (``best_f1_threshold``). The
    COCO results go to ``results_path`` when given."""
    unknown = sorted(set(predictor.metadata.category_ids) - set(coco.getCatIds()))
    if unknown:
        raise ValueError(f"the model's category ids {unknown} are not in the evaluation annotations")
    results = predict(predictor, coco, images, scale)
    if results_path is not None:
        Path(results_path).write_text(json.dumps(results))
    iou_types = ["bbox"] if predictor.metadata.mask_kind is None else ["bbox", "segm"]
    metrics: dict[str, Any] = {iou_type: coco_metrics(coco, results, iou_type) for iou_type in iou_types}
    metrics["f1"] = best_f1_threshold(coco, results, iou_types[-1])
    return metrics


def tile_size(text: str) -> Bucket:
    """ "HxW" -> (H, W): a tile shape on the command line."""
    height, _, width = text.lower().partition("x")
    if not (height.isdigit() and width.isdigit() and int(height) > 0 and int(width) > 0):
        raise argparse.ArgumentTypeError(f"tile size {text!r} is not of the form HxW (e.g. 512x512)")
    return int(height), int(width)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m training.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="a training checkpoint (.pt), .onnx graph or engine")
    parser.add_argument("--annotations", required=True, help="COCO-format instances json")
    parser.add_argument("--images", required=True, help="folder the json's file_names are relative to")
    parser.add_argument("--output", default=None, help="COCO results file (default: <checkpoint>.results.json)")
    parser.add_argument("--batch-size", type=int, default=1, help="tiles per runtime call (default 1)")
    parser.add_argument("--cache-dir", type=Path, default=None, help=CACHE_DIR_HELP)
    add_runtime_arguments(parser)
    parser.add_argument(
        "--scale",
        type=scale_argument,
        default=None,
        metavar="S|auto",
        help="a factor on the model's own input size (another magnification), or 'auto' to estimate it "
        f"per image from a first pass (default: the service's, {DEFAULT_SCALE_HELP})",
    )
    parser.add_argument(
        "--tile-size",
        type=tile_size,
        default=None,
        metavar="HxW",
        help="one shape bucket instead of the model's default ones (the service's): images it cannot hold are tiled",
    )
    parser.add_argument(
        "--tile-overlap",
        type=int,
        default=None,
        metavar="N",
        help=f"input pixels neighbouring tiles share (default {DEFAULT_TILE_OVERLAP}, the service's default, "
        "or half the shortest bucket side when that is less)",
    )
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    options = runtime_options(args)
    buckets = [args.tile_size] if args.tile_size else None
    try:
        predictor = Predictor.open(
            args.checkpoint,
            options,
            cache_dir=args.cache_dir,
            buckets=buckets,
            tile_overlap=args.tile_overlap,
            batch_size=args.batch_size,
        )
        predictor.pipeline.check(evaluation_options(args.scale))
    except ValueError as error:  # bad buckets or overlap, or scale=auto on a model without an object size
        parser.error(str(error))
    coco = load_coco(args.annotations)
    output = args.output or f"{args.checkpoint}.results.json"
    start = time.perf_counter()
    metrics = evaluate(predictor, coco, args.images, args.scale, output)
    opened = predictor.opened
    summary = {
        **metrics,
        "images": len(coco.getImgIds()),
        "seconds": round(time.perf_counter() - start, 3),
        "checkpoint": args.checkpoint,
        "results": output,
        "buckets": [list(bucket) for bucket in predictor.pipeline.buckets],
        "tile_overlap": predictor.pipeline.tile_overlap,
        "scale": args.scale,
        "score_threshold": 0.0,  # every detection, for AP
        **({"runtime": opened.engine, "precision": opened.precision} if opened is not None else {}),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
