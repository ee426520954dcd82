"""The input contract of a model: how an image file becomes the uint8 batch a graph (or the eager model) takes.

One type, ``InputContract``, used by training, evaluation, the exported graph's metadata and the service, so
that every path prepares images the same way:

1. decode to 8-bit RGB by the recipe's intensity rule (``model.intensity``): PIL's 8-bit RGB for photo
   recipes, a per-image percentile stretch of the grey channel for microscopy recipes, whatever the file
   holds (8 or 16 bits, float, one or several channels);
2. size by the recipe's rule (``InputContract.resized_shape``): "shortest_edge" for photos (detectron2's
   ``ResizeShortestEdge`` at test time: the short side to ``min_size``, the long side capped at
   ``max_size``) or "scale" for microscopy at a known pixel size (every image multiplied by ``scale``,
   1.0 for recipes trained at native size). A caller's own scale multiplies either (another
   magnification); ``inference.scale`` estimates one per image (``scale=auto``). PIL bilinear resampling;
3. lay out as ``[3, h, w]`` uint8 RGB and pad bottom/right to multiples of ``size_divisibility`` with
   ``pad_value`` (the rounded pixel mean, so padding normalises to about zero). Images larger than the
   largest shape a server runs are tiled (``inference.tiling``), never shrunk.

The model normalises pixels itself, so the contract ends at uint8. Pure numpy/PIL: no torch at import.
The record is stored as the ``input`` field of ``export.metadata.GraphMetadata``; its JSON field names are
those of graphs already exported, and a field added later needs a default so that those stay readable
(they describe photo-rule, 8-bit RGB models).
"""

from __future__ import annotations

import argparse
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from model.config import Config
from model.intensity import DEFAULT_PERCENTILES, Decoded, IntensityRule, decode


def resized_shape(height: int, width: int, short_edge: float, max_size: float) -> tuple[int, int]:
    """detectron2 ResizeShortestEdge: shorter side to ``short_edge``, longer side at most ``max_size``; at
    least one pixel a side (an image thinner than 1 : max_size would otherwise lose its short side)."""
    scale = short_edge / min(height, width)
    new_h, new_w = height * scale, width * scale
    if max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return max(int(new_h + 0.5), 1), max(int(new_w + 0.5), 1)


def scaled_shape(height: int, width: int, factor: float) -> tuple[int, int]:
    """The "scale" rule: both sides multiplied by ``factor`` and rounded (at least one pixel)."""
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def resize_rgb(image: Image.Image | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An RGB image (PIL, or ``[H, W, 3]`` uint8) resized to ``size`` (h, w) with PIL bilinear: ``[3, h, w]``
    uint8, C-contiguous. An image already at that size is taken as is."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    height, width = size
    resized = image.resize((width, height), Image.Resampling.BILINEAR)
    return np.ascontiguousarray(np.asarray(resized).transpose(2, 0, 1))


# Caller scales accepted (a factor on the rule's own size): a tenth to ten times the magnification.
SCALE_LIMITS = (0.1, 10.0)


def check_scale(scale: float) -> float:
    """``scale`` if it is a usable caller scale, else a ValueError that says why (0, negative, NaN, inf or
    outside ``SCALE_LIMITS``)."""
    low, high = SCALE_LIMITS
    if not low <= scale <= high:  # also false for NaN
        raise ValueError(
            f"scale must be a number from {low:g} to {high:g} (a factor on the model's own size), got {scale}"
        )
    return scale


def parse_scale(text: str) -> float | Literal["auto"]:
    """A caller's scale as written (query parameter, command line): "auto", or a number ``check_scale``
    accepts; else a ValueError that says why."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"scale must be a number or 'auto', got {text!r}") from None
    return check_scale(value)


def scale_argument(text: str) -> float | Literal["auto"]:
    """``--scale`` on a command line: ``parse_scale``, its reason shown as argparse's error."""
    try:
        return parse_scale(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


class InputContract(BaseModel):
    """How a client must prepare ``images``: intensity rule, size rule, layout, padding (see the module
    docstring)."""

    model_config = ConfigDict(extra="forbid")

    layout: Literal["NCHW"] = "NCHW"
    dtype: Literal["uint8"] = "uint8"
    color: Literal["RGB"] = "RGB"
    size_divisibility: int = Field(gt=0)  # padded H and W are multiples of it
    min_size: int = Field(gt=0)  # "shortest_edge": shorter side after resize; smallest shape bucket's side
    max_size: int = Field(gt=0)  # "shortest_edge": longer side at most this; largest shape bucket's side
    pad_value: list[int] = Field(min_length=3, max_length=3)  # RGB
    resize: Literal["shortest_edge", "scale"] = "shortest_edge"
    scale: float = Field(default=1.0, gt=0)  # "scale": input pixels per image pixel
    intensity: IntensityRule = "rgb8"
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES  # "percentile": mapped to 0 and 255
    # Median box side sqrt(w * h) of the training objects at this contract's size (input pixels), for
    # scale=auto; None where the checkpoint does not record it.
    object_size: float | None = Field(default=None, gt=0)

    @classmethod
    def from_config(cls, cfg: Config, object_size: float | None = None) -> InputContract:
        """The test-time contract of a model trained with ``cfg`` (``object_size`` from its checkpoint)."""
        data = cfg.data
        return cls(
            size_divisibility=data.size_divisibility,
            min_size=data.min_size_test,
            max_size=data.max_size_test,
            pad_value=[round(m) for m in cfg.model.pixel_mean],
            resize=data.resize,
            scale=data.scale_test,
            intensity=data.intensity,
            percentiles=tuple(data.percentiles),
            object_size=object_size,
        )

    @property
    def pad_rgb(self) -> tuple[int, int, int]:
        """``pad_value`` as an (R, G, B) tuple."""
        red, green, blue = self.pad_value
        return red, green, blue

    def decode(self, data: bytes, channel: int | None = None) -> np.ndarray:
        """Image file bytes -> ``[H, W, 3]`` uint8 RGB by the intensity rule (``channel``: see
        ``model.intensity``)."""
        return self.read(data, channel).rgb

    def read(self, data: bytes, channel: int | None = None) -> Decoded:
        """``decode``, with the plane the rule read (the file's own values) and how colourful the file is."""
        return decode(data, self.intensity, self.percentiles, channel)

    def resized_shape(self, height: int, width: int, scale: float = 1.0) -> tuple[int, int]:
        """(h, w) the model sees an image of (height, width) at; a caller's ``scale`` multiplies the rule's
        size."""
        if self.resize == "scale":
            return scaled_shape(height, width, self.scale * scale)
        return resized_shape(height, width, self.min_size * scale, self.max_size * scale)

    def resize_image(self, image: Image.Image | np.ndarray, scale: float = 1.0) -> np.ndarray:
        """An RGB image (PIL, or ``[H, W, 3]`` uint8) at the model's input size: [3, h, w] uint8, unpadded."""
        height, width = (image.size[1], image.size[0]) if isinstance(image, Image.Image) else image.shape[:2]
        return resize_rgb(image, self.resized_shape(height, width, scale))
