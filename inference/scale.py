"""The caller scale of an image: from an object diameter the caller gives, or estimated (``scale=auto``).

A model records its training objects' median box side at its own input size (the contract's
``object_size``, input pixels). An object of ``d`` image pixels appears ``d * per_pixel`` input pixels wide,
where ``per_pixel`` is the input pixels per image pixel at the caller's scale; the scale that brings it to
the training size is ``object_size / (d * per_pixel at scale 1)``. ``scale=auto`` measures ``d`` as the median
confident box of boxes-only probe passes at a few scales and believes one of them (``choose_estimate``); too few
confident objects, probes that all disagree with themselves, or a contract without an object size give no
estimate (the caller keeps its scale).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from model.input_contract import SCALE_LIMITS, InputContract

# The first pass's detections at least this confident, and at least this many of them.
AUTO_MIN_SCORE = 0.3
AUTO_MIN_OBJECTS = 3
# A detection supports a probe's scale when its size at that scale is within this factor of the training
# objects' (at the right scale, the image's objects look like the training objects).
SUPPORT_FACTOR = 2.0
# How much a probe's support counts against its self-agreement when choosing the probe to believe: an e-fold
# less support weighs as much as an estimate a quarter of an e-fold (1.28x) from the probe's scale. Chosen on
# the HeLa val fields resampled to 0.33-3x and with photometric changes (``bench.scale_probes``): the probe
# chosen within 1.25x of the ideal scale for 83% of the images with the retrained MEInst (29% when believing
# support alone) and 82-92% with the models bundled before (45-82%).
SUPPORT_WEIGHT = 0.25
# A probe whose estimate is more than this factor from the scale it ran at is not believed even as the best of
# them: where every probe says "not at my scale", none has seen the objects at a size it measures well, and the
# model's own scale is the safer answer. Chosen on the same val sets: with it, the chosen scale lands within
# 1.25x of the ideal for 85% of images with the retrained MEInst (83% without), 95% with the MEInst bundled before
# (92%), and at 1x magnification, where a wrong estimate costs the most, for 90% and 85% (80% and 75%).
MAX_SELF_DISAGREEMENT = 2.0
MIN_SUPPORT = 1e-3  # support below this counts as this (a probe may measure objects none of which is training-sized)


class ChosenScale(NamedTuple):
    scale: float  # within SCALE_LIMITS
    clamped: bool  # the wanted scale lay outside SCALE_LIMITS


def input_pixels_per_image_pixel(contract: InputContract, image_size: tuple[int, int], scale: float = 1.0) -> float:
    """How many input pixels one image pixel of an (H, W) image becomes at caller scale ``scale`` (the
    geometric mean of the two axes, which the size rule's rounding makes differ slightly)."""
    height, width = image_size
    return float(np.sqrt(np.prod(contract.resized_shape(height, width, scale)) / (height * width)))


def clamp(scale: float) -> ChosenScale:
    low, high = SCALE_LIMITS
    return ChosenScale(float(np.clip(scale, low, high)), not low <= scale <= high)


def scale_for_diameter(contract: InputContract, diameter: float, image_size: tuple[int, int]) -> ChosenScale:
    """The caller scale that brings objects ``diameter`` image pixels across to the training objects' size
    (the contract must record ``object_size``)."""
    if contract.object_size is None:
        raise ValueError("the contract records no training object size")
    return clamp(contract.object_size / (diameter * input_pixels_per_image_pixel(contract, image_size)))


def assumed_diameter(contract: InputContract, image_size: tuple[int, int], scale: float) -> float | None:
    """The object diameter (image pixels) an image run at ``scale`` is assumed to have: the one the training
    size corresponds to; None without a recorded object size."""
    if contract.object_size is None:
        return None
    return contract.object_size / input_pixels_per_image_pixel(contract, image_size, scale)


def estimate_scale(
    contract: InputContract, boxes: np.ndarray, scores: np.ndarray, image_size: tuple[int, int]
) -> ChosenScale | None:
    """The caller scale at which the median confident detection of a first pass (``boxes`` xyxy in image pixels
    and ``scores``, at whatever scale the pass ran, on an image of ``image_size`` (H, W)) would have the
    training objects' median size, within ``SCALE_LIMITS``; None when the contract records no object size or
    the pass found fewer than ``AUTO_MIN_OBJECTS`` objects scoring at least ``AUTO_MIN_SCORE``."""
    if contract.object_size is None:
        return None
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)[np.asarray(scores) >= AUTO_MIN_SCORE]
    if len(boxes) < AUTO_MIN_OBJECTS:
        return None
    sides = np.sqrt(np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None))
    diameter = float(np.median(sides))
    if diameter <= 0:
        return None
    return scale_for_diameter(contract, diameter, image_size)


class ProbeEvidence(NamedTuple):
    """What one ``scale=auto`` probe says: the scale it implies, and how strongly."""

    scale: float  # the caller scale the probe ran at
    estimate: ChosenScale | None  # the scale its median confident object implies (``estimate_scale``)
    support: float  # summed score of its confident detections sized like the training objects, per input megapixel


def probe_evidence(
    contract: InputContract, boxes: np.ndarray, scores: np.ndarray, region_size: tuple[int, int], scale: float
) -> ProbeEvidence:
    """The evidence of a probe at caller scale ``scale`` over a region of ``region_size`` (H, W) image pixels
    (``boxes`` xyxy in image pixels). Support is per input megapixel, so probes of different sizes compare."""
    estimate = estimate_scale(contract, boxes, scores, region_size)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64)
    per_pixel = input_pixels_per_image_pixel(contract, region_size, scale)
    sides = np.sqrt(np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None))
    object_size = contract.object_size or 1.0
    with np.errstate(divide="ignore"):
        sized = (scores >= AUTO_MIN_SCORE) & (np.abs(np.log(sides * per_pixel / object_size)) <= np.log(SUPPORT_FACTOR))
    input_megapixels = region_size[0] * region_size[1] * per_pixel**2 / 1e6
    return ProbeEvidence(scale, estimate, float(scores[sized].sum()) / max(input_megapixels, 1e-9))


def choose_estimate(evidence: list[ProbeEvidence]) -> ProbeEvidence | None:
    """The probe to believe: the one that agrees with itself, its estimate closest to the scale it ran at (at
    the right scale, the objects look like the training objects, and the probe measures no change), with
    support as the tie-breaker (``SUPPORT_WEIGHT`` per e-fold below the best probe's support); the earlier one
    on a tie; None when no probe measured objects, or when even that probe's estimate is more than
    ``MAX_SELF_DISAGREEMENT`` from its own scale. Support alone is not enough: a model trained with wide scale
    jitter finds objects shrunk threefold confidently and densely per input pixel, and measures them small
    (``bench.scale_probes``)."""
    measured = [probe for probe in evidence if probe.estimate is not None]
    if not measured:
        return None
    best_support = max(max(probe.support for probe in measured), MIN_SUPPORT)

    def self_disagreement(probe: ProbeEvidence) -> float:
        assert probe.estimate is not None
        return float(abs(np.log(probe.estimate.scale / probe.scale)))

    def disagreement(probe: ProbeEvidence) -> float:
        shortfall = np.log(best_support / max(probe.support, MIN_SUPPORT))
        return self_disagreement(probe) + SUPPORT_WEIGHT * float(shortfall)

    best = min(measured, key=lambda probe: (disagreement(probe), evidence.index(probe)))
    if self_disagreement(best) > np.log(MAX_SELF_DISAGREEMENT):
        return None
    return best
