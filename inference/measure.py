"""Per-instance measurements for analysis, as Cellpose and StarDist users export them for Fiji, napari or
pandas: area, centroid, perimeter, eccentricity, and the mean and max intensity of the original image.

scikit-image's ``regionprops`` computes them on each instance's mask, cut to its bounding box (never the whole
frame, so a 40-megapixel field costs what its objects cost), with the plane the model read as the intensity
image: the file's own values (raw 16-bit counts of a microscope, the chosen channel of a multi-channel
image; the grey of a photo), not the 8-bit stretch the model saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from model.finishing import Instance, mask_crop


@dataclass(frozen=True)
class Measurement:
    """One instance's measurements in original image pixels (x right, y down; pixel centres at integers)."""

    area: int  # pixels
    centroid_x: float
    centroid_y: float
    perimeter: float  # pixels, scikit-image's 4-connected contour estimate
    eccentricity: float  # of the ellipse with the same second moments: 0 a circle, towards 1 elongated
    mean_intensity: float  # of the original image's values under the mask
    max_intensity: float


FIELDS = tuple(Measurement.__dataclass_fields__)


def measure(instances: Sequence[Instance], plane: np.ndarray) -> list[Measurement | None]:
    """The measurements of each instance (None where its mask is empty), from its uncompressed counts over the
    frame of ``plane`` ([H, W], the original values). Instances finished without masks cannot be measured."""
    # Imported here, not with the module: scikit-image and the SciPy it loads hold ~30 MB that a service
    # answering without measurements never needs.
    from skimage.measure import regionprops

    measured: list[Measurement | None] = []
    for instance in instances:
        if instance.counts is None:
            raise ValueError("measurements need the instances' masks (mask_format rle or polygon)")
        crop = mask_crop(instance.counts, plane.shape[:2])
        if crop is None:
            measured.append(None)
            continue
        (top, left), mask = crop
        intensity = plane[top : top + mask.shape[0], left : left + mask.shape[1]]
        (region,) = regionprops(mask, intensity_image=intensity)
        y, x = region.centroid
        measured.append(
            Measurement(
                area=int(region.area),
                centroid_x=float(x + left),
                centroid_y=float(y + top),
                perimeter=float(region.perimeter),
                eccentricity=float(region.eccentricity),
                mean_intensity=float(region.intensity_mean),
                max_intensity=float(region.intensity_max),
            )
        )
    return measured
