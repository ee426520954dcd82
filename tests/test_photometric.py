"""Photometric changes on raw intensities (training.photometric): what each does, dtype and range kept, draws."""

from __future__ import annotations

import numpy as np
import pytest

from model.config import PhotometricConfig
from model.intensity import percentile_range, stretch_to_uint8
from training.photometric import PhotometricChange, apply_change, draw_change


def _field(dtype: type = np.uint16) -> np.ndarray:
    """A raw field like HeLa's: a 12-bit signal (two bright discs) on an offset of 33,000 with camera noise;
    the same picture scaled into 8 bits or float for the other dtypes."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:96, 0:128]
    signal = 1500.0 * (((ys - 40) ** 2 + (xs - 40) ** 2) < 15**2) + 700.0 * (((ys - 60) ** 2 + (xs - 95) ** 2) < 12**2)
    raw = 33000.0 + signal + rng.normal(0, 20, signal.shape)
    if dtype == np.uint8:
        return np.clip(np.round(5 + (raw - 33000) / 14), 0, 255).astype(np.uint8)
    return np.round(raw).astype(dtype) if dtype != np.float32 else raw.astype(np.float32)


CHANGES = [
    PhotometricChange(gamma=0.5),
    PhotometricChange(gamma=2.0),
    PhotometricChange(blur_sigma=2.0),
    PhotometricChange(background=1.0, background_ramp=0.5, ramp_angle=1.0),
    PhotometricChange(photons=30.0, read_noise=0.05),
]


@pytest.mark.parametrize("dtype", [np.uint16, np.uint8, np.float32])
@pytest.mark.parametrize("change", CHANGES, ids=lambda c: next(k for k, v in vars(c).items() if v not in (1.0, 0.0)))
def test_changes_keep_shape_and_dtype_and_the_nuclei(dtype: type, change: PhotometricChange) -> None:
    plane = _field(dtype)
    changed = apply_change(plane, change, np.random.default_rng(1))
    assert changed.shape == plane.shape and changed.dtype == plane.dtype
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        assert info.min <= changed.min() and changed.max() <= info.max
    # After the model's percentile stretch the bright nucleus still stands out from the background.
    stretched = stretch_to_uint8(changed, 1.0, 99.8).astype(float)
    assert stretched[35:45, 35:45].mean() > stretched[:, 0:10].mean() + 60
    assert not np.array_equal(changed, plane)


def test_identity_and_what_each_change_does() -> None:
    plane = _field()
    rng = np.random.default_rng(0)
    assert apply_change(plane, PhotometricChange(ramp_angle=2.0), rng) is plane
    low, high = percentile_range(plane, 1.0, 99.8)  # the signal range the changes are measured in

    def relative(values: np.ndarray) -> np.ndarray:
        return (values.astype(float) - low) / (high - low)

    dim = relative(plane[60, 95])  # the dimmer disc, about 0.47 of the signal range
    assert relative(apply_change(plane, PhotometricChange(gamma=2.0), rng)[60, 95]) == pytest.approx(dim**2, abs=0.05)
    blurred = apply_change(plane, PhotometricChange(blur_sigma=2.0), rng)
    assert blurred.astype(float).std() < plane.astype(float).std()
    ramped = relative(apply_change(plane, PhotometricChange(background=1.0, background_ramp=0.5), rng))
    assert ramped[:, :5].mean() == pytest.approx(1.0, abs=0.05) and ramped[:, -5:].mean() == pytest.approx(
        1.5, abs=0.05
    )
    noisy = apply_change(plane, PhotometricChange(photons=30.0), rng)
    assert relative(noisy[32:48, 32:48]).std() == pytest.approx(np.sqrt(30) / 30, rel=0.3)  # Poisson at 30 photons
    again = [apply_change(plane, PhotometricChange(photons=30.0), np.random.default_rng(5)) for _ in range(2)]
    assert np.array_equal(*again)


def test_draws_follow_the_config() -> None:
    never = draw_change(PhotometricConfig(gamma=(0.5, 2.0)), np.random.default_rng(0))
    assert never.identity
    config = PhotometricConfig(
        gamma=(0.5, 2.0), gamma_prob=1.0, blur_sigma=(0.5, 2.0), blur_prob=0.5, photons=(30.0, 3000.0), noise_prob=0.5
    )
    draws = [draw_change(config, np.random.default_rng([3, i])) for i in range(64)]
    assert all(0.5 <= d.gamma <= 2.0 and d.gamma != 1.0 for d in draws)
    assert 10 < sum(d.blur_sigma > 0 for d in draws) < 54 and 10 < sum(d.photons is not None for d in draws) < 54
    assert all(d.background == d.background_ramp == 0.0 for d in draws)
    assert draws[7] == draw_change(config, np.random.default_rng([3, 7]))
    # Turning one change off leaves the others' draws as they were.
    no_blur = [
        draw_change(config.model_copy(update={"blur_prob": 0.0}), np.random.default_rng([3, i])) for i in range(8)
    ]
    assert [(d.gamma, d.photons) for d in no_blur] == [(d.gamma, d.photons) for d in draws[:8]]
