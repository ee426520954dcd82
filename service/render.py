"""Pictures of a segmentation answer: the image with its instances drawn (overlay) and a label image; and
the image as the model reads it, for display.

The overlay and the label image take the answer as the API gives it (`SegmentResponse`: instances in
descending score order with COCO RLE masks of the original image size), so the service (`render=overlay`,
`mask_format=label`) and `python -m service.predict` draw exactly the same pictures. Masks are decoded one
at a time with pycocotools, outlines traced with OpenCV, PNGs written by OpenCV and TIFFs by tifffile. OpenCV
is imported by the functions that use it: ~16 MB a service answering JSON never needs.

Label image: [H, W], 0 background, instance i (1-based, in the answer's order) has value i; where masks
overlap, the higher-scoring instance (the lower value) keeps the pixel. uint16 up to 65535 instances, uint32
beyond (TIFF only: PNG holds at most 16 bits). napari, Fiji and scikit-image read either file as-is.
"""

from __future__ import annotations

import colorsys
import io
from collections.abc import Iterator

import numpy as np
import tifffile
from pycocotools import mask as mask_utils

from service.schemas import RLE, LabelFormat, SegmentResponse

# Instance i's hue is frac(i * golden ratio): neighbours in score order get distant hues. The page
# (service/static/app.js, `instanceColour`) uses the same rule, so its colours match the overlay PNG.
GOLDEN_RATIO_CONJUGATE = 0.618033988749895
COLOUR_SATURATION = 0.85
COLOUR_VALUE = 0.95
FILL_ALPHA = 0.4  # weight of the instance colour in a filled mask pixel
MAX_UINT16_LABEL = int(np.iinfo(np.uint16).max)
PNG_COMPRESSION = 3  # zlib level: near the smallest files at a fraction of level 9's time
# Label files by format: media type and file suffix. TIFFs are deflate-compressed (label images are mostly
# runs; Python's zlib writes them, no codec package needed) and read by Fiji, napari and scikit-image.
LABEL_MEDIA_TYPES: dict[LabelFormat, str] = {"png": "image/png", "tiff": "image/tiff"}
LABEL_SUFFIXES: dict[LabelFormat, str] = {"png": ".png", "tiff": ".tif"}


class LabelOverflow(ValueError):
    """More instances than the asked label file format holds (a 16-bit PNG above 65535)."""


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
    """The label image of `answer`'s RLE masks (uint16, or uint32 above 65535 instances) and, if `trace`, each
    mask's outer contours (image pixels)."""
    dtype = np.uint16 if len(answer.instances) <= MAX_UINT16_LABEL else np.uint32
    labels = np.zeros((answer.height, answer.width), dtype=dtype)
    contours: list[tuple[int, list[np.ndarray]]] = []
    for index, (x, y), mask in _masks(answer):
        region = labels[y : y + mask.shape[0], x : x + mask.shape[1]]  # a view: painting it paints `labels`
        region[(mask != 0) & (region == 0)] = index + 1
        if trace:
            import cv2

            traced = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE, offset=(x, y))[0]
            contours.append((index, list(traced)))
    return labels, contours


def label_image(answer: SegmentResponse) -> np.ndarray:
    """[H, W] uint16 (uint32 above 65535 instances): 0 background, instance i (1-based, answer order) = i; the
    higher score wins overlaps. Raises ValueError when an instance has no RLE mask."""
    if any(not isinstance(i.segmentation, RLE) for i in answer.instances):
        raise ValueError("a label image needs every instance's RLE mask")
    return _paint(answer, trace=False)[0]


def overlay_image(image: np.ndarray, answer: SegmentResponse, *, fill: bool = True, outline: bool = True) -> np.ndarray:
    """`image` ([H, W, 3] uint8 RGB, the original frame) with each instance in its own colour: its RLE mask
    filled translucently and outlined, or, for an instance without a mask (mask_format=none), its box
    outlined. Returns a new array."""
    import cv2

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


def label_bytes(labels: np.ndarray, label_format: LabelFormat) -> bytes:
    """A label image (``label_image``) as a PNG or TIFF file of its own integer type; ``LabelOverflow`` for a
    uint32 image as PNG."""
    if label_format == "tiff":
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, labels, compression="zlib")
        return buffer.getvalue()
    if labels.dtype != np.uint16:
        raise LabelOverflow(
            f"more than {MAX_UINT16_LABEL} instances do not fit a 16-bit PNG label image: ask for a TIFF "
            "(label_format=tiff), which holds 32 bits"
        )
    return png_bytes(labels)


def display_image(rgb: np.ndarray) -> np.ndarray:
    """The image as the model reads it (``[H, W, 3]`` uint8), for display under the masks: one grey channel
    where R, G and B are equal (the microscopy rule's grey: a third of the PNG), else the RGB itself."""
    grey = rgb[..., 0]
    if np.array_equal(grey, rgb[..., 1]) and np.array_equal(grey, rgb[..., 2]):
        return np.ascontiguousarray(grey)
    return rgb


def png_bytes(array: np.ndarray) -> bytes:
    """PNG of an [H, W, 3] uint8 RGB image or an [H, W] uint8/uint16 single-channel image."""
    import cv2

    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:
        raise ValueError(f"OpenCV could not encode a {array.dtype} array of shape {array.shape} as PNG")
    return encoded.tobytes()
