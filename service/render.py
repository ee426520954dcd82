"""Pictures of a segmentation answer: the image with its instances drawn (overlay) and a 16-bit label image.

Both take the answer as the API gives it (`SegmentResponse`: instances in descending score order with COCO
RLE masks of the original image size), so the service (`render=overlay`, `mask_format=label`) and
`python -m service.predict` draw exactly the same pictures. Masks are decoded one at a time with
pycocotools, outlines traced with OpenCV, and PNGs written by OpenCV.

Label image: uint16 [H, W], 0 background, instance i (1-based, in the answer's order) has value i; where
masks overlap, the higher-scoring instance (the lower value) keeps the pixel. napari, Fiji and scikit-image
read the PNG as-is.
"""

from __future__ import annotations

import colorsys
from collections.abc import Iterator

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from service.schemas import RLE, SegmentResponse

# Instance i's hue is frac(i * golden ratio): neighbours in score order get distant hues. The page
# (service/static/app.js, `instanceColour`) uses the same rule, so its colours match the overlay PNG.
GOLDEN_RATIO_CONJUGATE = 0.618033988749895
COLOUR_SATURATION = 0.85
COLOUR_VALUE = 0.95
FILL_ALPHA = 0.4  # weight of the instance colour in a filled mask pixel
MAX_LABEL = np.iinfo(np.uint16).max
PNG_COMPRESSION = 3  # zlib level: near the smallest files at a fraction of level 9's time


def instance_colours(count: int) -> np.ndarray:
    """[count, 3] uint8 RGB, one distinct colour per instance (instance 0 first)."""
    rgb = [
        colorsys.hsv_to_rgb((i * GOLDEN_RATIO_CONJUGATE) % 1.0, COLOUR_SATURATION, COLOUR_VALUE) for i in range(count)
    ]
    return np.round(np.asarray(rgb, dtype=np.float64).reshape(count, 3) * 255).astype(np.uint8)


def _masks(answer: SegmentResponse) -> Iterator[tuple[int, tuple[int, int], np.ndarray]]:
    """(instance index, (x, y) of the crop, uint8 0/1 crop of the mask to its own bounding box) of every
    instance with a non-empty RLE mask, in answer order; only the crops are worked on afterwards."""
    for index, instance in enumerate(answer.instances):
        if isinstance(instance.segmentation, RLE):
            rle = {"size": list(instance.segmentation.size), "counts": instance.segmentation.counts.encode("ascii")}
            x, y, w, h = (int(v) for v in mask_utils.toBbox(rle))  # the mask's extent, read from the runs
            if w > 0 and h > 0:
                yield index, (x, y), np.ascontiguousarray(mask_utils.decode(rle)[y : y + h, x : x + w])


def _paint(answer: SegmentResponse, trace: bool) -> tuple[np.ndarray, list[tuple[int, list[np.ndarray]]]]:
    """The label image of `answer`'s RLE masks and, if `trace`, each mask's outer contours (image pixels)."""
    if len(answer.instances) > MAX_LABEL:
        raise ValueError(f"{len(answer.instances)} instances do not fit a 16-bit label image (at most {MAX_LABEL})")
    labels = np.zeros((answer.height, answer.width), dtype=np.uint16)
    contours: list[tuple[int, list[np.ndarray]]] = []
    for index, (x, y), mask in _masks(answer):
        region = labels[y : y + mask.shape[0], x : x + mask.shape[1]]  # a view: painting it paints `labels`
        region[(mask != 0) & (region == 0)] = index + 1
        if trace:
            traced = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE, offset=(x, y))[0]
            contours.append((index, list(traced)))
    return labels, contours


def label_image(answer: SegmentResponse) -> np.ndarray:
    """[H, W] uint16: 0 background, instance i (1-based, answer order) = i; the higher score wins overlaps.
    Raises ValueError when an instance has no RLE mask or there are more instances than uint16 holds."""
    if any(not isinstance(i.segmentation, RLE) for i in answer.instances):
        raise ValueError("a label image needs every instance's RLE mask")
    return _paint(answer, trace=False)[0]


def overlay_image(image: np.ndarray, answer: SegmentResponse, *, fill: bool = True, outline: bool = True) -> np.ndarray:
    """`image` ([H, W, 3] uint8 RGB, the original frame) with each instance in its own colour: its RLE mask
    filled translucently and outlined, or, for an instance without a mask (mask_format=none), its box
    outlined. Returns a new array."""
    if image.shape[:2] != (answer.height, answer.width):
        raise ValueError(
            f"image is {image.shape[1]}x{image.shape[0]} but the answer is for {answer.width}x{answer.height}"
        )
    colours = instance_colours(len(answer.instances))
    thickness = max(1, round(min(answer.height, answer.width) / 400))  # visible when the picture is shown whole
    labels, contours = _paint(answer, trace=outline)
    out = image.copy()
    if fill:
        inside = labels > 0
        tint = colours[labels[inside].astype(np.int64) - 1].astype(np.float32)
        out[inside] = np.round(out[inside] * (1 - FILL_ALPHA) + tint * FILL_ALPHA).astype(np.uint8)
    for index, traced in contours:
        cv2.drawContours(out, traced, -1, colours[index].tolist(), thickness)
    for index, instance in enumerate(answer.instances):
        if instance.segmentation is None:
            x, y, w, h = instance.bbox
            cv2.rectangle(
                out, (round(x), round(y)), (round(x + w) - 1, round(y + h) - 1), colours[index].tolist(), thickness
            )
    return out


def png_bytes(array: np.ndarray) -> bytes:
    """PNG of an [H, W, 3] uint8 RGB image or an [H, W] uint8/uint16 single-channel image."""
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:
        raise ValueError(f"OpenCV could not encode a {array.dtype} array of shape {array.shape} as PNG")
    return encoded.tobytes()
