"""The one-stage detector: backbone + FPN + FCOS head + an optional mask method (``model.methods``)."""

from __future__ import annotations

import torch
from torch import nn

from model.backbone import BackboneWithFPN
from model.config import ModelConfig
from model.fcos_head import FCOSHead, FCOSHeadOutputs
from model.fcos_outputs import (
    FCOSLossInputs,
    FCOSTargets,
    InstanceTargets,
    assign_image,
    compute_locations,
    fcos_losses,
)
from model.inference import Detections, LevelPredictions, ScoreMode, select_detections
from model.layers import flatten_levels
from model.mask_method import LossContext, MethodOutputs
from model.methods import build_mask_method


class OneStageDetector(nn.Module):
    """Takes uint8 RGB images [B, 3, H, W] (H, W multiples of 32) and normalises them itself."""

    pixel_mean: torch.Tensor  # [1, 3, 1, 1] buffers
    pixel_std: torch.Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = BackboneWithFPN(cfg)
        self.head = FCOSHead(cfg.head, self.backbone.out_channels, cfg.num_classes)
        self.mask_method = build_mask_method(cfg, self.backbone.out_channels)
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(1, 3, 1, 1), persistent=False)

    @property
    def score_mode(self) -> ScoreMode:
        return self.mask_method.score_mode if self.mask_method is not None else "sqrt"

    def forward(
        self, images: torch.Tensor, targets: list[InstanceTargets] | None = None
    ) -> dict[str, torch.Tensor] | Detections:
        features, head, method_outputs = self.dense_outputs(images)
        if self.training:
            if targets is None:
                raise ValueError("training mode needs targets")
            return self._losses(images, features, head, method_outputs, targets)
        return self.detect(head, method_outputs)

    def dense_outputs(self, images: torch.Tensor) -> tuple[list[torch.Tensor], FCOSHeadOutputs, MethodOutputs | None]:
        """The network part of ``forward``: normalisation, backbone + FPN, head and mask branch (every shape
        fixed by the input's, so a serving runtime may autocast, compile or capture it as a CUDA graph)."""
        features = self.backbone((images.float() - self.pixel_mean) / self.pixel_std)
        head = self.head(features)
        method_outputs = self.mask_method(features, head) if self.mask_method is not None else None
        return features, head, method_outputs

    def _losses(
        self,
        images: torch.Tensor,
        features: list[torch.Tensor],
        head: FCOSHeadOutputs,
        method_outputs: MethodOutputs | None,
        gts: list[InstanceTargets],
    ) -> dict[str, torch.Tensor]:
        image_shape = (images.shape[2], images.shape[3])
        locations = compute_locations([(f.shape[2], f.shape[3]) for f in features], self.cfg.head, images.device)
        assigned = [
            assign_image(
                gt,
                locations,
                self.cfg.head,
                self.cfg.num_classes,
                self.mask_method.candidate_filter(gt, locations, image_shape) if self.mask_method else None,
            )
            for gt in gts
        ]
        targets = FCOSTargets(*(torch.stack(parts) for parts in zip(*assigned)))
        predictions = FCOSLossInputs(
            logits=flatten_levels(head.logits),
            regression=flatten_levels(head.regression),
            centerness=flatten_levels(head.centerness).squeeze(2),
        )
        losses, ctr_target = fcos_losses(predictions, targets, self.cfg.head)
        if self.mask_method is not None and method_outputs is not None:
            context = LossContext(gts, locations, targets, predictions, ctr_target, image_shape)
            losses.update(self.mask_method.losses(method_outputs, context))
        return losses

    def detect(self, head: FCOSHeadOutputs, method_outputs: MethodOutputs | None) -> Detections:
        """The graph contract from the dense outputs: selection, NMS, padding, mask decode (data-dependent shapes)."""
        levels = [
            LevelPredictions(
                logits=head.logits[i],
                regression=head.regression[i],
                centerness=head.centerness[i],
                extras=method_outputs.level_extras[i] if method_outputs is not None else None,
                stride=stride,
            )
            for i, stride in enumerate(self.cfg.head.strides)
        ]
        detections = select_detections(levels, self.cfg.head, self.score_mode)
        if self.mask_method is not None and method_outputs is not None:
            detections.masks = self.mask_method.masks(detections, method_outputs)
        return detections
