"""The FCOS head: towers and output convs only (targets, losses and decoding live in fcos_outputs)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.config import HeadConfig
from model.layers import Scale, conv_tower, init_bias, init_normal, prior_bias


@dataclass
class FCOSHeadOutputs:
    """Per-level maps: logits [B,C,H,W], stride-normalised ltrb [B,4,H,W], centerness logits [B,1,H,W]."""

    logits: list[torch.Tensor]
    regression: list[torch.Tensor]
    centerness: list[torch.Tensor]
    box_towers: list[torch.Tensor]  # EmbedMask's proposal branch reads these


class FCOSHead(nn.Module):
    """Shared across levels: separate GN cls and box towers, centerness on the box tower,
    per-level learnable Scale with ``relu(scale * x)`` regression in units of the level stride."""

    def __init__(self, cfg: HeadConfig, in_channels: int, num_classes: int) -> None:
        super().__init__()
        ch = cfg.channels
        self.cls_tower = conv_tower(in_channels, ch, cfg.num_convs, cfg.num_groups)
        self.bbox_tower = conv_tower(in_channels, ch, cfg.num_convs, cfg.num_groups)
        self.cls_logits = nn.Conv2d(ch, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(ch, 4, 3, padding=1)
        self.ctrness = nn.Conv2d(ch, 1, 3, padding=1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in cfg.strides])
        init_normal(self)
        init_bias(self.cls_logits, prior_bias(cfg.prior_prob))

    def forward(self, features: list[torch.Tensor]) -> FCOSHeadOutputs:
        out = FCOSHeadOutputs([], [], [], [])
        for feature, scale in zip(features, self.scales):
            cls_feat = self.cls_tower(feature)
            box_feat = self.bbox_tower(feature)
            out.logits.append(self.cls_logits(cls_feat))
            out.regression.append(F.relu(scale(self.bbox_pred(box_feat))))
            out.centerness.append(self.ctrness(box_feat))
            out.box_towers.append(box_feat)
        return out
