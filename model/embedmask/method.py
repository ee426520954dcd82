"""EmbedMask, the official (maskrcnn-benchmark) variant (docs/methods.md, EmbedMask).

Each location predicts a proposal embedding (2 spatial-aware + D-2 free dims) and per-dimension margins
sigma on the box tower; a pixel tower on P3 predicts pixel embeddings, upsampled x2 to stride 4. A pixel
belongs to a proposal with p = exp(-sum_d sigma_d (e_pix - e_prop)^2) (model.embedmask.coupling).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou

from model.config import ModelConfig
from model.embedmask.coupling import coupling_energy, coupling_logit
from model.embedmask.lovasz import lovasz_hinge_per_instance
from model.fcos_head import FCOSHeadOutputs
from model.fcos_outputs import InstanceTargets, Locations, level_points
from model.inference import Detections, detection_extras
from model.layers import Scale, conv_tower, flatten_levels, init_bias, init_normal
from model.mask_contract import LOGPROB_STRIDE, OUTSIDE_LOG_PROB
from model.mask_method import LossContext, MaskAxes, MaskMethod, MethodOutputs


def best_proposal_per_gt(
    predicted_boxes: torch.Tensor, gt_boxes: torch.Tensor, matched_gt: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each GT with positives, the positive whose predicted box has the highest IoU with that GT box.

    predicted_boxes [P, 4] of the positives, matched_gt [P] their GT index. Returns (gt indices, positive
    indices), one pair per GT that has positives; ties go to the first positive, as in the reference.
    """
    iou = box_iou(predicted_boxes, gt_boxes)[torch.arange(len(matched_gt)), matched_gt]
    num_gt = len(gt_boxes)
    best = iou.new_full((num_gt,), -1.0).scatter_reduce(0, matched_gt, iou, "amax", include_self=True)
    position = torch.arange(len(matched_gt), device=iou.device)
    is_best = iou == best[matched_gt]
    first = torch.full((num_gt,), len(matched_gt), device=iou.device).scatter_reduce(
        0, matched_gt[is_best], position[is_best], "amin", include_self=True
    )
    has_positive = first < len(matched_gt)
    return torch.nonzero(has_positive).squeeze(1), first[has_positive]


