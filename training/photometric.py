"""Photometric changes on a microscope image's raw intensities: how another microscope's image of a field differs.

Training applies them before the intensity rule (``model.intensity``) stretches the image, so that they act
on raw values the way another instrument differs, and ``training.shifted`` writes fixed versions of them as
tuning sets. The changes, in the order an image forms:

1. ``gamma``: the signal above background raised to a power (another stain or fluorophore, a non-linear
   camera or export);
2. ``blur_sigma``: a Gaussian blur in image pixels (another objective's point spread, defocus);
3. ``background`` + ``background_ramp``: an offset plus a linear ramp across the image in a random direction
   (haze, autofluorescence, uneven illumination);
4. ``photons`` + ``read_noise``: the image as a camera that collects ``photons`` at the signal level would
   count it (Poisson) plus Gaussian read noise: a dimmer, noisier instrument.

Strengths are in units of the image's signal range, its 1st to 99.8th percentile (the default percentiles of
the intensity rule), so one setting means the same on a 12-bit signal on an offset of 33,000 and on an 8-bit
image. The result keeps the input's dtype: integers are rounded and clipped to their type's range (a camera
saturates), floats are left unclipped. A pure offset or gain alone would be undone by the percentile stretch;
they matter here through the ramp, the noise they come with, clipping and rounding.

They act on the source pixels, before any resize: exact for a microscope of the training data's pixel size,
an approximation (blur and noise at the source grid, not the other microscope's) for the scale jitter's other
magnifications.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from model.config import PhotometricConfig
from model.intensity import DEFAULT_PERCENTILES, percentile_range


@dataclass(frozen=True)
class PhotometricChange:
    """One drawn set of changes; the defaults change nothing."""

    gamma: float = 1.0
    blur_sigma: float = 0.0
    background: float = 0.0
    background_ramp: float = 0.0
    ramp_angle: float = 0.0  # direction of the ramp's rise, radians (0: towards +x)
    photons: float | None = None  # None: no Poisson draw
    read_noise: float = 0.0

    @property
    def identity(self) -> bool:
        """Whether the change leaves every pixel as it is (the ramp's direction alone changes nothing)."""
        return (
            self.gamma == 1.0
            and self.blur_sigma == 0.0
            and self.background == 0.0
            and self.background_ramp == 0.0
            and self.photons is None
            and self.read_noise == 0.0
        )


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def draw_change(config: PhotometricConfig, rng: np.random.Generator) -> PhotometricChange:
    """The changes for one training image: each applied with its probability, its strength from its range.

    Every value is drawn whether or not its change applies, so that one change's probability never shifts the
    others' draws (a config that turns one change off still sees the same draws for the rest)."""
    use = rng.random(4) < np.array([config.gamma_prob, config.blur_prob, config.background_prob, config.noise_prob])
    gamma = _log_uniform(rng, *config.gamma)
    sigma = float(rng.uniform(*config.blur_sigma))
    offset, ramp, angle = (
        float(rng.uniform(*config.background)),
        float(rng.uniform(*config.background_ramp)),
        float(rng.uniform(0.0, 2 * np.pi)),
    )
    photons, read_noise = _log_uniform(rng, *config.photons), float(rng.uniform(*config.read_noise))
    return PhotometricChange(
        gamma=gamma if use[0] else 1.0,
        blur_sigma=sigma if use[1] else 0.0,
        background=offset if use[2] else 0.0,
        background_ramp=ramp if use[2] else 0.0,
        ramp_angle=angle if use[2] else 0.0,
        photons=photons if use[3] else None,
        read_noise=read_noise if use[3] else 0.0,
    )


def apply_change(plane: np.ndarray, change: PhotometricChange, rng: np.random.Generator) -> np.ndarray:
    """``plane`` (one ``[H, W]`` grey plane of raw values) with ``change`` applied; same shape and dtype.

    ``rng`` draws the noise. An identity change returns ``plane`` itself."""
    if plane.ndim != 2:
        raise ValueError(f"expected one [H, W] plane, got shape {plane.shape}")
    if change.identity:
        return plane
    low, high = percentile_range(plane, *DEFAULT_PERCENTILES)
    span = max(high - low, 1e-6)
    signal = (plane.astype(np.float32) - np.float32(low)) / np.float32(span)  # ~0 background, ~1 bright nuclei
    if change.gamma != 1.0:
        # Values below the background estimate (noise) stay linear: a power of a negative number is undefined.
        above = signal > 0
        signal[above] = signal[above] ** np.float32(change.gamma)
    if change.blur_sigma > 0:
        signal = np.asarray(
            cv2.GaussianBlur(signal, (0, 0), change.blur_sigma, borderType=cv2.BORDER_REFLECT), dtype=np.float32
        )
    if change.background > 0 or change.background_ramp > 0:
        signal += np.float32(change.background) + np.float32(change.background_ramp) * _ramp(
            plane.shape, change.ramp_angle
        )
    if change.photons is not None:
        # The signal level collects `photons`; darker pixels proportionally fewer (none below the background).
        counts = rng.poisson(np.clip(signal, 0.0, None) * change.photons)
        signal = (counts / change.photons).astype(np.float32)
    if change.read_noise > 0:
        signal += rng.normal(0.0, change.read_noise, size=signal.shape).astype(np.float32)
    values = signal * np.float32(span) + np.float32(low)
    if np.issubdtype(plane.dtype, np.integer):
        info = np.iinfo(plane.dtype)
        return np.clip(np.round(values), info.min, info.max).astype(plane.dtype)
    return values.astype(plane.dtype)


def _ramp(shape: tuple[int, int], angle: float) -> np.ndarray:
    """``[H, W]`` float32 rising linearly from 0 to 1 across the image in the direction ``angle``."""
    height, width = shape
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    along = xs * np.float32(np.cos(angle)) + ys * np.float32(np.sin(angle))
    extent = float(along.max() - along.min())
    return (along - along.min()) / np.float32(extent) if extent > 0 else np.zeros(shape, np.float32)
