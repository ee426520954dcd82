"""COCO evaluation (bbox and segm AP) of a checkpoint, through the runtime interface.

    python -m training.evaluate --checkpoint CKPT --annotations JSON --images DIR [--scale S|auto]
        [--output results.json] [--batch-size N] [--device cpu] [--tile-size HxW] [--tile-overlap N]

Images are decoded and sized by the checkpoint's input contract (``model.input_contract``: its intensity
rule, and its size rule times ``--scale``; ``auto`` estimates the scale per image from a first pass), run
through a ``Runtime`` (the eager model here; any runtime with the same ``infer`` contract plugs in via
``make_runtime``) and finished by ``model.finishing.finish_image``, the function the service uses, so
evaluation measures what users get. An image larger than every tile shape at that size (by default the
service's default shape buckets; ``--tile-size`` gives one) is tiled and merged as the service does
(``model.tiling``), so AP is measured on whole images. The COCO results file holds the dataset's category
ids, xywh boxes in original pixels and compressed RLE masks. stdout gets exactly one JSON line with AP,
AP50, AP75, APs, APm, APl (in percent) for bbox and segm; pycocotools' own printout goes to stderr.
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

import numpy as np
import torch
from PIL import Image
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from export.onnx_export import export_onnx
from export.runtimes import OnnxRuntime
from model.checkpoint import load_detector
from model.config import Config
from model.finishing import Instance, finish_outputs
from model.input_contract import InputContract, scale_argument
from model.mask_contract import MaskKind
from model.methods import mask_method_class
from model.runtime import TorchRuntime
from model.runtime_protocol import Runtime
from model.tiling import (
    DEFAULT_TILE_OVERLAP,
    TilePlan,
    check_overlap,
    contract_buckets,
    default_overlap,
    pad_batch,
    plan_tiles,
    segment_tiled,
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
    def from_config(cls, cfg: Config, category_ids: list[int], object_size: float | None = None) -> EvalSpec:
        """The spec of a checkpoint's config: the mask fields its method exports (``graph_fields``)."""
        method = mask_method_class(cfg.model.method)
        fields = method.graph_fields(cfg.model) if method is not None else {}
        return cls(
            category_ids=list(category_ids),
            mask_kind=fields.get("mask_kind"),
            mask_threshold=fields.get("mask_threshold"),
            box_padding=fields.get("box_padding", 0),
            input=InputContract.from_config(cfg, object_size),
        )


def eval_dataset(annotations: str, images: str, spec: EvalSpec, scale: float = 1.0) -> CocoInstanceDataset:
    """The evaluation images at the model's test size times ``scale``, the sizes ``InputContract.resized_shape``
    gives the service (pycocotools' chatter goes to stderr)."""
    contract = spec.input
    with contextlib.redirect_stdout(sys.stderr):
        return CocoInstanceDataset(
            annotations,
            images,
            [contract.min_size * scale],
            contract.max_size * scale,
            0.0,
            train=False,
            resize=contract.resize,
            scales=(contract.scale * scale,) * 2,
            intensity=contract.intensity,
            percentiles=contract.percentiles,
        )


def tile_plans(
    dataset: CocoInstanceDataset, spec: EvalSpec, buckets: list[tuple[int, int]], overlap: int, scale: float = 1.0
) -> dict[int, TilePlan]:
    """The tile plans of the dataset's images larger than every bucket at the model's size, by dataset index."""
    plans = {}
    for index, image_id in enumerate(dataset.image_ids):
        info = dataset.coco.imgs[image_id]
        size = (info["height"], info["width"])
        plan = plan_tiles(size, spec.input.resized_shape(*size, scale), buckets, overlap)
        if plan is not None:
            plans[index] = plan
    return plans


def finishing_options(spec: EvalSpec, masks: bool = True, score_threshold: float = 0.0) -> dict[str, Any]:
    """``finish_image`` keywords for this model (masks off: boxes only, as a ``scale=auto`` first pass; below
    ``score_threshold`` nothing is finished, as in the service)."""
    return {
        "mask_kind": spec.mask_kind or "box28",
        "mask_threshold": spec.mask_threshold,
        "mask_format": "rle" if spec.mask_kind is not None and masks else "none",
        "box_padding": spec.box_padding,
        "score_threshold": score_threshold,
    }


