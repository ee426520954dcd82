"""Batched FCOS detection selection (docs/methods.md, FCOS: inference), written to trace into one ONNX graph.

Every step is a dense tensor op over the whole batch: per-level top-k, one class-aware NMS over all
images (image index folded into the NMS class index), and a scatter into outputs padded to
``max_detections`` with a per-image count. The eager model and the exported graph run this same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torchvision.ops import nms

from model.config import HeadConfig
from model.fcos_outputs import level_points
from model.layers import flatten_levels

ScoreMode = Literal["sqrt", "product"]


@dataclass
class LevelPredictions:
    """One FPN level's head outputs for a batch (maps [B, ch, H, W])."""

    logits: torch.Tensor
    regression: torch.Tensor  # ltrb in units of the stride
    centerness: torch.Tensor  # logits
    extras: torch.Tensor | None  # per-location method outputs carried with each detection
    stride: int


@dataclass
class Detections:
    """The graph contract: detections padded to ``max_detections``; only the first ``num_dets`` are real."""

    num_dets: torch.Tensor  # [B] int64
    boxes: torch.Tensor  # [B, K, 4] xyxy in input pixels
    scores: torch.Tensor  # [B, K]
    classes: torch.Tensor  # [B, K] int64
    extras: torch.Tensor | None  # [B, K, E] method outputs gathered with each detection
    masks: torch.Tensor | None = None  # MEInst [B, K, 28, 28] probabilities; EmbedMask [B, K, H/4, W/4] log-probs


def detection_extras(detections: Detections) -> torch.Tensor:
    """The method outputs gathered with each detection [B, K, E], which a mask method's detections carry."""
    if detections.extras is None:
        raise ValueError("these detections carry no mask-method outputs (extras)")
    return detections.extras


def _level_candidates(
    level: LevelPredictions, cfg: HeadConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Top ``pre_nms_topk`` (by cls*ctr) of the locations whose class score passes the threshold.

    Returns ranking scores [B, k] (-1 marks a filler slot), boxes [B, k, 4], classes [B, k], extras [B, k, E].
    """
    logits = flatten_levels([level.logits])  # [B, HW, C]
    batch, _, num_classes = logits.shape
    cls = logits.sigmoid()
    ctr = flatten_levels([level.centerness]).sigmoid()  # [B, HW, 1]
    ranking = torch.where(cls > cfg.score_threshold, cls * ctr, torch.full_like(cls, -1.0)).reshape(batch, -1)
    # Filler entries guarantee k candidates even on levels with fewer than k (location, class) pairs.
    k = cfg.pre_nms_topk
    ranking = torch.cat([ranking, ranking.new_full((batch, k), -1.0)], dim=1)
    top_scores, top_index = ranking.topk(k, dim=1)
    num_entries = logits.shape[1] * num_classes
    top_index = torch.where(top_index < num_entries, top_index, torch.zeros_like(top_index))
    location = torch.div(top_index, num_classes, rounding_mode="floor")
    classes = top_index - location * num_classes

    points = level_points(level.logits.shape[2], level.logits.shape[3], level.stride, logits.device)
    xy = points[location]  # [B, k, 2]
    ltrb = torch.gather(flatten_levels([level.regression]), 1, location[..., None].expand(-1, -1, 4)) * level.stride
    boxes = torch.cat([xy - ltrb[..., :2], xy + ltrb[..., 2:]], dim=2)
    extras = None
    if level.extras is not None:
        flat = flatten_levels([level.extras])
        extras = torch.gather(flat, 1, location[..., None].expand(-1, -1, flat.shape[2]))
    return top_scores, boxes, classes, extras


def select_detections(levels: list[LevelPredictions], cfg: HeadConfig, score_mode: ScoreMode) -> Detections:
    """Threshold, per-level top-k, class-wise NMS per image, keep the best ``max_detections`` per image."""
    per_level = [_level_candidates(level, cfg) for level in levels]
    ranking = torch.cat([c[0] for c in per_level], dim=1)  # [B, L*k]
    boxes = torch.cat([c[1] for c in per_level], dim=1)
    classes = torch.cat([c[2] for c in per_level], dim=1)
    level_extras = [c[3] for c in per_level if c[3] is not None]  # every level's, or none
    extras = torch.cat(level_extras, dim=1) if level_extras else None
    batch, num_candidates = ranking.shape
    num_classes = levels[0].logits.shape[1]

    image_index = torch.arange(batch, device=ranking.device)[:, None].expand(batch, num_candidates)
    # Class-aware NMS as torchvision's batched_nms coordinate trick: each (image, class) group is shifted
    # apart by a span taken over all candidates (never empty, so the traced graph needs no If for an
    # empty input, which TensorRT cannot build; and exact for boxes reaching below 0).
    span = boxes.max() - boxes.min() + 1.0
    valid = torch.nonzero(ranking.reshape(-1) > 0).squeeze(1)
    ranking = ranking.reshape(-1)[valid]
    scores = ranking.sqrt() if score_mode == "sqrt" else ranking
    boxes = boxes.reshape(-1, 4)[valid]
    classes = classes.reshape(-1)[valid]
    image_index = image_index.reshape(-1)[valid]

    group = (image_index * num_classes + classes).to(boxes.dtype)
    keep = nms(boxes + (group * span)[:, None], scores, cfg.nms_threshold)
    # keep is sorted by score, so an image's detections appear in rank order: number them per image.
    # (Counted in float: the ONNX-TensorRT parser documents CumSum for float types only.)
    kept_image = image_index[keep]
    one_hot = (kept_image[:, None] == torch.arange(batch, device=ranking.device)[None]).float()  # [M, B]
    rank = ((one_hot.cumsum(0) * one_hot).sum(1) - 1).long()
    within = torch.nonzero(rank < cfg.max_detections).squeeze(1)
    keep, rank, kept_image = keep[within], rank[within], kept_image[within]
    slot = kept_image * cfg.max_detections + rank

    def scatter(values: torch.Tensor) -> torch.Tensor:
        # scatter, not `out[slot] = values[keep]`: the legacy exporter lowers that index_put with a Reshape
        # to the traced number of kept detections when the tracing sample keeps exactly one, which breaks
        # the graph on every other input.
        kept = values[keep]
        index = slot.reshape(-1, *([1] * (kept.dim() - 1))).expand_as(kept)
        out = values.new_zeros((batch * cfg.max_detections, *values.shape[1:])).scatter(0, index, kept)
        return out.reshape(batch, cfg.max_detections, *values.shape[1:])

    num_dets = one_hot.sum(0).long().clamp(max=cfg.max_detections)
    return Detections(
        num_dets=num_dets,
        boxes=scatter(boxes),
        scores=scatter(scores),
        classes=scatter(classes),
        extras=scatter(extras.reshape(-1, extras.shape[2])[valid]) if extras is not None else None,
    )
