"""Image decoding with the file's own sample type, and the intensity rules that turn it into the 8-bit RGB
the graph takes.

Two rules, chosen by a recipe and stored in its checkpoint and graph metadata:

- ``rgb8`` (photo recipes): the image as 8-bit RGB, as PIL converts it; integer grey wider than 8 bits is
  divided by 257 first (PIL alone would clip it at 255). TIFFs PIL cannot read (several 16-bit or float
  channels) are read by tifffile and converted by the same rules.
- ``percentile`` (microscopy recipes, as CSBDeep/StarDist and Cellpose normalise): the image becomes one grey
  channel (the channel rule below), its ``low`` and ``high`` percentiles map to 0 and 255, values outside
  are clipped, and the grey is repeated into R, G and B. A raw 16-bit camera file, a 12-bit signal in 16
  bits on an offset, a float32 TIFF and an already stretched 8-bit PNG of the same field all come out
  (almost) the same, which is what the model was trained on: training applies the very same function to
  every training image.

Channel rule (``percentile``): a 2-D image is the grey channel. An image with channels, ``[H, W, C]`` (C <= 4,
as PIL and most TIFF writers store colour) or ``[C, H, W]`` (C <= 4, as ImageJ stores channels), gives
channel ``channel`` when one is asked for, else the mean of its colour channels (an alpha channel, the
fourth of four or the second of two in PIL's RGBA/LA modes, is ignored). Stacks (Z, time) are refused:
send one plane.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import numpy as np
import tifffile
from PIL import Image, ImageOps

IntensityRule = Literal["rgb8", "percentile"]
DEFAULT_PERCENTILES = (1.0, 99.8)
# Percentiles of larger images are estimated on a regular grid of about this many pixels (bounded time on
# 40-megapixel fields; the estimate moves a percentile by far less than one output grey level).
PERCENTILE_SAMPLES = 1 << 20
MAX_CHANNELS = 4
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders


class UnsupportedPixels(ValueError):
    """A decoded image the intensity rules cannot turn into one 2-D plane (a stack, too many channels)."""


def is_tiff(data: bytes) -> bool:
    return data[:4] in TIFF_MAGIC


def read_pixels(source: bytes | str | Path) -> np.ndarray:
    """Decode a still image with its own sample type: ``[H, W]`` grey or ``[H, W, C]`` / ``[C, H, W]`` with
    channels, as stored (uint8, uint16, int32, float32...). TIFFs are read by tifffile (any sample type and
    channel count; the file's first series, so an ImageJ-style channel stack comes back ``[C, H, W]``); other
    formats by PIL in their displayed (EXIF) orientation, palette images expanded to RGB."""
    data = Path(source).read_bytes() if isinstance(source, (str, Path)) else source
    if is_tiff(data):
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            return np.asarray(tif.series[0].asarray())
    with Image.open(io.BytesIO(data)) as opened:
        image = ImageOps.exif_transpose(opened)
        if image.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1"):
            image = image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB")
        return np.asarray(image)


def grey_plane(pixels: np.ndarray, channel: int | None = None) -> np.ndarray:
    """The one grey plane of ``pixels`` by the channel rule (float32 unless a single plane is taken as is)."""
    if pixels.ndim == 2:
        planes = pixels[None]
    elif pixels.ndim == 3 and pixels.shape[-1] <= MAX_CHANNELS:
        planes = np.moveaxis(pixels, -1, 0)
    elif pixels.ndim == 3 and pixels.shape[0] <= MAX_CHANNELS:
        planes = pixels
    else:
        raise UnsupportedPixels(
            f"expected one 2-D image with at most {MAX_CHANNELS} channels, got an array of shape {pixels.shape}: "
            "send a single plane"
        )
    if channel is not None:
        if not 0 <= channel < len(planes):
            raise UnsupportedPixels(f"channel {channel} asked for, but the image has {len(planes)} channel(s)")
        return planes[channel]
    colour = planes[:3] if len(planes) == 4 else planes[:1] if len(planes) == 2 else planes  # drop alpha
    return colour[0] if len(colour) == 1 else colour.astype(np.float32).mean(axis=0)


def percentile_range(plane: np.ndarray, low: float, high: float) -> tuple[float, float]:
    """The ``low`` and ``high`` percentiles of a plane's values (a regular sample of large planes)."""
    step = max(1, int(np.sqrt(plane.size / PERCENTILE_SAMPLES)))
    sample = plane[::step, ::step]
    lo, hi = np.percentile(sample, [low, high])
    return float(lo), float(hi)


def stretch_to_uint8(plane: np.ndarray, low: float, high: float) -> np.ndarray:
    """``[H, W]`` uint8: the ``low``/``high`` percentiles of ``plane`` map to 0/255, clipped outside."""
    lo, hi = percentile_range(plane, low, high)
    scaled = (plane.astype(np.float32) - np.float32(lo)) / np.float32(max(hi - lo, 1e-6))
    return np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def rgb8_from_pixels(pixels: np.ndarray) -> np.ndarray:
    """The photo rule on decoded pixels, as PIL converts to RGB: ``[H, W, 3]`` uint8 (grey replicated, alpha
    dropped, integer samples wider than 8 bits divided by 257, floats clipped to 0-255)."""
    if pixels.ndim == 3 and pixels.shape[-1] > MAX_CHANNELS and pixels.shape[0] <= MAX_CHANNELS:
        pixels = np.moveaxis(pixels, 0, -1)  # [C, H, W] as ImageJ writes channels
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or pixels.shape[-1] > MAX_CHANNELS:
        raise UnsupportedPixels(
            f"expected one 2-D image with at most {MAX_CHANNELS} channels, got shape {pixels.shape}"
        )
    channels = pixels.shape[-1]
    pixels = pixels[..., :3] if channels == 4 else pixels[..., :1] if channels == 2 else pixels
    if pixels.dtype == np.uint8:
        values = pixels
    elif np.issubdtype(pixels.dtype, np.floating):
        values = np.clip(np.round(np.nan_to_num(pixels)), 0, 255).astype(np.uint8)
    else:
        values = np.clip(np.round(pixels.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(values, 3, axis=-1) if values.shape[-1] == 1 else values)


def load_rgb(source: str | Path | IO[bytes]) -> Image.Image:
    """The photo rule through PIL: any still image PIL reads (a path or a binary file object) -> 8-bit RGB in
    its displayed orientation. PIL's own conversion clips 16-bit grey to 255, so integer grey ("I;16", or
    "I" as some decoders report 16-bit files) is divided by 257 first."""
    with Image.open(source) as opened:
        image = ImageOps.exif_transpose(opened)
        if image.mode == "I" or image.mode.startswith("I;16"):
            values = np.asarray(image, dtype=np.float64)
            image = Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8))
        return image.convert("RGB")


