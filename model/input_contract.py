"""The input contract of a model: how a photo becomes the uint8 batch a graph (or the eager model) takes.

One type, ``InputContract``, used by training, evaluation, the exported graph's metadata and the service, so
that every path prepares images the same way:

1. decode to 8-bit RGB in the displayed orientation (``load_rgb``);
2. resize as detectron2's ``ResizeShortestEdge`` at test time: the short side to ``min_size``, the long side
   capped at ``max_size`` (``resized_shape``), with PIL bilinear (``InputContract.resize``);
3. lay out as ``[3, h, w]`` uint8 RGB and pad bottom/right to multiples of ``size_divisibility`` with
   ``pad_value`` (the rounded pixel mean, so padding normalises to about zero).

The model normalises pixels itself, so the contract ends at uint8. Pure numpy/PIL: no torch at import.
The record is stored as the ``input`` field of ``export.metadata.GraphMetadata``; its JSON field names are
those of graphs already exported, and a field added later needs a default so that those stay readable.
"""

from __future__ import annotations

from typing import IO, Literal

import numpy as np
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field

from model.config import Config


def resized_shape(height: int, width: int, short_edge: int, max_size: int) -> tuple[int, int]:
    """detectron2 ResizeShortestEdge: shorter side to ``short_edge``, longer side at most ``max_size``; at
    least one pixel a side (an image thinner than 1 : max_size would otherwise lose its short side)."""
    scale = short_edge / min(height, width)
    new_h, new_w = height * scale, width * scale
    if max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return max(int(new_h + 0.5), 1), max(int(new_w + 0.5), 1)


def resize_rgb(image: Image.Image, short_edge: int, max_size: int) -> np.ndarray:
    """An RGB image resized by ``resized_shape`` with PIL bilinear: [3, h, w] uint8, C-contiguous."""
    width, height = image.size
    new_h, new_w = resized_shape(height, width, short_edge, max_size)
    resized = image.resize((new_w, new_h), Image.BILINEAR)
    return np.ascontiguousarray(np.asarray(resized).transpose(2, 0, 1))


def load_rgb(source: str | IO[bytes]) -> Image.Image:
    """Decode any still image (a path or a binary file object) to 8-bit RGB in its displayed orientation.

    PIL's own conversion clips 16-bit grey to 255, so integer grey ("I;16", or "I" as some decoders
    report 16-bit files) is rescaled from the 16-bit range to 8 bits first.
    """
    with Image.open(source) as opened:
        image = ImageOps.exif_transpose(opened)
        if image.mode == "I" or image.mode.startswith("I;16"):
            values = np.asarray(image, dtype=np.float64)
            image = Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8))
        return image.convert("RGB")


class InputContract(BaseModel):
    """How a client must prepare ``images``: resize rule, layout, padding (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    layout: Literal["NCHW"] = "NCHW"
    dtype: Literal["uint8"] = "uint8"
    color: Literal["RGB"] = "RGB"
    size_divisibility: int = Field(gt=0)  # padded H and W are multiples of it
    min_size: int = Field(gt=0)  # shorter side after resize
    max_size: int = Field(gt=0)  # longer side at most this
    pad_value: list[int] = Field(min_length=3, max_length=3)  # RGB

    @classmethod
    def from_config(cls, cfg: Config) -> InputContract:
        """The test-time contract of a model trained with ``cfg``."""
        return cls(
            size_divisibility=cfg.data.size_divisibility,
            min_size=cfg.data.min_size_test,
            max_size=cfg.data.max_size_test,
            pad_value=[round(m) for m in cfg.model.pixel_mean],
        )

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) the model sees an image of (height, width) at."""
        return resized_shape(height, width, self.min_size, self.max_size)

    def resize(self, image: Image.Image) -> np.ndarray:
        """An RGB image at the model's input size: [3, h, w] uint8, unpadded."""
        return resize_rgb(image, self.min_size, self.max_size)
