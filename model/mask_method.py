"""The interface of a mask method: one class owns everything specific to the method (docs/architecture.md).

A method adds layers on top of the FCOS features (``forward``), may narrow FCOS positives
(``candidate_filter``), adds its loss (``losses``) and decodes masks of the kept detections (``masks``).
Class-level facts describe its graph outputs without building a network: the score rule, the mask kind
and axes of the ``masks`` output, and the fields it adds to the exported metadata (what finishing needs).
Methods are registered in ``model.methods``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from model.config import ModelConfig
from model.fcos_head import FCOSHeadOutputs
from model.fcos_outputs import FCOSLossInputs, FCOSTargets, InstanceTargets, Locations
from model.inference import Detections, ScoreMode
from model.mask_contract import MaskKind


@dataclass
class MethodOutputs:
    """What a mask method adds to the FCOS outputs."""

    level_extras: list[torch.Tensor]  # per level [B, E, H, W], carried with each detection
    dense: torch.Tensor | None = None  # image-level maps (EmbedMask pixel embeddings)


@dataclass
class LossContext:
    """Everything a mask loss needs from the detector's training step."""

    gts: list[InstanceTargets]
    locations: Locations
    targets: FCOSTargets
    predictions: FCOSLossInputs
    centerness_target: torch.Tensor  # of the positives, in flattened [B*N] order
    image_shape: tuple[int, int]  # padded input (H, W)


class MaskAxes(NamedTuple):
    """Axes of the graph's ``masks`` output ``[B, K, ...]``: names of the dynamic ones, sizes of the fixed ones."""

    dynamic: dict[int, str]
    static: dict[int, int]


class MaskMethod(nn.Module):
    """Base of a mask branch. Its layers live in ``forward``; targets, losses and decoding in the rest."""

    name: ClassVar[str]  # ``model.method`` in the config
    mask_kind: ClassVar[MaskKind]
    score_mode: ClassVar[ScoreMode] = "sqrt"

    @classmethod
    def graph_fields(cls, cfg: ModelConfig) -> dict[str, Any]:
        """The method's fields of the graph metadata (``export.metadata.GraphMetadata``): ``mask_kind``,
        ``mask_threshold`` and the mask geometry finishing needs."""
        raise NotImplementedError

    @classmethod
    def mask_axes(cls, cfg: ModelConfig) -> MaskAxes:
        raise NotImplementedError

    def check_exportable(self) -> None:
        """Raise if the method cannot be exported yet (e.g. MEInst without a fitted codec)."""

    def forward(self, features: list[torch.Tensor], head: FCOSHeadOutputs) -> MethodOutputs:
        raise NotImplementedError

    def candidate_filter(
        self, gt: InstanceTargets, locations: Locations, image_shape: tuple[int, int]
    ) -> torch.Tensor | None:
        """An extra [N, G] condition for a location to be positive for a GT (None: FCOS rules only)."""
        return None

    def losses(self, outputs: MethodOutputs, context: LossContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def masks(self, detections: Detections, outputs: MethodOutputs) -> torch.Tensor:
        raise NotImplementedError
