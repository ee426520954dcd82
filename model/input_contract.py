"""The input contract's pure image functions (numpy/PIL, no torch): what training, evaluation and the service
all do to an image before the graph sees it. The service imports them without loading torch."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps


def resized_shape(height: int, width: int, short_edge: int, max_size: int) -> tuple[int, int]:
    """detectron2 ResizeShortestEdge: shorter side to ``short_edge``, longer side at most ``max_size``."""
    scale = short_edge / min(height, width)
    new_h, new_w = height * scale, width * scale
    if max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return int(new_h + 0.5), int(new_w + 0.5)


def load_rgb(path: str) -> Image.Image:
    """Decode any still image to 8-bit RGB in its displayed orientation.

    PIL's own conversion clips 16-bit grey to 255, so integer grey ("I;16", or "I" as some decoders
    report 16-bit files) is rescaled from the 16-bit range to 8 bits first.
    """
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        if image.mode == "I" or image.mode.startswith("I;16"):
            values = np.asarray(image, dtype=np.float64)
            image = Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8))
        return image.convert("RGB")
