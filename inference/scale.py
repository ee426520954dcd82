"""The caller scale of an image: from an object diameter the caller gives, or estimated (``scale=auto``).

A model records its training objects' median box side at its own input size (the contract's
``object_size``, input pixels). An object of ``d`` image pixels appears ``d * per_pixel`` input pixels wide,
where ``per_pixel`` is the input pixels per image pixel at the caller's scale; the scale that brings it to
the training size is ``object_size / (d * per_pixel at scale 1)``. ``scale=auto`` measures ``d`` as the median
confident box of a boxes-only first pass at the model's own scale; too few confident objects, or a contract
without an object size, give no estimate (the caller keeps its scale).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from model.input_contract import SCALE_LIMITS, InputContract

# The first pass's detections at least this confident, and at least this many of them.
AUTO_MIN_SCORE = 0.3
AUTO_MIN_OBJECTS = 3


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
