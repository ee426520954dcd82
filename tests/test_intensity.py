"""The intensity contract: whatever a microscope file holds, the percentile rule gives the 8-bit image the
model was trained on; the photo rule keeps PIL's 8-bit RGB."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile
from PIL import Image

from model.intensity import UnsupportedPixels, decode_rgb8, grey_plane, read_pixels, stretch_to_uint8
from training.nucleus import HELA_IMAGES, resource


@pytest.fixture(scope="module")
def raw_field() -> np.ndarray:
    """A real HeLa field as the microscope wrote it: uint16, a 12-bit signal on an offset of ~33,000."""
    return tifffile.imread(resource(HELA_IMAGES), key=0)[:256, :384]


def tiff_bytes(array: np.ndarray, **kwargs) -> bytes:
    out = io.BytesIO()
    tifffile.imwrite(out, array, **kwargs)
    return out.getvalue()


def png_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def test_every_encoding_of_a_field_gives_the_image_the_model_was_trained_on(raw_field: np.ndarray) -> None:
    """Raw 16-bit TIFF, the same signal as 12 bits in a 16-bit PNG, float32 TIFF, an already stretched 8-bit
    PNG and an RGB photo of it: all within one or two grey levels of the stretched raw field."""
    expected = stretch_to_uint8(raw_field, 1.0, 99.8)
    twelve_bit = ((raw_field.astype(np.int64) - raw_field.min()) * 16).astype(np.uint16)  # no offset, left-aligned
    encodings = {
        "raw uint16 tiff": tiff_bytes(raw_field),
        "12-bit in 16-bit png": png_bytes(twelve_bit),
        "float32 tiff": tiff_bytes(raw_field.astype(np.float32) / 65535),
        "stretched 8-bit png": png_bytes(expected),
        "rgb 8-bit png": png_bytes(np.repeat(expected[..., None], 3, axis=2)),
    }
    for name, data in encodings.items():
        image = decode_rgb8(data, "percentile")
        assert image.shape == (*raw_field.shape, 3) and image.dtype == np.uint8, name
        assert (image[..., 0] == image[..., 2]).all(), name
        difference = np.abs(image[..., 0].astype(int) - expected)
        assert difference.max() <= 2 and difference.mean() < 0.5, (name, difference.max(), difference.mean())
    assert 0 < expected.mean() < 128 and expected.max() == 255  # really stretched, not a flat grey


def test_photo_rule_divides_16_bit_by_257_as_before(raw_field: np.ndarray) -> None:
    image = decode_rgb8(png_bytes(raw_field), "rgb8")
    assert (image[..., 1] == np.clip(np.round(raw_field / 257.0), 0, 255)).all()
    flat = image[..., 0].astype(int)
    assert flat.max() - flat.min() < 20  # the flat grey a 16-bit microscope file becomes without the percentile rule


def test_channel_rule(raw_field: np.ndarray) -> None:
    stack = np.stack([raw_field, raw_field // 2, np.zeros_like(raw_field)])  # ImageJ order [C, H, W]
    data = tiff_bytes(stack, photometric="minisblack")
    assert read_pixels(data).shape == (3, *raw_field.shape)
    chosen = decode_rgb8(data, "percentile", channel=0)
    assert (chosen == decode_rgb8(tiff_bytes(raw_field), "percentile")).all()
    averaged = grey_plane(np.moveaxis(stack, 0, -1))  # [H, W, C] too
    assert np.allclose(averaged, stack.astype(np.float32).mean(axis=0))
    rgba = np.dstack([raw_field.astype(np.float32)] * 3 + [np.zeros_like(raw_field, np.float32)])
    assert np.allclose(grey_plane(rgba), raw_field)  # alpha ignored
    with pytest.raises(UnsupportedPixels, match="channel 5"):
        decode_rgb8(data, "percentile", channel=5)
    with pytest.raises(UnsupportedPixels, match="single plane"):
        decode_rgb8(tiff_bytes(np.stack([raw_field] * 7), photometric="minisblack"), "percentile")


def test_constant_and_single_pixel_images_do_not_divide_by_zero() -> None:
    for array in (np.full((1, 1), 40000, np.uint16), np.full((5, 7), 3.0, np.float32)):
        image = decode_rgb8(tiff_bytes(array), "percentile")
        assert image.shape == (*array.shape, 3) and (image == 0).all()
