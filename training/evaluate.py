"""COCO evaluation (bbox and segm AP) of a checkpoint, through the runtime interface.

    python -m training.evaluate --checkpoint CKPT --annotations JSON --images DIR
        [--output results.json] [--batch-size N] [--device cpu] [--tile-size HxW] [--tile-overlap N]

Images are resized to the checkpoint's ``data.min_size_test``/``max_size_test``, run through a
``Runtime`` (the eager model here; any runtime with the same ``infer`` contract plugs in via
``make_runtime``) and finished by ``model.finishing.finish_image``, the function the service uses, so
evaluation measures what users get. An image larger than every tile shape at that size (by default the
service's default shape buckets; ``--tile-size`` gives one) is tiled and merged as the service does
(``model.tiling``), so AP is measured on whole images. The COCO results file holds the dataset's category
ids, xywh boxes in original pixels and compressed RLE masks. stdout gets exactly one JSON line with AP, AP50, AP75, APs,
APm, APl (in percent) for bbox and segm; pycocotools' own printout goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from export.onnx_export import export_onnx
from export.runtimes import OnnxRuntime
from model.checkpoint import load_detector
from model.config import Config
from model.finishing import Instance, finish_image
from model.input_contract import InputContract, load_rgb
from model.mask_contract import MaskKind
from model.methods import mask_method_class
from model.runtime import TorchRuntime
from model.runtime_protocol import Runtime
from model.tiling import (
    DEFAULT_TILE_OVERLAP,
    TilePlan,
    check_overlap,
    default_overlap,
    plan_tiles,
    segment_tiled,
    shape_buckets,
)
from training.data import CocoInstanceDataset, collate

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@dataclass(frozen=True)
class EvalSpec:
    """What evaluation needs besides a runtime: the input contract, the mask finishing rule and the dataset ids.

    Built from a checkpoint's config here; a runtime that carries export metadata instead fills the same
    fields from that record.
    """

    category_ids: list[int]  # dataset id of each contiguous class index
    mask_kind: MaskKind | None  # None: boxes only (plain FCOS)
    mask_threshold: float | None
    box_padding: int
    input: InputContract

    @classmethod
    def from_config(cls, cfg: Config, category_ids: list[int]) -> EvalSpec:
        """The spec of a checkpoint's config: the mask fields its method exports (``graph_fields``)."""
        method = mask_method_class(cfg.model.method)
        fields = method.graph_fields(cfg.model) if method is not None else {}
        return cls(
            category_ids=list(category_ids),
            mask_kind=fields.get("mask_kind"),
            mask_threshold=fields.get("mask_threshold"),
            box_padding=fields.get("box_padding", 0),
            input=InputContract.from_config(cfg),
        )


def eval_dataset(annotations: str, images: str, spec: EvalSpec) -> CocoInstanceDataset:
    """The evaluation images at the model's test size (pycocotools' loading chatter goes to stderr)."""
    with contextlib.redirect_stdout(sys.stderr):
        return CocoInstanceDataset(annotations, images, [spec.input.min_size], spec.input.max_size, 0.0, train=False)


def tile_plans(
    dataset: CocoInstanceDataset, spec: EvalSpec, buckets: list[tuple[int, int]], overlap: int
) -> dict[int, TilePlan]:
    """The tile plans of the dataset's images larger than every bucket at the model's size, by dataset index."""
    plans = {}
    for index, image_id in enumerate(dataset.image_ids):
        info = dataset.coco.imgs[image_id]
        size = (info["height"], info["width"])
        plan = plan_tiles(size, spec.input.resized_shape(*size), buckets, overlap)
        if plan is not None:
            plans[index] = plan
    return plans


