"""MEInst (docs/methods.md, MEInst): a parallel GN mask tower regressing whitened PCA coefficients.

Training target: per positive location, its matched GT's 28x28 box-cropped mask (cropped once per GT),
encoded with freshly drawn label-smoothing eps; loss = centerness-weighted MSE / (centerness sum x K).
Inference: only the kept detections are decoded, with one matmul and a sigmoid.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from model.config import ModelConfig
from model.fcos_head import FCOSHeadOutputs
from model.fcos_outputs import mean_over_ranks
from model.inference import Detections, detection_extras
from model.layers import conv_tower, flatten_levels, init_normal
from model.mask_method import LossContext, MaskAxes, MaskMethod, MethodOutputs
from model.meinst.codec import PCAMaskCodec, crop_bitmasks


def centerness_weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_pos(weight * sum_k (pred - target)^2) / max(weight sum over ranks * K, 1), as the reference."""
    norm = mean_over_ranks(weight.sum()) * target.shape[1]
    return (((pred - target) ** 2).sum(dim=1) * weight).sum() / norm.clamp(min=1.0)


class MEInst(MaskMethod):
    name = "meinst"
    mask_kind = "box28"
    score_mode = "sqrt"

    @classmethod
    def graph_fields(cls, cfg: ModelConfig) -> dict[str, Any]:
        meinst = cfg.meinst
        return {"mask_kind": cls.mask_kind, "mask_threshold": meinst.mask_threshold, "mask_size": meinst.mask_size}

    @classmethod
    def mask_axes(cls, cfg: ModelConfig) -> MaskAxes:
        """[B, K, mask_size, mask_size]: only the batch is dynamic."""
        size = cfg.meinst.mask_size
        return MaskAxes(dynamic={0: "batch"}, static={1: cfg.head.max_detections, 2: size, 3: size})

    def check_exportable(self) -> None:
        self.codec.require_fitted()

    def __init__(self, cfg: ModelConfig, in_channels: int) -> None:
        super().__init__()
        head = cfg.head
        self.num_classes = cfg.num_classes
        self.mask_tower = conv_tower(in_channels, head.channels, head.num_convs, head.num_groups)
        self.mask_pred = nn.Conv2d(head.channels, cfg.meinst.num_components, 3, padding=1)
        init_normal(self.mask_tower)
        init_normal(self.mask_pred)
        self.codec = PCAMaskCodec(cfg.meinst.num_components, cfg.meinst.mask_size)

    def forward(self, features: list[torch.Tensor], head: FCOSHeadOutputs) -> MethodOutputs:
        return MethodOutputs(level_extras=[self.mask_pred(self.mask_tower(f)) for f in features])

    def losses(self, outputs: MethodOutputs, context: LossContext) -> dict[str, torch.Tensor]:
        self.codec.require_fitted()
        coeffs = flatten_levels(outputs.level_extras)
        coeffs = coeffs.reshape(-1, coeffs.shape[2])
        positive = context.targets.labels.reshape(-1) != self.num_classes
        if not positive.any():
            return {"loss_mask": coeffs.sum() * 0.0}

        # One 28x28 crop per GT; GT indices are offset so that all images share one table.
        size = self.codec.mask_size
        crops, offsets, start = [], [], 0
        for gt in context.gts:
            if gt.masks is None:
                raise ValueError("MEInst training needs instance masks in the targets")
            crops.append(
                crop_bitmasks(gt.masks, gt.boxes, size) if len(gt.boxes) else gt.boxes.new_zeros((0, size, size))
            )
            offsets.append(start)
            start += len(gt.boxes)
        table = torch.cat(crops)
        offset = torch.tensor(offsets, device=coeffs.device)[:, None]
        gt_index = (context.targets.matched_gt + offset).reshape(-1)[positive]
        target = self.codec.encode(table[gt_index])

        return {"loss_mask": centerness_weighted_mse(coeffs[positive], target, context.centerness_target)}

    def masks(self, detections: Detections, outputs: MethodOutputs) -> torch.Tensor:
        """Box-relative mask probabilities [B, K, 28, 28] of the kept detections."""
        return self.codec.decode(detection_extras(detections))
