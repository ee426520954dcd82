"""FCOS locations, target assignment and losses (docs/methods.md, FCOS: targets and losses)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from model.config import HeadConfig

INF = 1e8


@dataclass
class InstanceTargets:
    """Ground truth of one image in input-pixel coordinates (after resize and flip, before padding)."""

    boxes: torch.Tensor  # [G, 4] xyxy float
    labels: torch.Tensor  # [G] int64 in [0, num_classes)
    masks: torch.Tensor | None = None  # [G, h, w] uint8 bitmasks at the resized image size


@dataclass
class Locations:
    """Every head location of a padded batch, levels concatenated in order."""

    points: torch.Tensor  # [N, 2] (x, y) input pixels
    strides: torch.Tensor  # [N]
    size_ranges: torch.Tensor  # [N, 2] inclusive [lo, hi] of max(l, t, r, b)
    level_sizes: list[int]  # number of locations on each level


def level_points(height: int, width: int, stride: int, device: torch.device) -> torch.Tensor:
    """Locations (x, y) = (j*s + s//2, i*s + s//2) of a level's cells, row-major, [H*W, 2]."""
    ys = torch.arange(height, device=device, dtype=torch.float32) * stride + stride // 2
    xs = torch.arange(width, device=device, dtype=torch.float32) * stride + stride // 2
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1)


def compute_locations(feature_shapes: list[tuple[int, int]], cfg: HeadConfig, device: torch.device) -> Locations:
    bounds = [-1.0, *cfg.sizes_of_interest, INF]
    points, strides, ranges, sizes = [], [], [], []
    for level, ((h, w), stride) in enumerate(zip(feature_shapes, cfg.strides)):
        points.append(level_points(h, w, stride, device))
        strides.append(torch.full((h * w,), float(stride), device=device))
        ranges.append(torch.tensor([bounds[level], bounds[level + 1]], device=device).expand(h * w, 2))
        sizes.append(h * w)
    return Locations(torch.cat(points), torch.cat(strides), torch.cat(ranges), sizes)


@dataclass
class FCOSTargets:
    """Per-location targets for a batch, shaped [B, N, ...]."""

    labels: torch.Tensor  # [B, N] int64, num_classes = background
    regression: torch.Tensor  # [B, N, 4] ltrb divided by the location's stride
    matched_gt: torch.Tensor  # [B, N] int64 index into that image's GTs, -1 = background


