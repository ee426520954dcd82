"""Box-relative mask crops of COCO annotations, as MEInst's codec fit and targets see them.

See docs/methods.md, MEInst: codec."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

from model.meinst.codec import crop_bitmasks


def box_crop_masks(
    segmentation: list[list[float]] | dict[str, Any],
    bbox_xywh: Sequence[float],
    image_h: int,
    image_w: int,
    size: int = 28,
) -> np.ndarray:
    """A COCO segmentation cropped to ``bbox_xywh`` and resampled to a binary ``size x size`` uint8 mask.

    Polygons follow detectron2 ``rasterize_polygons_within_box`` (shift by the box origin, scale by
    size/max(w, 0.1) and size/max(h, 0.1), rasterise with pycocotools), which keeps the crop exact
    instead of resampling a full-image bitmask. RLE (compressed or uncompressed) is decoded and cropped
    with ``crop_bitmasks`` (detectron2 ``BitMasks.crop_and_resize``: roi_align aligned, >= 0.5).
    """
    x, y, w, h = (float(v) for v in bbox_xywh)
    if isinstance(segmentation, list):
        return _rasterize_polygons_within_box(segmentation, x, y, w, h, size)
    if not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
        raise TypeError(f"segmentation must be a polygon list or an RLE dict, got {type(segmentation).__name__}")
    if list(segmentation["size"]) != [image_h, image_w]:
        raise ValueError(f"RLE size {segmentation['size']} differs from the image size {[image_h, image_w]}")
    rle = segmentation
    if isinstance(rle["counts"], list):
        rle = mask_utils.frPyObjects(rle, image_h, image_w)
    bitmask = torch.from_numpy(mask_utils.decode(rle))
    box = torch.tensor([[x, y, x + w, y + h]], dtype=torch.float32)
    return crop_bitmasks(bitmask[None], box, size)[0].to(torch.uint8).numpy()


def _rasterize_polygons_within_box(
    polygons: list[list[float]], x: float, y: float, w: float, h: float, size: int
) -> np.ndarray:
    """Polygons with fewer than 3 points are dropped, as detectron2's COCO loader does (pycocotools
    would read a 4-number list as a box)."""
    scale = np.array([size / max(w, 0.1), size / max(h, 0.1)])
    scaled = [
        ((np.asarray(poly, dtype=np.float64).reshape(-1, 2) - (x, y)) * scale).ravel().tolist()
        for poly in polygons
        if len(poly) >= 6 and len(poly) % 2 == 0
    ]
    if not scaled:
        return np.zeros((size, size), dtype=np.uint8)
    rle = mask_utils.merge(mask_utils.frPyObjects(scaled, size, size))
    return np.ascontiguousarray(mask_utils.decode(rle))