@dataclass(frozen=True)
class Decoded:
    """One image file decoded by an intensity rule: what the model reads, and what it was read from."""

    rgb: np.ndarray  # [H, W, 3] uint8 by the rule
    plane: np.ndarray  # [H, W] the values the rule read, in the file's own sample type (the photo rule: grey)
    colour_spread: float  # how far the colour channels differ (0 for grey; see ``colour_spread``)


def colour_spread(pixels: np.ndarray) -> float:
    """The mean absolute difference of an RGB(A) image's colour channels from their mean, as a share of the
    image's value range: 0 for grey (one channel, or equal channels), about 0.1 and up for colour photos."""
    if pixels.ndim != 3 or pixels.shape[-1] < 3 or pixels.shape[-1] > MAX_CHANNELS:
        return 0.0
    step = max(1, int(np.sqrt(pixels.shape[0] * pixels.shape[1] / PERCENTILE_SAMPLES)))
    colour = pixels[::step, ::step, :3].astype(np.float32)
    spread = float(np.abs(colour - colour.mean(axis=-1, keepdims=True)).mean())
    return spread / max(float(colour.max() - colour.min()), 1e-6)


def decode(
    data: bytes,
    rule: IntensityRule,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    channel: int | None = None,
) -> Decoded:
    """Image file bytes -> the model's RGB by the recipe's intensity rule, with the plane it read and how
    colourful the file is (the one function training, evaluation, the export checks and the service call)."""
    if rule == "rgb8" and channel is None:
        try:
            rgb = np.asarray(load_rgb(io.BytesIO(data)))
            return Decoded(rgb, rgb.mean(axis=-1, dtype=np.float32), colour_spread(rgb))
        except Exception:
            if not is_tiff(data):
                raise
    pixels = read_pixels(data)
    spread = colour_spread(pixels) if channel is None else 0.0
    if rule == "percentile":
        plane = grey_plane(pixels, channel)
        return Decoded(to_rgb8(plane, rule, percentiles), plane, spread)
    rgb = to_rgb8(pixels, rule, percentiles, channel)
    return Decoded(rgb, grey_plane(pixels, channel) if channel is not None else rgb.mean(axis=-1), spread)


def decode_rgb8(
    data: bytes,
    rule: IntensityRule,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    channel: int | None = None,
) -> np.ndarray:
    """Image file bytes -> ``[H, W, 3]`` uint8 RGB by the recipe's intensity rule (``decode``'s ``rgb``)."""
    return decode(data, rule, percentiles, channel).rgb


def to_rgb8(
    pixels: np.ndarray,
    rule: IntensityRule,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    channel: int | None = None,
) -> np.ndarray:
    """Decoded pixels (``read_pixels``) -> ``[H, W, 3]`` uint8 RGB by the recipe's intensity rule."""
    if rule == "rgb8":
        return rgb8_from_pixels(pixels if channel is None else grey_plane(pixels, channel))
    if rule != "percentile":
        raise ValueError(f"unknown intensity rule {rule!r}")
    grey = stretch_to_uint8(grey_plane(pixels, channel), *percentiles)
    return np.repeat(grey[..., None], 3, axis=-1)