def segment_image(
    runtime: Runtime,
    image: np.ndarray,
    spec: EvalSpec,
    buckets: list[tuple[int, int]],
    overlap: int,
    scale: float = 1.0,
    batch_size: int = 1,
    masks: bool = True,
    score_threshold: float = 0.0,
) -> list[Instance]:
    """One decoded ``[H, W, 3]`` uint8 image at the model's size times ``scale``: whole when it fits a bucket,
    else tiled and merged (``model.tiling``); detections below ``score_threshold`` are dropped unfinished."""
    height, width = image.shape[:2]
    contract, options = spec.input, finishing_options(spec, masks, score_threshold)
    input_size = contract.resized_shape(height, width, scale)
    plan = plan_tiles((height, width), input_size, buckets, overlap)
    if plan is not None:
        return segment_tiled(
            Image.fromarray(image), plan, runtime.infer, tuple(contract.pad_value), batch_size, None, **options
        )
    pixels = contract.resize_image(image, scale)
    padded = tuple(-(-side // contract.size_divisibility) * contract.size_divisibility for side in input_size)
    outputs = runtime.infer(pad_batch([pixels], padded, tuple(contract.pad_value)))
    return finish_outputs(
        {name: value[0] for name, value in outputs.items()},  # masks=False: mask_format "none" never reads them
        input_size=input_size,
        image_size=(height, width),
        **options,
    )


def segment_auto(
    runtime: Runtime,
    image: np.ndarray,
    spec: EvalSpec,
    buckets: list[tuple[int, int]],
    overlap: int,
    batch_size: int = 1,
    score_threshold: float = 0.0,
) -> tuple[list[Instance], float]:
    """``scale=auto``: a boxes-only first pass at the model's own size, then the image at the scale that
    brings its median object to the training objects' median size (``InputContract.estimate_scale``; the
    model's own size when that finds too few objects), keeping detections from ``score_threshold``. Returns
    the instances and the scale used."""
    first = segment_image(runtime, image, spec, buckets, overlap, 1.0, batch_size, masks=False)
    boxes = np.array([i.box for i in first], dtype=np.float32).reshape(-1, 4)
    scale = spec.input.estimate_scale(boxes, np.array([i.score for i in first]), image.shape[:2]) or 1.0
    instances = segment_image(
        runtime, image, spec, buckets, overlap, scale, batch_size, score_threshold=score_threshold
    )
    return instances, scale


def predict(
    runtime: Runtime,
    dataset: CocoInstanceDataset,
    spec: EvalSpec,
    batch_size: int = 1,
    buckets: list[tuple[int, int]] | None = None,
    overlap: int | None = None,
    scale: float | str = 1.0,
) -> list[dict[str, Any]]:
    """COCO result records: image_id, dataset category_id, bbox xywh and score in original pixels and,
    for mask methods, the compressed RLE segmentation.

    Images that fit a shape of `buckets` (default: the service's default buckets for this size rule) run
    whole, `batch_size` at a time; larger ones are cut into tiles overlapping by `overlap` input pixels
    (default: ``model.tiling.default_overlap``), run `batch_size` tiles at a time padded to their bucket, and
    merged (``model.tiling``). `scale` multiplies the model's own size (`dataset` must be built with it, see
    ``eval_dataset``); "auto" picks it per image (``segment_auto``), one image at a time."""
    contract = spec.input
    buckets = buckets or contract_buckets(contract)
    overlap = default_overlap(buckets) if overlap is None else overlap
    check_overlap(buckets, overlap)
    results: list[dict[str, Any]] = []
    if scale == "auto":
        if contract.object_size is None:
            raise ValueError(
                "scale=auto needs a checkpoint that records its training objects' size (trained since the scale rule)"
            )
        for image_id in tqdm(
            dataset.image_ids, desc="evaluate (scale=auto)", unit="image", file=sys.stderr, leave=False
        ):
            instances, _ = segment_auto(
                runtime, decoded(dataset, image_id, contract), spec, buckets, overlap, batch_size
            )
            results += coco_records(image_id, instances, spec)
        return results
    plans = tile_plans(dataset, spec, buckets, overlap, float(scale))
    whole = [index for index in range(len(dataset)) if index not in plans]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, whole) if plans else dataset,
        batch_size=batch_size,
        collate_fn=partial(collate, size_divisibility=contract.size_divisibility, pad_value=tuple(contract.pad_value)),
    )
    options = finishing_options(spec)
    for batch in tqdm(loader, desc="evaluate", unit="batch", file=sys.stderr, leave=False):
        outputs = runtime.infer(batch.images.numpy())
        for i, image_id in enumerate(batch.image_ids):
            instances = finish_outputs(
                {name: value[i] for name, value in outputs.items()},
                input_size=batch.input_sizes[i],
                image_size=batch.original_sizes[i],
                **options,
            )
            results += coco_records(image_id, instances, spec)
    for index, plan in tqdm(plans.items(), desc="evaluate tiled", unit="image", file=sys.stderr, leave=False):
        image_id = dataset.image_ids[index]
        image = decoded(dataset, image_id, contract)
        if image.shape[:2] != plan.image_size:
            raise ValueError(
                f"image {image_id}: decoded size {image.shape[:2]} differs from annotated {plan.image_size}"
            )
        results += coco_records(
            image_id,
            segment_tiled(
                Image.fromarray(image), plan, runtime.infer, tuple(contract.pad_value), batch_size, None, **options
            ),
            spec,
        )
    return results