def predict(
    runtime: Runtime, dataset: CocoInstanceDataset, spec: EvalSpec, batch_size: int = 1,
    buckets: list[tuple[int, int]] | None = None, overlap: int | None = None,
) -> list[dict[str, Any]]:
    """COCO result records: image_id, dataset category_id, bbox xywh and score in original pixels and,
    for mask methods, the compressed RLE segmentation.

    Images that fit a shape of `buckets` (default: the service's default buckets for this size rule) run
    whole, `batch_size` at a time; larger ones are cut into tiles overlapping by `overlap` input pixels
    (default: ``model.tiling.default_overlap``), run `batch_size` tiles at a time padded to their bucket, and
    merged (``model.tiling``)."""
    buckets = buckets or shape_buckets(spec.input.min_size, spec.input.max_size, spec.input.size_divisibility)
    overlap = default_overlap(buckets) if overlap is None else overlap
    check_overlap(buckets, overlap)
    plans = tile_plans(dataset, spec, buckets, overlap)
    whole = [index for index in range(len(dataset)) if index not in plans]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, whole) if plans else dataset,
        batch_size=batch_size,
        collate_fn=partial(collate, size_divisibility=spec.input.size_divisibility, pad_value=tuple(spec.input.pad_value)),
    )
    options: dict[str, Any] = {
        "mask_kind": spec.mask_kind or "box28",
        "mask_threshold": spec.mask_threshold,
        "mask_format": "rle" if spec.mask_kind is not None else "none",
        "box_padding": spec.box_padding,
    }
    results: list[dict[str, Any]] = []
    for batch in tqdm(loader, desc="evaluate", unit="batch", file=sys.stderr, leave=False):
        outputs = runtime.infer(batch.images.numpy())
        for i, image_id in enumerate(batch.image_ids):
            instances = finish_image(
                outputs["num_dets"][i], outputs["boxes"][i], outputs["scores"][i], outputs["classes"][i],
                outputs["masks"][i] if spec.mask_kind is not None else None,
                input_size=batch.input_sizes[i],
                image_size=batch.original_sizes[i],
                **options,
            )
            results += coco_records(image_id, instances, spec)
    for index, plan in tqdm(plans.items(), desc="evaluate tiled", unit="image", file=sys.stderr, leave=False):
        image_id = dataset.image_ids[index]
        image = load_rgb(str(Path(dataset.images) / dataset.coco.imgs[image_id]["file_name"]))
        if (image.size[1], image.size[0]) != plan.image_size:
            raise ValueError(f"image {image_id}: decoded size {image.size[::-1]} differs from {plan.image_size}")
        instances = segment_tiled(image, plan, runtime.infer, spec.input.pad_value, batch_size, None, **options)
        results += coco_records(image_id, instances, spec)
    return results


def coco_records(image_id: int, instances: list[Instance], spec: EvalSpec) -> list[dict[str, Any]]:
    """One image's instances as COCO result records."""
    records = []
    for instance in instances:
        x0, y0, x1, y1 = instance.box
        record = {
            "image_id": image_id,
            "category_id": spec.category_ids[instance.class_index],
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "score": instance.score,
        }
        if instance.rle is not None:
            record["segmentation"] = instance.rle
        records.append(record)
    return records


def coco_metrics(dataset: CocoInstanceDataset, results: list[dict[str, Any]], iou_type: str) -> dict[str, float | None]:
    """COCOeval summary in percent; None where COCO defines no value (no ground truth in that size range).

    The segm evaluation drops the result boxes so that pycocotools takes each detection's area from its
    mask, as detectron2 does; the bbox evaluation drops the masks.
    """
    if not results:  # pycocotools cannot load an empty result list; nothing detected scores 0
        return {name: 0.0 for name in METRIC_NAMES}
    drop = "bbox" if iou_type == "segm" else "segmentation"
    records = [{k: v for k, v in r.items() if k != drop} for r in results]
    with contextlib.redirect_stdout(sys.stderr):
        detections = dataset.coco.loadRes(records)
        coco_eval = COCOeval(dataset.coco, detections, iou_type)
        coco_eval.params.imgIds = dataset.image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return {name: float(v) * 100.0 if v >= 0 else None for name, v in zip(METRIC_NAMES, coco_eval.stats[:6])}