def assign_image(
    gt: InstanceTargets,
    locations: Locations,
    cfg: HeadConfig,
    num_classes: int,
    inside_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels [N], stride-normalised ltrb [N, 4] and matched GT [N] for one image.

    A location is a candidate for a GT when it lies strictly inside the GT box shrunk to
    ``radius * stride`` around the box centre (clipped to the box), ``lo <= max(ltrb) <= hi`` for its
    level, and (EmbedMask) ``inside_mask[n, g]``. Among candidates the GT of smallest area wins.
    """
    n = locations.points.shape[0]
    device = locations.points.device
    if gt.boxes.numel() == 0:
        return (
            torch.full((n,), num_classes, dtype=torch.long, device=device),
            torch.zeros((n, 4), device=device),
            torch.full((n,), -1, dtype=torch.long, device=device),
        )
    xs, ys = locations.points[:, 0:1], locations.points[:, 1:2]
    boxes = gt.boxes
    ltrb = torch.stack([xs - boxes[:, 0], ys - boxes[:, 1], boxes[:, 2] - xs, boxes[:, 3] - ys], dim=2)  # [N, G, 4]

    radius = locations.strides[:, None] * cfg.center_sample_radius
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    center_box = torch.stack(
        [
            torch.maximum(cx - radius, boxes[:, 0]),
            torch.maximum(cy - radius, boxes[:, 1]),
            torch.minimum(cx + radius, boxes[:, 2]),
            torch.minimum(cy + radius, boxes[:, 3]),
        ],
        dim=2,
    )
    center_ltrb = torch.stack(
        [xs - center_box[..., 0], ys - center_box[..., 1], center_box[..., 2] - xs, center_box[..., 3] - ys], dim=2
    )
    candidate = center_ltrb.min(dim=2).values > 0

    max_side = ltrb.max(dim=2).values
    candidate &= (max_side >= locations.size_ranges[:, 0:1]) & (max_side <= locations.size_ranges[:, 1:2])
    if inside_mask is not None:
        candidate &= inside_mask

    areas = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None].expand(n, -1)
    areas = torch.where(candidate, areas, torch.full_like(areas, INF))
    min_area, matched = areas.min(dim=1)
    background = min_area == INF
    labels = torch.where(background, torch.full_like(matched, num_classes), gt.labels[matched])
    regression = ltrb[torch.arange(n, device=device), matched] / locations.strides[:, None]
    matched = torch.where(background, torch.full_like(matched, -1), matched)
    return labels, regression, matched


def centerness_target(ltrb: torch.Tensor) -> torch.Tensor:
    lr, tb = ltrb[:, [0, 2]], ltrb[:, [1, 3]]
    return torch.sqrt((lr.min(dim=1).values / lr.max(dim=1).values) * (tb.min(dim=1).values / tb.max(dim=1).values))


def giou_loss_ltrb(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - GIoU of two boxes given as (l, t, r, b) around the same point.

    Written out because the reference smooths IoU as (inter + 1) / (union + 1) in stride units,
    which ``torchvision.ops.generalized_box_iou_loss`` (eps-stabilised) does not.
    """
    pred_area = (pred[:, 0] + pred[:, 2]) * (pred[:, 1] + pred[:, 3])
    target_area = (target[:, 0] + target[:, 2]) * (target[:, 1] + target[:, 3])
    inter_w = torch.minimum(pred[:, 0], target[:, 0]) + torch.minimum(pred[:, 2], target[:, 2])
    inter_h = torch.minimum(pred[:, 1], target[:, 1]) + torch.minimum(pred[:, 3], target[:, 3])
    enclose_w = torch.maximum(pred[:, 0], target[:, 0]) + torch.maximum(pred[:, 2], target[:, 2])
    enclose_h = torch.maximum(pred[:, 1], target[:, 1]) + torch.maximum(pred[:, 3], target[:, 3])
    inter = inter_w * inter_h
    union = pred_area + target_area - inter
    enclose = enclose_w * enclose_h
    iou = (inter + 1.0) / (union + 1.0)
    return 1.0 - (iou - (enclose - union) / enclose)


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """Average a scalar over distributed ranks (the reference's num_pos_avg); identity on one process."""
    if dist.is_available() and dist.is_initialized():
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


@dataclass
class FCOSLossInputs:
    """Predictions flattened over levels: logits [B,N,C], regression [B,N,4], centerness [B,N]."""

    logits: torch.Tensor
    regression: torch.Tensor
    centerness: torch.Tensor


def fcos_losses(
    pred: FCOSLossInputs, targets: FCOSTargets, cfg: HeadConfig
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Focal / num_pos, centerness-weighted GIoU / centerness sum, centerness BCE / num_pos.

    Also returns the centerness target of the positives (MEInst weights its mask loss by it).
    """
    num_classes = pred.logits.shape[-1]
    labels = targets.labels.reshape(-1)
    positive = labels != num_classes
    num_pos = mean_over_ranks(positive.sum().float()).clamp(min=1.0)

    one_hot = F.one_hot(labels, num_classes + 1)[:, :num_classes].to(pred.logits.dtype)
    cls_loss = (
        sigmoid_focal_loss(
            pred.logits.reshape(-1, num_classes), one_hot, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma, reduction="sum"
        )
        / num_pos
    )

    reg_pred = pred.regression.reshape(-1, 4)[positive]
    reg_target = targets.regression.reshape(-1, 4)[positive]
    ctr_pred = pred.centerness.reshape(-1)[positive]
    ctr_target = centerness_target(reg_target)
    ctr_norm = mean_over_ranks(ctr_target.sum()).clamp(min=1e-6)
    if positive.any():
        box_loss = (giou_loss_ltrb(reg_pred, reg_target) * ctr_target).sum() / ctr_norm
        ctr_loss = F.binary_cross_entropy_with_logits(ctr_pred, ctr_target, reduction="sum") / num_pos
    else:  # keep every head parameter in the graph so DDP sees a gradient for it
        box_loss = reg_pred.sum() * 0.0
        ctr_loss = ctr_pred.sum() * 0.0
    return {"loss_cls": cls_loss, "loss_box": box_loss, "loss_ctr": ctr_loss}, ctr_target
