"""FCOS semantics on hand-built cases: target assignment, loss values, batched inference."""

from __future__ import annotations

import math

import torch

from model.config import HeadConfig
from model.fcos_outputs import (
    FCOSLossInputs,
    FCOSTargets,
    InstanceTargets,
    assign_image,
    compute_locations,
    fcos_losses,
)
from model.inference import LevelPredictions, select_detections

CFG = HeadConfig()
# A 128x128 input: P3..P7 maps of 16, 8, 4, 2, 1 cells.
LOCATIONS = compute_locations([(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)], CFG, torch.device("cpu"))


def _index(x: float, y: float, stride: int) -> int:
    sizes = dict(zip(CFG.strides, LOCATIONS.level_sizes))
    offset = sum(n for s, n in sizes.items() if s < stride)
    width = int(math.isqrt(sizes[stride]))
    return offset + int(y // stride) * width + int(x // stride)


def _assign(boxes: list[list[float]], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gt = InstanceTargets(torch.tensor(boxes, dtype=torch.float32), torch.tensor(labels))
    return assign_image(gt, LOCATIONS, CFG, num_classes=3)


def test_locations_sit_at_cell_centres() -> None:
    assert LOCATIONS.points[_index(4, 4, 8)].tolist() == [4.0, 4.0]
    assert LOCATIONS.points[_index(44, 52, 8)].tolist() == [44.0, 52.0]
    assert LOCATIONS.points[_index(64, 64, 128)].tolist() == [64.0, 64.0]


def test_size_range_bounds_are_inclusive_so_a_box_lands_on_both_levels() -> None:
    labels, regression, matched = _assign([[0, 0, 88, 108]], [2])
    on_p3 = _index(44, 44, 8)  # l,t,r,b = 44, 44, 44, 64: max exactly 64, the top of P3's range
    on_p4 = _index(24, 56, 16)  # l,t,r,b = 24, 56, 64, 52: max exactly 64, the bottom of P4's range
    for index, stride in [(on_p3, 8), (on_p4, 16)]:
        assert labels[index] == 2 and matched[index] == 0
        assert (regression[index] * stride).max() == 64
    assert torch.allclose(regression[on_p3], torch.tensor([44.0, 44.0, 44.0, 64.0]) / 8)


def test_ambiguous_location_goes_to_the_smaller_box() -> None:
    big, small = [0, 0, 120, 120], [0, 8, 120, 104]
    labels, _, matched = _assign([big, small], [0, 1])
    shared = _index(52, 52, 16)  # inside both boxes' centre regions, max side in P4's range for both
    assert matched[shared] == 1 and labels[shared] == 1
    labels, _, matched = _assign([small, big], [1, 0])  # order of the GTs does not matter
    assert matched[shared] == 0 and labels[shared] == 1


def test_center_sampling_excludes_a_corner_location() -> None:
    labels, _, matched = _assign([[0, 0, 128, 128]], [0])
    corner = _index(8, 8, 16)  # inside the box, far from its centre
    centre = _index(56, 56, 16)  # within 1.5 strides of the centre (64, 64)
    assert matched[corner] == -1 and labels[corner] == 3
    assert matched[centre] == 0 and labels[centre] == 0
    # The sampling region is clipped to the box: a thin box keeps only locations inside it.
    # Centre (64, 62), radius 12: the region is x in (52, 76), y in (56, 68) after clipping to the box.
    labels, _, matched = _assign([[40, 56, 88, 68]], [0])
    assert LOCATIONS.points[matched == 0].tolist() == [[60.0, 60.0], [68.0, 60.0]]


def test_empty_image_is_all_background() -> None:
    gt = InstanceTargets(torch.zeros((0, 4)), torch.zeros((0,), dtype=torch.long))
    labels, _, matched = assign_image(gt, LOCATIONS, CFG, num_classes=3)
    assert bool((labels == 3).all()) and bool((matched == -1).all())


def test_loss_values_on_a_hand_computed_case() -> None:
    # Two locations, one class: location 0 positive with target ltrb (1,1,2,2), location 1 background.
    predictions = FCOSLossInputs(
        logits=torch.zeros(1, 2, 1),
        regression=torch.tensor([[[1.0, 1.0, 1.0, 1.0], [3.0, 3.0, 3.0, 3.0]]]),
        centerness=torch.zeros(1, 2),
    )
    targets = FCOSTargets(
        labels=torch.tensor([[0, 1]]),
        regression=torch.tensor([[[1.0, 1.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0]]]),
        matched_gt=torch.tensor([[0, -1]]),
    )
    losses, ctr_target = fcos_losses(predictions, targets, CFG)
    log2 = math.log(2.0)
    # Focal at p=0.5: positive 0.25*0.5^2*log2, negative 0.75*0.5^2*log2, over num_pos=1.
    assert math.isclose(losses["loss_cls"].item(), 0.25 * 0.25 * log2 + 0.75 * 0.25 * log2, rel_tol=1e-5)
    # Centerness target sqrt(1/2 * 1/2) = 0.5; IoU (4+1)/(9+1) = 0.5, enclosure = union: GIoU 0.5.
    assert torch.allclose(ctr_target, torch.tensor([0.5]))
    assert math.isclose(losses["loss_box"].item(), 0.5 * 0.5 / 0.5, rel_tol=1e-6)
    assert math.isclose(losses["loss_ctr"].item(), log2, rel_tol=1e-6)


def test_giou_penalises_the_empty_part_of_the_enclosing_box() -> None:
    predictions = FCOSLossInputs(torch.zeros(1, 1, 1), torch.tensor([[[2.0, 1.0, 0.0, 1.0]]]), torch.zeros(1, 1))
    targets = FCOSTargets(torch.tensor([[0]]), torch.tensor([[[0.0, 1.0, 2.0, 1.0]]]), torch.tensor([[0]]))
    losses, _ = fcos_losses(predictions, targets, CFG)
    # Boxes [-2,0]x[-1,1] and [0,2]x[-1,1] touch: inter 0, union 8, enclose 8 -> IoU 1/9, GIoU 1/9.
    # Centerness target of ltrb (0,1,2,1) is 0, so the box loss weight is 0 and its normaliser clamps to 1e-6.
    assert losses["loss_box"].item() == 0.0
    targets = FCOSTargets(torch.tensor([[0]]), torch.tensor([[[1.0, 1.0, 1.0, 1.0]]]), torch.tensor([[0]]))
    predictions = FCOSLossInputs(torch.zeros(1, 1, 1), torch.tensor([[[3.0, 1.0, -1.0, 1.0]]]), torch.zeros(1, 1))
    losses, _ = fcos_losses(predictions, targets, CFG)
    # pred [-3,1]x[-1,1] (width 2), target [-1,1]x[-1,1]: inter 0, union 8, enclose 4*2=8 -> GIoU = 1/9.
    assert math.isclose(losses["loss_box"].item(), 1 - 1 / 9, rel_tol=1e-6)


def _level(batch: int, classes: int, size: int, stride: int) -> LevelPredictions:
    return LevelPredictions(
        logits=torch.full((batch, classes, size, size), -20.0),
        regression=torch.ones(batch, 4, size, size),
        centerness=torch.full((batch, 1, size, size), 20.0),
        extras=torch.arange(size * size, dtype=torch.float32).view(1, 1, size, size).repeat(batch, 1, 1, 1),
        stride=stride,
    )


def test_inference_decodes_scores_and_runs_classwise_nms_per_image() -> None:
    cfg = HeadConfig(strides=[8, 16], sizes_of_interest=[64], max_detections=3)
    p3, p4 = _level(2, 2, 8, 8), _level(2, 2, 4, 16)
    # Image 0: three overlapping boxes at neighbouring P3 cells; two of class 0, one of class 1.
    p3.logits[0, 0, 2, 2] = 3.0  # cls 0.9526, ctr ~1 -> the best box
    p3.logits[0, 0, 2, 3] = 1.0  # same class, IoU with the first > 0.6 -> suppressed
    p3.logits[0, 1, 2, 3] = 2.0  # other class, kept by class-wise NMS
    p3.regression[0, :, 2, 2] = torch.tensor([2.0, 2.0, 2.0, 2.0])
    p3.regression[0, :, 2, 3] = torch.tensor([2.5, 2.0, 1.5, 2.0])
    p3.logits[0, 0, 6, 6] = -2.9  # cls 0.052 passes the 0.05 threshold
    p3.logits[0, 0, 7, 7] = -3.0  # cls 0.047 does not
    p4.logits[0, 1, 0, 0] = 0.0  # far away, class 1, on P4
    outputs = select_detections([p3, p4], cfg, score_mode="sqrt")

    assert outputs.num_dets.tolist() == [3, 0]  # capped at max_detections=3; image 1 has nothing
    cls = torch.sigmoid(torch.tensor([3.0, 2.0, 0.0]))
    ctr = torch.sigmoid(torch.tensor(20.0))
    assert torch.allclose(outputs.scores[0], torch.sqrt(cls * ctr), atol=1e-6)
    assert outputs.classes[0].tolist() == [0, 1, 1]
    # Box = location +- ltrb * stride; cell (row 2, col 2) of P3 sits at (20, 20).
    assert outputs.boxes[0, 0].tolist() == [4.0, 4.0, 36.0, 36.0]
    assert outputs.boxes[0, 1].tolist() == [8.0, 4.0, 40.0, 36.0]  # location (28, 20)
    assert outputs.boxes[0, 2].tolist() == [-8.0, -8.0, 24.0, 24.0]  # P4 cell (0,0) at (8,8), ltrb*16
    assert outputs.extras[0, :, 0].tolist() == [18.0, 19.0, 0.0]  # carried from the right location
    assert bool((outputs.boxes[1] == 0).all()) and bool((outputs.scores[1] == 0).all())

    product = select_detections([p3, p4], cfg, score_mode="product")
    assert torch.allclose(product.scores[0], cls * ctr, atol=1e-6)


def test_inference_with_no_candidates_anywhere() -> None:
    cfg = HeadConfig(strides=[8, 16], sizes_of_interest=[64])
    outputs = select_detections([_level(3, 2, 8, 8), _level(3, 2, 4, 16)], cfg, score_mode="sqrt")
    assert outputs.num_dets.tolist() == [0, 0, 0]
    assert outputs.boxes.shape == (3, cfg.max_detections, 4)