def evaluate(
    runtime: Runtime, dataset: CocoInstanceDataset, spec: EvalSpec, batch_size: int = 1,
    results_path: str | Path | None = None, buckets: list[tuple[int, int]] | None = None, overlap: int | None = None,
) -> dict[str, dict[str, float | None]]:
    """bbox (and, for mask methods, segm) metrics of ``runtime`` on ``dataset`` (see ``eval_dataset``);
    the COCO results go to ``results_path`` when given; `buckets` and `overlap` as for ``predict``."""
    unknown = sorted(set(spec.category_ids) - set(dataset.category_ids))
    if unknown:
        raise ValueError(f"the model's category ids {unknown} are not in the evaluation annotations {dataset.category_ids}")
    results = predict(runtime, dataset, spec, batch_size, buckets, overlap)
    if results_path is not None:
        Path(results_path).write_text(json.dumps(results))
    iou_types = ["bbox"] if spec.mask_kind is None else ["bbox", "segm"]
    return {iou_type: coco_metrics(dataset, results, iou_type) for iou_type in iou_types}


def make_runtime(name: str, checkpoint: str, device: str) -> tuple[Runtime, EvalSpec, dict[str, Any]]:
    """The runtime called ``name`` for ``checkpoint``, its EvalSpec, and the checkpoint's metadata."""
    model, cfg, metadata = load_detector(checkpoint, device)
    spec = EvalSpec.from_config(cfg, metadata["category_ids"])
    if name == "torch":
        return TorchRuntime(model, device), spec, metadata
    if name == "onnxruntime":
        # The fused graph of this very checkpoint, exported next to it, so both runtimes see the same weights.
        graph = Path(f"{checkpoint}.onnx")
        if not graph.exists() or graph.stat().st_mtime < Path(checkpoint).stat().st_mtime:
            export_onnx(model, cfg, metadata, graph)
        return OnnxRuntime(str(graph)), spec, metadata
    raise ValueError(f"unknown runtime {name!r}")


def tile_size(text: str) -> tuple[int, int]:
    """"HxW" -> (H, W): a tile shape on the command line."""
    height, _, width = text.lower().partition("x")
    if not (height.isdigit() and width.isdigit() and int(height) > 0 and int(width) > 0):
        raise argparse.ArgumentTypeError(f"tile size {text!r} is not of the form HxW (e.g. 512x512)")
    return int(height), int(width)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--annotations", required=True, help="COCO-format instances json")
    parser.add_argument("--images", required=True, help="folder the json's file_names are relative to")
    parser.add_argument("--output", default=None, help="COCO results file (default: <checkpoint>.results.json)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--runtime", choices=["torch", "onnxruntime"], default="torch",
                        help="eager PyTorch, or the fused ONNX graph (exported next to the checkpoint) in onnxruntime")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tile-size", type=tile_size, default=None, metavar="HxW",
                        help="input shape of the tiles of images larger than it (default: the service's default shape "
                        "buckets for the checkpoint's test size)")
    parser.add_argument("--tile-overlap", type=int, default=None, metavar="N",
                        help=f"input pixels neighbouring tiles share (default {DEFAULT_TILE_OVERLAP}, the service's "
                        "default, or half the shortest tile side when that is less)")
    args = parser.parse_args(argv)

    runtime, spec, info = make_runtime(args.runtime, args.checkpoint, args.device)
    contract = spec.input
    divisibility = contract.size_divisibility
    buckets = [args.tile_size] if args.tile_size else shape_buckets(contract.min_size, contract.max_size, divisibility)
    if any(side % divisibility for side in buckets[0]):
        parser.error(f"--tile-size sides must be multiples of the model's size divisibility {divisibility}")
    overlap = default_overlap(buckets) if args.tile_overlap is None else args.tile_overlap
    try:
        check_overlap(buckets, overlap)
    except ValueError as error:
        parser.error(str(error))
    dataset = eval_dataset(args.annotations, args.images, spec)
    output = args.output or f"{args.checkpoint}.results.json"
    start = time.perf_counter()
    metrics = evaluate(runtime, dataset, spec, args.batch_size, output, buckets, overlap)
    summary = {
        **metrics,
        "images": len(dataset),
        "seconds": round(time.perf_counter() - start, 3),
        "checkpoint": args.checkpoint,
        "iteration": info["iteration"],
        "results": output,
        "tile_buckets": [list(bucket) for bucket in buckets],
        "tile_overlap": overlap,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
