"""MEInst loss and training step semantics (codec round trips are in test_codec.py)."""

from __future__ import annotations

import numpy as np
import torch

from model.config import load_config
from model.detector import OneStageDetector
from model.fcos_outputs import InstanceTargets
from model.meinst.method import centerness_weighted_mse


def test_mask_loss_is_zero_when_prediction_equals_target() -> None:
    target = torch.randn(5, 60)
    assert centerness_weighted_mse(target.clone(), target, torch.rand(5)).item() == 0.0


def test_mask_loss_is_centerness_weighted_and_normalised_by_weight_sum_times_k() -> None:
    pred, target = torch.zeros(2, 4), torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 0.0]])
    weight = torch.tensor([0.5, 1.0])
    # (0.5 * 4 + 1.0 * 4) / max(1.5 * 4, 1)
    assert np.isclose(centerness_weighted_mse(pred, target, weight).item(), 6.0 / 6.0)
    # A tiny weight sum is clamped at 1, as the reference's max(ctrness_norm * K, 1).
    assert np.isclose(centerness_weighted_mse(pred, target, torch.tensor([0.01, 0.01])).item(), 0.01 * 4 + 0.01 * 4)


def _tiny_meinst() -> OneStageDetector:
    cfg = load_config(
        None,
        [
            "model.method=meinst",
            "model.num_classes=1",
            "model.backbone.weights=null",
            "model.fpn.out_channels=32",
            "model.head.channels=32",
            "model.head.num_convs=1",
            "model.head.num_groups=8",
            "model.meinst.num_components=4",
        ],
    )
    return OneStageDetector(cfg.model)


def test_mask_tower_follows_the_head_depth_and_predicts_k_coefficients_without_activation() -> None:
    model = _tiny_meinst()
    convs = [m for m in model.mask_method.mask_tower if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 and model.mask_method.mask_pred.out_channels == 4
    model.mask_method.mask_pred.bias.data.fill_(-3.0)  # negative outputs survive: no ReLU/sigmoid
    outputs = model.mask_method([torch.zeros(1, 32, 4, 4)], model.head([torch.zeros(1, 32, 4, 4)]))
    assert torch.allclose(outputs.level_extras[0], torch.full((1, 4, 4, 4), -3.0))


def test_training_refuses_to_run_without_a_codec() -> None:
    model = _tiny_meinst().train()
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 8:40, 8:40] = 1
    gt = InstanceTargets(torch.tensor([[8.0, 8.0, 40.0, 40.0]]), torch.tensor([0]), masks)
    try:
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8), [gt])
    except RuntimeError as error:
        assert "fit_codec" in str(error)
    else:
        raise AssertionError("an unfitted codec must stop training")
