"""Parity of two runtimes' outputs on the same batch: same detections, and the same masks after finishing.

Detections are matched one to one within each image (same class, boxes and scores within tolerance),
preferring the same slot, so that two candidates whose scores tie exactly may trade places. Masks are
compared as users get them: both sides' matched detections go through ``model.finishing.finish_image``
and the two COCO RLEs of each pair must overlap with IoU >= ``min_mask_iou``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from export.metadata import GraphMetadata
from export.runtimes import OnnxRuntime
from model.detector import OneStageDetector
from model.finishing import finish_image
from model.runtime import TorchRuntime

Outputs = dict[str, np.ndarray]


def _close(a: np.ndarray, b: np.ndarray, rtol: float, atol: float) -> np.ndarray:
    return np.all(np.abs(a - b) <= atol + rtol * np.abs(a), axis=-1)


def match_image(
    reference: Outputs, candidate: Outputs, image: int, rtol: float, atol: float
) -> tuple[list[tuple[int, int]], list[str]]:
    """Pairs (reference slot, candidate slot) of one image's detections, and what failed to match."""
    count = int(reference["num_dets"][image])
    other = int(candidate["num_dets"][image])
    if count != other:
        return [], [f"image {image}: {count} detections vs {other}"]
    boxes, scores, classes = (reference[k][image, :count] for k in ("boxes", "scores", "classes"))
    c_boxes, c_scores, c_classes = (candidate[k][image, :count] for k in ("boxes", "scores", "classes"))
    fits = (
        (classes[:, None] == c_classes[None])
        & _close(boxes[:, None], c_boxes[None], rtol, atol)
        & _close(scores[:, None, None], c_scores[None, :, None], rtol, atol)
    )
    pairs, problems, taken = [], [], np.zeros(count, dtype=bool)
    for slot in range(count):
        options = np.flatnonzero(fits[slot] & ~taken)
        if len(options) == 0:
            problems.append(
                f"image {image} slot {slot}: no match for class {classes[slot]} score {scores[slot]:.6f} "
                f"box {boxes[slot].tolist()}"
            )
            continue
        chosen = slot if slot in options else int(options[0])
        taken[chosen] = True
        pairs.append((slot, chosen))
    return pairs, problems


def finished_masks(
    outputs: Outputs,
    image: int,
    slots: list[int],
    metadata: GraphMetadata,
    input_size: tuple[int, int],
    image_size: tuple[int, int],
) -> dict[int, dict]:
    """The finished COCO RLE of each given slot of one image (slots whose clipped box is empty are absent).

    One ``finish_image`` call finishes them all; each slot goes in with a distinct, decreasing stand-in
    score, which comes back on its instance and names the slot.
    """
    if metadata.mask_kind is None:
        raise ValueError("a boxes-only graph has no masks to finish")
    tags = 1.0 - np.arange(len(slots)) / (len(slots) + 1.0)
    instances = finish_image(
        len(slots),
        outputs["boxes"][image, slots],
        tags,
        outputs["classes"][image, slots],
        outputs["masks"][image, slots],
        mask_kind=metadata.mask_kind,
        input_size=input_size,
        image_size=image_size,
        mask_threshold=metadata.mask_threshold,
        box_padding=metadata.box_padding or 0,
    )
    return {
        slots[int(np.argmin(np.abs(tags - i.score)))]: {**rle, "counts": rle["counts"].encode()}
        for i in instances
        if (rle := i.rle) is not None  # always, with mask_format "rle"
    }


def mask_ious(
    reference: Outputs,
    candidate: Outputs,
    image: int,
    pairs: list[tuple[int, int]],
    metadata: GraphMetadata,
    input_size: tuple[int, int],
    image_size: tuple[int, int],
) -> list[float]:
    """IoU of the finished masks of each matched pair; 1.0 where both are empty or both boxes were dropped."""
    ours = finished_masks(reference, image, [a for a, _ in pairs], metadata, input_size, image_size)
    theirs = finished_masks(candidate, image, [b for _, b in pairs], metadata, input_size, image_size)
    ious = []
    for a, b in pairs:
        if a not in ours or b not in theirs:
            ious.append(1.0 if a not in ours and b not in theirs else 0.0)
        elif mask_utils.area([ours[a], theirs[b]]).sum() == 0:
            ious.append(1.0)
        else:
            ious.append(float(mask_utils.iou([ours[a]], [theirs[b]], [0])[0, 0]))
    return ious


def compare_outputs(
    reference: Outputs,
    candidate: Outputs,
    metadata: GraphMetadata,
    *,
    input_size: tuple[int, int],
    image_size: tuple[int, int],
    rtol: float = 1e-3,
    atol: float = 1e-3,
    min_mask_iou: float = 0.99,
) -> list[str]:
    """Every difference beyond tolerance, as readable lines (empty: the outputs agree).

    Every image of the batch is taken to fill ``input_size`` of the padded input and to come from an
    original of ``image_size``.
    """
    problems = []
    for image in range(len(reference["num_dets"])):
        pairs, unmatched = match_image(reference, candidate, image, rtol, atol)
        problems += unmatched
        if metadata.mask_kind is None:
            continue
        if not pairs:
            continue
        for (slot, _), iou in zip(
            pairs, mask_ious(reference, candidate, image, pairs, metadata, input_size, image_size)
        ):
            if iou < min_mask_iou:
                problems.append(f"image {image} slot {slot}: mask IoU {iou:.4f} < {min_mask_iou}")
    return problems


def verify_onnx(
    model: OneStageDetector,
    path: str | Path,
    metadata: GraphMetadata,
    shape: tuple[int, int, int, int] = (2, 3, 256, 320),
    seed: int = 0,
) -> tuple[int, list[str]]:
    """Run eager PyTorch and the exported graph (onnxruntime, CPU) on one random batch and compare them.

    Returns the number of reference detections and the problems found (a quick check for the export
    command; the test suite covers structured inputs, several sizes and empty images).
    """
    images = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    reference = TorchRuntime(model).infer(images)
    candidate = OnnxRuntime(path, providers=["CPUExecutionProvider"]).infer(images)
    size = (shape[2], shape[3])
    return int(reference["num_dets"].sum()), compare_outputs(
        reference, candidate, metadata, input_size=size, image_size=size
    )
