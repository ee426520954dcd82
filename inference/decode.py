"""Guarded decoding: image file bytes -> the 8-bit RGB array a model reads, by its input contract.

The pixel count is read from the file's header before any pixel is decoded (decompression bombs), EXIF
orientation is applied, and the pixels are converted by the model's intensity rule
(``InputContract.decode``: 8-bit RGB for photo models, a percentile stretch for microscopy models), the same
conversion training applies. Refusals raise the kinds of ``inference.errors``.
"""

from __future__ import annotations

import io
import warnings

import tifffile
from PIL import Image, UnidentifiedImageError

from inference.errors import CorruptImage, ImageTooLarge, UnsupportedImage, UnusableInput
from model.input_contract import InputContract
from model.intensity import Decoded, UnsupportedPixels, is_tiff

# PIL format names read (TIFFs of any sample type go through tifffile).
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")
# Largest decoded image (width x height) by default: about 160 MB of 8-bit RGB.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000


def configure_pil(max_pixels: int) -> None:
    """Make PIL's own bomb guard (process-wide) agree with ours. PIL raises inside ``open`` above twice
    ``MAX_IMAGE_PIXELS`` and only warns above it; ``decode_image`` refuses those itself, so the warning is
    silenced rather than logged for every refused image."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the file's header, no pixel data decoded: TIFFs through tifffile (any sample
    type or channel layout, the first series), other formats through PIL."""
    if is_tiff(data):
        try:
            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                series = tif.series[0]
                return int(series.sizes.get("width", series.shape[-1])), int(
                    series.sizes.get("height", series.shape[-2])
                )
        except Exception as error:  # a header tifffile cannot parse
            raise CorruptImage(f"corrupt TIFF: {error}") from None
    try:
        with Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS) as opened:
            return opened.size
    except UnidentifiedImageError:
        raise UnsupportedImage(f"not a supported image; send one of {', '.join(SUPPORTED_FORMATS)}") from None
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"image has more than {Image.MAX_IMAGE_PIXELS} pixels") from None
    except Exception as error:  # a header the parsers choke on
        raise CorruptImage(f"corrupt image: {error}") from None


def decode_image(
    data: bytes, contract: InputContract, channel: int | None = None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> Decoded:
    """One still image by the model's intensity rule, in its displayed orientation: its ``[H, W, 3]`` uint8 RGB,
    the plane of original values it was read from, and how colourful the file is (``model.intensity``).

    Raises ``UnsupportedImage`` for anything that is not a supported image, ``ImageTooLarge`` above
    ``max_pixels``, ``CorruptImage`` for empty, corrupt or truncated data and ``UnusableInput`` for pixels
    the rule cannot use (a stack, a missing channel)."""
    if not data:
        raise CorruptImage("empty body: send the image bytes")
    width, height = image_size(data)
    if width * height > max_pixels:
        raise ImageTooLarge(f"image is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}")
    if width < 1 or height < 1:
        raise CorruptImage(f"image has no pixels ({width}x{height})")
    try:
        return contract.read(data, channel)
    except UnsupportedPixels as error:
        raise UnusableInput(str(error)) from None
    except Exception as error:  # truncated or corrupt pixel data, or a mode that cannot become RGB
        raise CorruptImage(f"could not decode image: {error}") from None
