"""The size half of the input contract, applied to one image: the model's input size at a caller's scale
(refused above the pixel limit), the fixed shape buckets images are padded into, and the padded batch.

Every image runs padded (bottom/right, with the contract's padding value) into the smallest of a few fixed
shapes, its bucket, whoever runs it: the service, so that images of different sizes can share a batch, and
evaluation, the predict CLI and the benchmarks, so that they measure what the service answers (the
GroupNorm towers see the padding). An image no bucket holds at its input size is tiled
(``inference.tiling``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from inference.errors import ImageTooLarge
from model.input_contract import InputContract

Bucket = tuple[int, int]
# Default shape buckets: the long side of a landscape bucket as a ratio of the short test side (plus the longest side).
AUTO_BUCKET_RATIOS = (1.0, 4 / 3, 16 / 9)


def shape_buckets(min_size: int, max_size: int, divisibility: int) -> list[Bucket]:
    """The shape buckets of a photo-rule contract: landscape and portrait, the short test side by ratio x
    short (and the longest side), padded to ``divisibility``; sorted by area."""

    def pad(size: float) -> int:
        return math.ceil(size / divisibility) * divisibility

    short, longest = pad(min_size), pad(max_size)
    longs = sorted({min(pad(min_size * ratio), longest) for ratio in AUTO_BUCKET_RATIOS} | {longest})
    landscape = [(short, long) for long in longs]
    return sorted(set(landscape) | {(w, h) for h, w in landscape}, key=lambda hw: (hw[0] * hw[1], hw))


def default_buckets(contract: InputContract) -> list[Bucket]:
    """A model's shape buckets unless configured: ``shape_buckets`` of its test sizes, plus the largest
    square for "scale"-rule (microscopy) contracts, whose fields have no landscape bias; sorted by area."""
    buckets = shape_buckets(contract.min_size, contract.max_size, contract.size_divisibility)
    if contract.resize == "scale":
        side = max(max(b) for b in buckets)
        buckets = sorted(set(buckets) | {(side, side)}, key=lambda hw: (hw[0] * hw[1], hw))
    return buckets


def check_buckets(buckets: Sequence[Bucket], contract: InputContract) -> list[Bucket]:
    """``buckets`` sorted and deduplicated, or a ValueError naming those that are not multiples of the
    contract's size divisibility."""
    bad = [b for b in buckets if b[0] % contract.size_divisibility or b[1] % contract.size_divisibility]
    if bad or not buckets:
        raise ValueError(
            f"shape buckets {bad or '[]'} must be a non-empty list of multiples of {contract.size_divisibility}"
        )
    return sorted(set(buckets), key=lambda hw: (hw[0] * hw[1], hw))


def choose_bucket(buckets: Sequence[Bucket], size: tuple[int, int], divisibility: int) -> Bucket:
    """The smallest bucket (by area) that holds ``size``; an image no bucket holds runs at its own padded
    size (it can then only share a batch with images of that same padded size)."""
    height, width = size
    fitting = [b for b in buckets if b[0] >= height and b[1] >= width]
    if fitting:
        return min(fitting, key=lambda hw: (hw[0] * hw[1], hw))
    return math.ceil(height / divisibility) * divisibility, math.ceil(width / divisibility) * divisibility


def input_size(image_size: tuple[int, int], contract: InputContract, scale: float, max_pixels: int) -> tuple[int, int]:
    """(h, w) the model sees an (H, W) image at, at the caller's ``scale``; ``ImageTooLarge`` when that is more
    pixels than ``max_pixels`` (tiling bounds memory, not work)."""
    height, width = contract.resized_shape(*image_size, scale)
    if height * width > max_pixels:
        raise ImageTooLarge(
            f"at scale {scale:g} the {image_size[1]}x{image_size[0]} image becomes {width}x{height} = "
            f"{width * height} pixels, more than the limit of {max_pixels}; use a smaller scale"
        )
    return height, width


def pad_batch(images: Sequence[np.ndarray], bucket: Bucket, pad_value: Sequence[int]) -> np.ndarray:
    """[B, 3, H, W] uint8: each [3, h, w] image at the top left, the rest ``pad_value``."""
    batch = np.empty((len(images), 3, *bucket), dtype=np.uint8)
    batch[...] = np.asarray(pad_value, dtype=np.uint8)[None, :, None, None]
    for i, pixels in enumerate(images):
        batch[i, :, : pixels.shape[1], : pixels.shape[2]] = pixels
    return batch
