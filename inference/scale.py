"""``scale=auto``: the caller scale that brings an image's objects to the size the model was trained on,
estimated from a boxes-only first pass at the model's own scale.

The checkpoint records the training objects' median box side at the model's input size (the contract's
``object_size``); the first pass measures the median confident box of the image, and the ratio of the two is
the scale. Too few confident objects, or a contract without an object size, give no estimate: the caller
keeps its scale.
"""

from __future__ import annotations

import numpy as np

from model.input_contract import SCALE_LIMITS, InputContract

# The first pass's detections at least this confident, and at least this many of them.
AUTO_MIN_SCORE = 0.3
AUTO_MIN_OBJECTS = 3


def estimate_scale(
    contract: InputContract, boxes: np.ndarray, scores: np.ndarray, image_size: tuple[int, int], scale: float = 1.0
) -> float | None:
    """The caller scale at which the median confident detection of a first pass (``boxes`` xyxy in image pixels
    and ``scores``, run at caller scale ``scale`` on an image of ``image_size`` (H, W)) would have the
    training objects' median size, within ``SCALE_LIMITS``; None when the contract records no object size or
    the pass found fewer than ``AUTO_MIN_OBJECTS`` objects scoring at least ``AUTO_MIN_SCORE``."""
    if contract.object_size is None:
        return None
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)[np.asarray(scores) >= AUTO_MIN_SCORE]
    if len(boxes) < AUTO_MIN_OBJECTS:
        return None
    sides = np.sqrt(np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None))
    height, width = image_size
    per_pixel = np.sqrt(np.prod(contract.resized_shape(height, width, scale)) / (height * width))  # input px / image px
    measured = float(np.median(sides)) * per_pixel
    if measured <= 0:
        return None
    return float(np.clip(scale * contract.object_size / measured, *SCALE_LIMITS))