def decoded(dataset: CocoInstanceDataset, image_id: int, contract: InputContract) -> np.ndarray:
    """An evaluation image decoded by the model's intensity rule: ``[H, W, 3]`` uint8."""
    return contract.decode((Path(dataset.images) / dataset.coco.imgs[image_id]["file_name"]).read_bytes())


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
    runtime: Runtime,
    dataset: CocoInstanceDataset,
    spec: EvalSpec,
    batch_size: int = 1,
    results_path: str | Path | None = None,
    buckets: list[tuple[int, int]] | None = None,
    overlap: int | None = None,
    scale: float | str = 1.0,
) -> dict[str, dict[str, float | None]]:
    """bbox (and, for mask methods, segm) metrics of ``runtime`` on ``dataset`` (see ``eval_dataset``);
    the COCO results go to ``results_path`` when given; `buckets`, `overlap` and `scale` as for ``predict``."""
    unknown = sorted(set(spec.category_ids) - set(dataset.category_ids))
    if unknown:
        raise ValueError(
            f"the model's category ids {unknown} are not in the evaluation annotations {dataset.category_ids}"
        )
    results = predict(runtime, dataset, spec, batch_size, buckets, overlap, scale)
    if results_path is not None:
        Path(results_path).write_text(json.dumps(results))
    iou_types = ["bbox"] if spec.mask_kind is None else ["bbox", "segm"]
    return {iou_type: coco_metrics(dataset, results, iou_type) for iou_type in iou_types}


def make_runtime(
    name: str, checkpoint: str, device: str, precision: str = "auto"
) -> tuple[Runtime, EvalSpec, dict[str, Any]]:
    """The runtime called ``name`` for ``checkpoint``, its EvalSpec, and the checkpoint's metadata
    (``precision``: OpenVINO's, auto = bf16 where the CPU has it)."""
    model, cfg, metadata = load_detector(checkpoint, device)
    spec = EvalSpec.from_config(cfg, metadata["category_ids"], metadata.get("object_size"))
    if name == "torch":
        return TorchRuntime(model, device), spec, metadata
    if name in ("onnxruntime", "openvino"):
        # The fused graph of this very checkpoint, exported next to it, so both runtimes see the same weights.
        graph = Path(f"{checkpoint}.onnx")
        if not graph.exists() or graph.stat().st_mtime < Path(checkpoint).stat().st_mtime:
            export_onnx(model, cfg, metadata, graph)
        if name == "openvino":
            from export.openvino_runtime import OpenVinoRuntime

            return OpenVinoRuntime(graph, precision=precision), spec, metadata
        return OnnxRuntime(str(graph)), spec, metadata
    raise ValueError(f"unknown runtime {name!r}")


def tile_size(text: str) -> tuple[int, int]:
    """ "HxW" -> (H, W): a tile shape on the command line."""
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
    parser.add_argument(
        "--runtime",
        choices=["torch", "onnxruntime", "openvino"],
        default="torch",
        help="eager PyTorch, or the fused ONNX graph (exported next to the checkpoint) in onnxruntime or OpenVINO",
    )
    parser.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="OpenVINO's inference precision (auto: bf16 where the CPU has it)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--scale",
        type=scale_argument,
        default=1.0,
        metavar="S|auto",
        help="a factor on the model's own input size (another magnification), or 'auto' to estimate it "
        "per image from a first pass (default 1: the recipe's size)",
    )
    parser.add_argument(
        "--tile-size",
        type=tile_size,
        default=None,
        metavar="HxW",
        help="input shape of the tiles of images larger than it (default: the service's default shape "
        "buckets for the checkpoint's test size)",
    )
    parser.add_argument(
        "--tile-overlap",
        type=int,
        default=None,
        metavar="N",
        help=f"input pixels neighbouring tiles share (default {DEFAULT_TILE_OVERLAP}, the service's default, "
        "or half the shortest tile side when that is less)",
    )
    args = parser.parse_args(argv)

    runtime, spec, info = make_runtime(args.runtime, args.checkpoint, args.device, args.precision)
    contract = spec.input
    if args.scale == "auto" and contract.object_size is None:
        parser.error(
            "--scale auto needs a checkpoint that records its training objects' size (trained since the scale rule)"
        )
    buckets = [args.tile_size] if args.tile_size else contract_buckets(contract)
    if any(side % contract.size_divisibility for side in buckets[0]):
        parser.error(
            f"--tile-size sides must be multiples of the model's size divisibility {contract.size_divisibility}"
        )
    overlap = default_overlap(buckets) if args.tile_overlap is None else args.tile_overlap
    try:
        check_overlap(buckets, overlap)
    except ValueError as error:
        parser.error(str(error))
    dataset = eval_dataset(args.annotations, args.images, spec, 1.0 if args.scale == "auto" else args.scale)
    output = args.output or f"{args.checkpoint}.results.json"
    start = time.perf_counter()
    metrics = evaluate(runtime, dataset, spec, args.batch_size, output, buckets, overlap, args.scale)
    summary = {
        **metrics,
        "images": len(dataset),
        "seconds": round(time.perf_counter() - start, 3),
        "checkpoint": args.checkpoint,
        "iteration": info["iteration"],
        "results": output,
        "tile_buckets": [list(bucket) for bucket in buckets],
        "tile_overlap": overlap,
        "scale": args.scale,
        "runtime": args.runtime,
        **({"precision": runtime.precision} if args.runtime == "openvino" else {}),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