def masks_at_stride4(masks: torch.Tensor, padded_shape: tuple[int, int]) -> torch.Tensor:
    """GT bitmasks [G, h, w] -> [G, H/4, W/4] bool: zero-pad to the padded input, bilinear resize, > 0."""
    height, width = padded_shape
    padded = F.pad(masks.float(), (0, width - masks.shape[2], 0, height - masks.shape[1]))
    size = (height // LOGPROB_STRIDE, width // LOGPROB_STRIDE)
    resized = F.interpolate(padded[:, None], size=size, mode="bilinear", align_corners=False)
    return resized[:, 0] > 0


class EmbedMask(MaskMethod):
    name = "embedmask"
    mask_kind = "logprob_s4"
    score_mode = "product"

    @classmethod
    def graph_fields(cls, cfg: ModelConfig) -> dict[str, Any]:
        return {
            "mask_kind": cls.mask_kind,
            "mask_threshold": cfg.embedmask.mask_threshold,
            "mask_stride": LOGPROB_STRIDE,
            "box_padding": cfg.embedmask.box_padding,
        }

    @classmethod
    def mask_axes(cls, cfg: ModelConfig) -> MaskAxes:
        """[B, K, H/4, W/4]: the map follows the input's height and width."""
        return MaskAxes(dynamic={0: "batch", 2: "height_4", 3: "width_4"}, static={1: cfg.head.max_detections})

    def __init__(self, cfg: ModelConfig, in_channels: int) -> None:
        super().__init__()
        em, head = cfg.embedmask, cfg.head
        self.cfg = cfg
        self.embed_dim, self.spatial_dims = em.embed_dim, em.spatial_dims
        free_dims = em.embed_dim - em.spatial_dims
        # Proposal branch, on the box tower of every level.
        self.proposal_spatial = nn.Conv2d(head.channels, em.spatial_dims, 3, padding=1)
        self.proposal_free = nn.Conv2d(head.channels, free_dims, 3, padding=1)
        self.proposal_margin = nn.Conv2d(head.channels, em.embed_dim, 3, padding=1)
        self.margin_scales = nn.ModuleList([Scale(1.0) for _ in head.strides])
        # Pixel branch, on P3 only.
        self.pixel_tower = conv_tower(in_channels, em.pixel_channels, em.pixel_convs, head.num_groups)
        self.pixel_spatial = nn.Conv2d(em.pixel_channels, em.spatial_dims, 3, padding=1)
        self.pixel_free = nn.Conv2d(em.pixel_channels, free_dims, 3, padding=1)
        # One learnable scale of the location term, shared by proposal and pixel embeddings.
        self.position_scale = Scale(1.0)
        init_normal(self)
        # sigma starts at ln2 / prior_margin^2, so p = 0.5 at embedding distance prior_margin.
        init_bias(self.proposal_margin, math.log(math.log(2.0) / em.prior_margin**2))

    def _embedding(self, spatial: torch.Tensor, free: torch.Tensor, stride: int) -> torch.Tensor:
        """cat(position_scale * location / 100 + spatial offset, free) for a map of locations at ``stride``."""
        height, width = spatial.shape[2], spatial.shape[3]
        points = level_points(height, width, stride, spatial.device).T.reshape(1, 2, height, width)
        return torch.cat([self.position_scale(points / 100.0) + spatial, free], dim=1)

    def forward(self, features: list[torch.Tensor], head: FCOSHeadOutputs) -> MethodOutputs:
        level_extras = []
        for level, (box_tower, stride) in enumerate(zip(head.box_towers, self.cfg.head.strides)):
            embed = self._embedding(self.proposal_spatial(box_tower), self.proposal_free(box_tower), stride)
            margin = self.proposal_margin(box_tower / self.cfg.embedmask.margin_reduce_factor)
            spatial_margin = self.margin_scales[level](margin[:, : self.spatial_dims])
            sigma = torch.cat([spatial_margin, margin[:, self.spatial_dims :]], dim=1).exp()
            level_extras.append(torch.cat([embed, sigma], dim=1))
        pixel = self.pixel_tower(features[0])
        pixel_embed = self._embedding(self.pixel_spatial(pixel), self.pixel_free(pixel), self.cfg.head.strides[0])
        pixel_embed = F.interpolate(pixel_embed, scale_factor=2.0, mode="bilinear", align_corners=False)
        return MethodOutputs(level_extras=level_extras, dense=pixel_embed)

    def candidate_filter(
        self, gt: InstanceTargets, locations: Locations, image_shape: tuple[int, int]
    ) -> torch.Tensor | None:
        """SAMPLE_IN_MASK: a location is positive for a GT only if it lies inside that GT's mask."""
        if gt.masks is None:
            raise ValueError("EmbedMask training needs instance masks in the targets")
        height, width = gt.masks.shape[1:]
        xs, ys = locations.points[:, 0].long(), locations.points[:, 1].long()
        inside_image = (xs < width) & (ys < height)
        values = gt.masks[:, ys.clamp(max=height - 1), xs.clamp(max=width - 1)]  # [G, N]
        return (values.bool() & inside_image[None]).T

    def losses(self, outputs: MethodOutputs, context: LossContext) -> dict[str, torch.Tensor]:
        extras = flatten_levels(outputs.level_extras)  # [B, N, 2D]
        ltrb = context.predictions.regression.detach() * context.locations.strides[None, :, None]
        points = context.locations.points[None].expand(ltrb.shape[0], -1, -1)
        predicted = torch.cat([points - ltrb[..., :2], points + ltrb[..., 2:]], dim=2)
        chunk = self.cfg.embedmask.instance_chunk
        pixel_embed = self._pixel_embeddings(outputs).flatten(2)  # [B, D, P]

        total = pixel_embed.sum() * 0.0 + extras.sum() * 0.0  # keeps every branch in the graph for DDP
        for b, gt in enumerate(context.gts):
            positive = torch.nonzero(context.targets.matched_gt[b] >= 0).squeeze(1)
            if len(positive) == 0:
                continue
            gt_ids, chosen = best_proposal_per_gt(
                predicted[b, positive], gt.boxes, context.targets.matched_gt[b, positive]
            )
            proposals = extras[b, positive[chosen]]
            embed, sigma = proposals[:, : self.embed_dim], proposals[:, self.embed_dim :]
            if gt.masks is None:
                raise ValueError("EmbedMask trains on instance masks; this image's targets have none")
            gt_masks = masks_at_stride4(gt.masks[gt_ids], context.image_shape).flatten(1)
            per_instance = []
            for start in range(0, len(gt_ids), chunk):
                part = slice(start, start + chunk)
                logits = coupling_logit(coupling_energy(pixel_embed[b], embed[part], sigma[part]))
                per_instance.append(lovasz_hinge_per_instance(logits, gt_masks[part]))
            total = total + torch.cat(per_instance).mean()
        return {"loss_mask": total / len(context.gts) * self.cfg.embedmask.mask_loss_weight}

    @staticmethod
    def _pixel_embeddings(outputs: MethodOutputs) -> torch.Tensor:
        """The pixel tower's embeddings [B, D, H/4, W/4], which ``forward`` always puts in ``dense``."""
        if outputs.dense is None:
            raise ValueError("EmbedMask's outputs lack the pixel embeddings (dense)")
        return outputs.dense

    def masks(self, detections: Detections, outputs: MethodOutputs) -> torch.Tensor:
        """Log-probabilities [B, K, H/4, W/4] inside each box (+-box_padding stride-4 pixels), -10 outside."""
        pixel_embed = self._pixel_embeddings(outputs)
        height, width = pixel_embed.shape[2], pixel_embed.shape[3]
        extras = detection_extras(detections)
        embed, sigma = extras[..., : self.embed_dim], extras[..., self.embed_dim :]
        log_prob = -coupling_energy(pixel_embed.flatten(2), embed, sigma)
        log_prob = log_prob.reshape(log_prob.shape[0], log_prob.shape[1], height, width)

        pad = self.cfg.embedmask.box_padding
        cells = torch.floor(detections.boxes.clamp(min=0.0) / LOGPROB_STRIDE)  # [B, K, 4]
        cols = torch.arange(width, device=cells.device, dtype=cells.dtype)
        rows = torch.arange(height, device=cells.device, dtype=cells.dtype)
        in_cols = (cols >= cells[..., 0:1] - pad) & (cols <= cells[..., 2:3] + pad)  # [B, K, W]
        in_rows = (rows >= cells[..., 1:2] - pad) & (rows <= cells[..., 3:4] + pad)  # [B, K, H]
        inside = in_rows[..., :, None] & in_cols[..., None, :]
        return torch.where(inside, log_prob, torch.full_like(log_prob, OUTSIDE_LOG_PROB))
