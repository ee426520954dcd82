"""Request images: guarded decoding, the model's test-size resize, and fixed shape buckets.

Decoding checks the pixel count from the header before any pixel data is decoded (decompression bombs)
and applies EXIF orientation, then converts by the graph's intensity rule exactly as training and
evaluation do (``InputContract.decode``); the resize is the graph's ``InputContract.resize_image`` (its size
rule times the caller's scale), the one evaluation uses, so the service feeds a graph what evaluation feeds
it. Resized images are padded (bottom/right, with the
graph's padding value) into the smallest of a few fixed shapes, so that images of different sizes can
share a batch and every image is always run at the same padded shape, whatever it is batched with.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from model.input_contract import InputContract
from model.intensity import UnsupportedPixels, is_tiff
from model.tiling import contract_buckets
from model.tiling import pad_batch as pad_batch  # the batch layout, shared with tiled evaluation

# PIL format names accepted, and the raw-body content types that may carry them.
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")
IMAGE_CONTENT_TYPES = frozenset(
    {
        "image/jpeg",
        "image/jpg",
        "image/png",
        "image/webp",
        "image/bmp",
        "image/x-ms-bmp",
        "image/tiff",
        "application/octet-stream",
    }
)


class ImageRejected(Exception):
    """A request image the service will not run; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class PreparedImage:
    pixels: np.ndarray  # [3, h, w] uint8 RGB at the model's input size (unpadded)
    original_size: tuple[int, int]  # (H, W) as displayed (after EXIF orientation)
    bucket: tuple[int, int]  # padded (H, W) the image runs at

    @property
    def input_size(self) -> tuple[int, int]:
        return int(self.pixels.shape[1]), int(self.pixels.shape[2])


def configure_pil(max_pixels: int) -> None:
    """Make PIL's own bomb guard (process-wide) agree with ours. PIL raises inside ``open`` above twice
    ``MAX_IMAGE_PIXELS`` and only warns above it; ``decode_image`` rejects those itself, so the warning is
    silenced rather than logged for every rejected request."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the file's header, no pixel data decoded: TIFFs through tifffile (any sample
    type or channel layout, the first series), other formats through PIL. Raises ``ImageRejected``."""
    if is_tiff(data):
        try:
            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                series = tif.series[0]
                return int(series.sizes.get("width", series.shape[-1])), int(
                    series.sizes.get("height", series.shape[-2])
                )
        except Exception as error:  # a header tifffile cannot parse
            raise ImageRejected(400, f"corrupt TIFF: {error}") from None
    try:
        with Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS) as opened:
            return opened.size
    except UnidentifiedImageError:
        raise ImageRejected(415, f"not a supported image; send one of {', '.join(SUPPORTED_FORMATS)}") from None
    except Image.DecompressionBombError:
        raise ImageRejected(413, f"image has more than {Image.MAX_IMAGE_PIXELS} pixels") from None
    except Exception as error:  # a header the parsers choke on
        raise ImageRejected(400, f"corrupt image: {error}") from None


def decode_image(data: bytes, max_pixels: int, rule: InputContract, channel: int | None = None) -> Image.Image:
    """Decode one still image to 8-bit RGB by the model's intensity rule, in its displayed orientation, or
    raise ``ImageRejected``: 415 for anything that is not a supported image, 413 above ``max_pixels``, 400
    for corrupt or truncated data, 422 for pixels the rule cannot use (a stack, a missing channel)."""
    if not data:
        raise ImageRejected(400, "empty body: send the image bytes")
    width, height = image_size(data)
    if width * height > max_pixels:
        raise ImageRejected(
            413, f"image is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}"
        )
    if width < 1 or height < 1:
        raise ImageRejected(400, f"image has no pixels ({width}x{height})")
    try:
        return Image.fromarray(rule.decode(data, channel))
    except UnsupportedPixels as error:
        raise ImageRejected(422, str(error)) from None
    except Exception as error:  # truncated or corrupt pixel data, or a mode that cannot become RGB
        raise ImageRejected(400, f"could not decode image: {error}") from None


def check_input_size(image: Image.Image, rule: InputContract, scale: float, max_pixels: int) -> tuple[int, int]:
    """The model's input size for ``image`` at the caller's ``scale``, or ``ImageRejected`` 413 when that
    is more pixels than ``max_pixels`` (tiling bounds memory, not work)."""
    height, width = rule.resized_shape(image.size[1], image.size[0], scale)
    if height * width > max_pixels:
        raise ImageRejected(
            413,
            f"at scale {scale:g} the {image.size[0]}x{image.size[1]} image becomes {width}x{height} = {width * height} "
            f"pixels, more than the limit of {max_pixels}; use a smaller scale",
        )
    return height, width


def auto_buckets(rule: InputContract) -> list[tuple[int, int]]:
    """Landscape and portrait buckets: the short test side by ratio x short (and the longest side), padded."""
    return contract_buckets(rule)


def choose_bucket(buckets: list[tuple[int, int]], size: tuple[int, int], divisibility: int) -> tuple[int, int]:
    """The smallest bucket (by area) that holds ``size``; an image no bucket holds runs at its own padded
    size (it can then only share a batch with images of that same padded size)."""
    height, width = size
    fitting = [b for b in buckets if b[0] >= height and b[1] >= width]
    if fitting:
        return min(fitting, key=lambda hw: (hw[0] * hw[1], hw))
    return math.ceil(height / divisibility) * divisibility, math.ceil(width / divisibility) * divisibility


def prepare_image(
    image: Image.Image, rule: InputContract, buckets: list[tuple[int, int]], scale: float = 1.0
) -> PreparedImage:
    pixels = rule.resize_image(image, scale)
    bucket = choose_bucket(buckets, (pixels.shape[1], pixels.shape[2]), rule.size_divisibility)
    return PreparedImage(pixels=pixels, original_size=(image.size[1], image.size[0]), bucket=bucket)
