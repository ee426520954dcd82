"""EmbedMask semantics: proposal choice, stride-4 targets, sample-in-mask, inference crop, embedding layout."""

from __future__ import annotations

import math

import torch

from model.config import load_config
from model.detector import OneStageDetector
from model.embedmask.method import best_proposal_per_gt, masks_at_stride4
from model.fcos_outputs import InstanceTargets, compute_locations
from model.inference import Detections
from model.mask_contract import OUTSIDE_LOG_PROB
from model.mask_method import MethodOutputs


def _tiny(*overrides: str) -> OneStageDetector:
    cfg = load_config(
        None,
        [
            "model.method=embedmask",
            "model.num_classes=1",
            "model.backbone.weights=null",
            "model.fpn.out_channels=32",
            "model.head.channels=32",
            "model.head.num_convs=1",
            "model.head.num_groups=8",
            "model.embedmask.pixel_channels=32",
            "model.embedmask.pixel_convs=1",
            *overrides,
        ],
    )
    return OneStageDetector(cfg.model)


def test_one_proposal_per_gt_the_positive_whose_predicted_box_fits_best() -> None:
    gt_boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 40.0], [50.0, 50.0, 60.0, 60.0]])
    predicted = torch.tensor(
        [
            [0.0, 0.0, 8.0, 8.0],  # GT 0, IoU 0.64
            [20.0, 20.0, 40.0, 38.0],  # GT 1, IoU 0.9
            [0.0, 0.0, 10.0, 9.0],  # GT 0, IoU 0.9 <- best for GT 0
            [20.0, 20.0, 40.0, 38.0],  # GT 1, IoU 0.9 again: the first one wins the tie
            [0.0, 0.0, 10.0, 9.0],  # GT 0, same IoU as index 2, later
        ]
    )
    matched = torch.tensor([0, 1, 0, 1, 0])
    gt_ids, chosen = best_proposal_per_gt(predicted, gt_boxes, matched)
    assert gt_ids.tolist() == [0, 1]  # GT 2 has no positive and gets no proposal
    assert chosen.tolist() == [2, 1]


def test_gt_masks_at_stride4_are_padded_bilinear_and_dilated() -> None:
    masks = torch.zeros(1, 30, 40, dtype=torch.uint8)
    masks[0, 10:14, 10:14] = 1
    small = masks_at_stride4(masks, (32, 64))
    assert small.shape == (1, 8, 16)
    reference = (
        torch.nn.functional.interpolate(
            torch.nn.functional.pad(masks.float(), (0, 24, 0, 2))[:, None],
            size=(8, 16),
            mode="bilinear",
            align_corners=False,
        )[:, 0]
        > 0
    )
    assert torch.equal(small, reference)
    assert small.sum() >= 1  # any nonzero bilinear sample counts: the 4x4 object is never lost


def test_positives_must_lie_inside_the_gt_mask() -> None:
    model = _tiny()
    cfg = model.cfg.head
    locations = compute_locations([(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)], cfg, torch.device("cpu"))
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 16:48, 16:30] = 1  # left half of the box only
    gt = InstanceTargets(torch.tensor([[16.0, 16.0, 48.0, 48.0]]), torch.tensor([0]), masks)
    inside = model.mask_method.candidate_filter(gt, locations, (64, 64))
    points = locations.points[inside[:, 0]]
    assert len(points) > 0 and bool((points[:, 0] < 30).all()) and bool((points[:, 0] >= 16).all())


def test_embeddings_have_a_location_term_and_sigma_starts_at_the_prior_margin() -> None:
    model = _tiny("model.embedmask.embed_dim=8")
    method = model.mask_method
    for conv in (method.proposal_spatial, method.proposal_free, method.pixel_spatial, method.pixel_free):
        torch.nn.init.zeros_(conv.weight)
    torch.nn.init.zeros_(method.proposal_margin.weight)
    features = [torch.randn(1, 32, 128 // s, 128 // s) for s in (8, 16, 32, 64, 128)]
    outputs = method(features, model.head(features))
    p3 = outputs.level_extras[0]
    assert p3.shape == (1, 16, 16, 16)  # D=8 embedding + D=8 margins
    assert torch.allclose(p3[0, :2, 1, 2], torch.tensor([2 * 8 + 4, 1 * 8 + 4]) / 100.0)  # x, y of the cell
    assert bool((p3[0, 2:8] == 0).all())
    assert torch.allclose(p3[0, 8:], torch.full((8, 16, 16), math.log(2.0) / 4.0))  # ln2 / prior_margin^2
    assert outputs.dense.shape == (1, 8, 32, 32)  # pixel embeddings at stride 4


def test_inference_keeps_log_probabilities_inside_the_box_plus_two_cells_only() -> None:
    model = _tiny()
    method = model.mask_method
    pixel = torch.zeros(1, 16, 16, 16)
    extras = torch.cat([torch.zeros(1, 1, 16), torch.full((1, 1, 16), 0.1)], dim=2)
    detections = Detections(
        torch.tensor([1]),
        torch.tensor([[[17.0, 21.0, 30.0, 33.0]]]),
        torch.ones(1, 1),
        torch.zeros(1, 1, dtype=torch.long),
        extras,
    )

    log_prob = method.masks(detections, MethodOutputs([], dense=pixel))[0, 0]
    inside = log_prob > OUTSIDE_LOG_PROB
    rows, cols = torch.nonzero(inside, as_tuple=True)
    # Box / 4 truncated: cols 4..7, rows 5..8; widened by 2 cells each way.
    assert (cols.min().item(), cols.max().item(), rows.min().item(), rows.max().item()) == (2, 9, 3, 10)
    assert torch.allclose(log_prob[inside], torch.zeros(int(inside.sum())))  # identical embeddings: p = 1


def test_training_step_produces_a_finite_mask_loss_with_gradients() -> None:
    model = _tiny().train()
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 8:40, 8:40] = 1
    masks[1, 30:60, 20:60] = 1
    gt = InstanceTargets(torch.tensor([[8.0, 8.0, 40.0, 40.0], [20.0, 30.0, 60.0, 60.0]]), torch.tensor([0, 0]), masks)
    empty = InstanceTargets(
        torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0, 64, 64, dtype=torch.uint8)
    )
    losses = model(torch.zeros(2, 3, 64, 64, dtype=torch.uint8), [gt, empty])
    assert set(losses) == {"loss_cls", "loss_box", "loss_ctr", "loss_mask"}
    assert 0 < losses["loss_mask"].item() < 10
    losses["loss_mask"].backward()
    assert model.mask_method.pixel_free.weight.grad.abs().sum() > 0
    assert model.mask_method.proposal_margin.weight.grad.abs().sum() > 0
