"""Small building blocks shared by the FCOS, MEInst and EmbedMask heads."""

from __future__ import annotations

import math

import torch
from torch import nn


class Scale(nn.Module):
    """A learnable scalar multiplier (one per FPN level in FCOS)."""

    def __init__(self, init_value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def conv_tower(in_channels: int, channels: int, num_convs: int, num_groups: int) -> nn.Sequential:
    """``num_convs`` x (conv3x3 + GroupNorm + ReLU), the tower used by every head branch."""
    layers: list[nn.Module] = []
    for i in range(num_convs):
        layers += [
            nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1),
            nn.GroupNorm(num_groups, channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


def init_normal(module: nn.Module, std: float = 0.01) -> None:
    """The reference init for every head conv: normal(std) weights, zero bias."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.normal_(layer.weight, std=std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def prior_bias(prior_prob: float) -> float:
    """Classification bias so that every location starts at ``prior_prob`` foreground probability."""
    return -math.log((1.0 - prior_prob) / prior_prob)


def flatten_levels(maps: list[torch.Tensor]) -> torch.Tensor:
    """[B, C, H_l, W_l] per level -> [B, sum(H_l*W_l), C], levels concatenated in order."""
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)


def init_bias(conv: nn.Conv2d, value: float) -> None:
    """Set a convolution's bias (built with one) to ``value``."""
    if conv.bias is None:
        raise ValueError("this convolution has no bias to initialise")
    nn.init.constant_(conv.bias, value)
