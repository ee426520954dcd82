"""SGD with per-parameter-group bias settings and the warmup + step-decay learning-rate schedule.

Follows maskrcnn-benchmark / detectron2 (docs/methods.md, Solver and recipes): biases may get their own learning
rate factor (EmbedMask: x2) and weight decay (EmbedMask: 0); every other trainable parameter gets
``base_lr`` and ``weight_decay``. The schedule is a pure function of the iteration, so a resumed run only
needs the iteration count to be on the same schedule.
"""

from __future__ import annotations

from bisect import bisect_right

import torch
from torch import nn

from model.config import SolverConfig


def build_optimizer(model: nn.Module, cfg: SolverConfig) -> torch.optim.SGD:
    """SGD with momentum over the trainable parameters, biases in their own group."""
    weights: list[nn.Parameter] = []
    biases: list[nn.Parameter] = []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (biases if name.endswith("bias") else weights).append(parameter)
    bias_decay = cfg.weight_decay if cfg.weight_decay_bias is None else cfg.weight_decay_bias
    groups = [
        {"params": weights, "lr": cfg.base_lr, "weight_decay": cfg.weight_decay},
        {"params": biases, "lr": cfg.base_lr * cfg.bias_lr_factor, "weight_decay": bias_decay},
    ]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=cfg.base_lr, momentum=cfg.momentum)


def lr_factor(iteration: int, cfg: SolverConfig) -> float:
    """Multiplier of each group's initial lr at ``iteration`` (0-based): warmup, then gamma per passed step."""
    decay = cfg.gamma ** bisect_right(sorted(cfg.steps), iteration)
    if iteration >= cfg.warmup_iters:
        return decay
    if cfg.warmup_method == "constant":
        return cfg.warmup_factor * decay
    alpha = iteration / cfg.warmup_iters
    return (cfg.warmup_factor * (1.0 - alpha) + alpha) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SolverConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Step it once per iteration. Its state dict holds only counters, so the schedule always comes from ``cfg``."""

    def factor(iteration: int) -> float:
        return lr_factor(iteration, cfg)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
