"""Tiling of images larger than every shape bucket: plan the tiles, cut them, finish them in the full frame,
and merge their instances into one answer.

An image whose resized size (at the input contract's resize factor s) fits no shape bucket is not shrunk
further: it is cut, in ORIGINAL pixels, into overlapping tiles that each run as one batch element at the
model's own scale. Per axis, with a bucket side T (input pixels) and an overlap O (input pixels), a tile
covers floor(T / s) original pixels and neighbours overlap by at least ceil(O / s); tiles are spread evenly,
so they all have the same size and share one bucket. Each tile is cut from the 8-bit RGB original and
resized by s exactly as a whole image would be (PIL bilinear), and its instances are finished straight into
the full frame (`model.finishing.finish_image` with an origin and a frame size), so no full-frame mask array
ever exists: memory grows with the tile count, not with the image.

Merging keeps each object once:

- ownership: the tiles' cores partition the image (a tile's core is its region minus half the overlap on
  every side that has a neighbour); an instance is kept only by the tile whose core holds its box centre.
  With an overlap at least as large as the largest object, an object cut by one tile's edge lies whole in
  a neighbour, and the cut copy's box centre lies in that neighbour's core too, so it is dropped;
- duplicates: what the core rule lets through twice (a box that shifts its centre across a core boundary)
  is removed by mask IoU between instances of the same class from neighbouring tiles, keeping the higher
  score (pycocotools' RLE IoU, which skips pairs whose mask bounding boxes do not intersect).

numpy, PIL and pycocotools only (no torch); ``inference.pipeline`` runs it for every entry point.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils

from model.finishing import Instance, finish_outputs
from model.input_contract import resize_rgb

# Mask IoU above which two instances of one class from neighbouring tiles are the same object.
DUPLICATE_IOU = 0.5
# Input pixels two neighbouring tiles share: at least the largest object a recipe expects.
DEFAULT_TILE_OVERLAP = 64

Outputs = dict[str, np.ndarray]


@dataclass(frozen=True)
class Tile:
    """One tile: a region of the original image and the size it runs at."""

    grid: tuple[int, int]  # (row, column) in the tile grid
    origin: tuple[int, int]  # (y0, x0): the region's top left corner in original pixels
    size: tuple[int, int]  # (h, w) of the region in original pixels
    input_size: tuple[int, int]  # (h_in, w_in): the region resized by the image's factor, before padding


@dataclass(frozen=True)
class TilePlan:
    """How one image is tiled: every tile runs padded to `bucket`; `row_bounds` / `col_bounds` are the
    core boundaries between neighbouring tile rows / columns (original pixels, ascending)."""

    image_size: tuple[int, int]  # (H, W) original pixels
    bucket: tuple[int, int]  # padded input shape of every tile
    tiles: list[Tile]
    row_bounds: np.ndarray  # float64 [rows - 1]
    col_bounds: np.ndarray  # float64 [columns - 1]

    def core_cell(self, boxes: np.ndarray) -> np.ndarray:
        """(row, column) [N, 2] of the core holding each xyxy box's centre (full-frame pixels)."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        rows = np.searchsorted(self.row_bounds, (boxes[:, 1] + boxes[:, 3]) / 2, side="right")
        cols = np.searchsorted(self.col_bounds, (boxes[:, 0] + boxes[:, 2]) / 2, side="right")
        return np.stack([rows, cols], axis=1)


def fits(bucket: tuple[int, int], size: tuple[int, int]) -> bool:
    return bucket[0] >= size[0] and bucket[1] >= size[1]


def _axis(length: int, scale: float, tile_in: int, overlap_in: int) -> tuple[list[int], int, int] | None:
    """Tile starts, tile extent (original pixels) and the tiles' resized extent along one axis of `length`
    original pixels resized by `scale`; None when tiles cannot advance (one original pixel is about as large
    as the bucket, or the overlap fills the tile: images enlarged that much are not tiled)."""
    extent = min(length, math.floor(tile_in / scale))
    if extent < 1:
        return None
    resized = max(int(extent * scale + 0.5), 1)  # as `resized_shape` rounds a whole image
    if extent == length:
        return [0], extent, resized
    overlap = math.ceil(overlap_in / scale)
    if overlap >= extent:
        return None
    count = -(-(length - extent) // (extent - overlap)) + 1
    # Evenly spread: consecutive starts differ by at most extent - overlap, so neighbours share >= overlap.
    starts = [(i * (length - extent) + (count - 1) // 2) // (count - 1) for i in range(count)]
    return starts, extent, resized


def plan_tiles(
    image_size: tuple[int, int], input_size: tuple[int, int], buckets: Iterable[tuple[int, int]], overlap: int
) -> TilePlan | None:
    """The tiles of an (H, W) image that the input contract resizes to `input_size` (h_in, w_in), or None
    when it needs none: it fits a bucket (it runs whole, as ever), or one original pixel is larger than
    every bucket or the overlap leaves tiles no stride (it runs whole at its own padded size). `overlap` is
    in input pixels; `check_overlap` keeps it sane for the buckets.

    The resize factor is h_in / H along y and w_in / W along x. Of the buckets, the one needing the fewest
    tiles is used (ties: the larger area).
    """
    buckets = sorted(set(buckets), key=lambda hw: (-hw[0] * hw[1], hw))
    if any(fits(b, input_size) for b in buckets):
        return None
    (height, width), (h_in, w_in) = image_size, input_size
    best: TilePlan | None = None
    for bucket in buckets:
        rows = _axis(height, h_in / height, bucket[0], overlap)
        cols = _axis(width, w_in / width, bucket[1], overlap)
        if rows is None or cols is None:
            continue
        (row_starts, tile_h, tile_h_in), (col_starts, tile_w, tile_w_in) = rows, cols
        if best is not None and len(row_starts) * len(col_starts) >= len(best.tiles):
            continue
        tiles = [
            Tile((r, c), (y0, x0), (tile_h, tile_w), (tile_h_in, tile_w_in))
            for r, y0 in enumerate(row_starts)
            for c, x0 in enumerate(col_starts)
        ]
        best = TilePlan(image_size, bucket, tiles, _core_bounds(row_starts, tile_h), _core_bounds(col_starts, tile_w))
    return best


def _core_bounds(starts: list[int], extent: int) -> np.ndarray:
    """The middle of each overlap between consecutive tiles along one axis."""
    first = np.asarray(starts, dtype=np.float64)
    return (first[1:] + first[:-1] + extent) / 2


def check_overlap(buckets: Iterable[tuple[int, int]], overlap: int) -> None:
    """Refuse an overlap (input pixels) above half of some bucket side: neighbouring tiles would share most
    of their pixels (and, at some scales, leave no stride)."""
    short = min(min(b) for b in buckets)
    if not 0 <= 2 * overlap <= short:
        raise ValueError(
            f"tile overlap {overlap} must be between 0 and half of the shortest shape bucket side ({short})"
        )


def default_overlap(buckets: Iterable[tuple[int, int]]) -> int:
    """DEFAULT_TILE_OVERLAP, or half the shortest bucket side when that is less (small test sizes)."""
    return min(DEFAULT_TILE_OVERLAP, min(min(b) for b in buckets) // 2)


def cut_tile(image: np.ndarray, tile: Tile) -> np.ndarray:
    """The tile's region of an ``[H, W, 3]`` uint8 RGB image, resized as a whole image is (PIL bilinear):
    ``[3, h_in, w_in]`` uint8."""
    (y0, x0), (height, width) = tile.origin, tile.size
    return resize_rgb(image[y0 : y0 + height, x0 : x0 + width], tile.input_size)


def finish_tile(outputs: Outputs, plan: TilePlan, tile: Tile, **options: object) -> list[Instance]:
    """One tile's graph outputs (one batch element) -> its instances in the full frame; `options` are
    `finish_image`'s (mask kind and threshold, score threshold, mask format, box padding, workers).
    No per-tile `max_detections`: the cap applies to the merged answer."""
    return finish_outputs(
        outputs,
        input_size=tile.input_size,
        image_size=tile.size,
        origin=tile.origin,
        frame_size=plan.image_size,
        **options,
    )


def _overlap_shapes(instances: list[Instance], frame_size: tuple[int, int]) -> list[dict] | np.ndarray:
    """What pycocotools compares: compressed RLEs, RLEs of the polygons, or xywh boxes when masks were skipped."""
    height, width = frame_size
    if instances and instances[0].rle is not None:
        rles = [i.rle for i in instances]
        return [{"size": rle["size"], "counts": rle["counts"].encode("ascii")} for rle in rles]  # type: ignore[index]
    if instances and instances[0].polygons is not None:
        return [_polygons_rle(i.polygons or [], height, width) for i in instances]
    boxes = np.array([i.box for i in instances], dtype=np.float64).reshape(-1, 4)
    boxes[:, 2:] -= boxes[:, :2]
    return boxes


def _polygons_rle(polygons: list[list[float]], height: int, width: int) -> dict:
    """The compressed RLE of an instance's polygons; an empty mask for none (a mask too small for a contour)."""
    if not polygons:
        return mask_utils.frPyObjects([{"size": [height, width], "counts": [height * width]}], height, width)[0]
    return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))


def merge_tiles(plan: TilePlan, per_tile: list[list[Instance]], limit: int | None = None) -> list[Instance]:
    """The instances of all tiles (`per_tile[k]` from `plan.tiles[k]`, in the full frame) as one image's answer:
    each kept only by the tile whose core holds its box centre, duplicates of one class between neighbouring
    tiles (mask IoU > DUPLICATE_IOU; box IoU when masks were skipped) removed in favour of the higher score,
    then sorted by descending score and cut at `limit`. Callers pass the model's max detections times the
    tile count (what the tiles could give at most) or a smaller cap a request asked for."""
    owned: list[list[Instance]] = []
    for tile, instances in zip(plan.tiles, per_tile):
        cells = plan.core_cell(np.array([i.box for i in instances], dtype=np.float64).reshape(-1, 4))
        owned.append([i for i, cell in zip(instances, cells) if tuple(cell) == tile.grid])
    flat = [i for instances in owned for i in instances]
    start = np.cumsum([0, *(len(instances) for instances in owned)])
    duplicates: dict[int, list[int]] = {}  # flat index -> same-object instances of neighbouring tiles
    index = {tile.grid: k for k, tile in enumerate(plan.tiles)}
    for a, tile in enumerate(plan.tiles):
        (row, col) = tile.grid
        for neighbour in ((row, col + 1), (row + 1, col - 1), (row + 1, col), (row + 1, col + 1)):
            b = index.get(neighbour)
            if b is None or not owned[a] or not owned[b]:
                continue
            ious = np.asarray(
                mask_utils.iou(
                    _overlap_shapes(owned[a], plan.image_size),
                    _overlap_shapes(owned[b], plan.image_size),
                    [0] * len(owned[b]),
                )
            ).reshape(len(owned[a]), len(owned[b]))
            classes_a = np.array([i.class_index for i in owned[a]])[:, None]
            classes_b = np.array([i.class_index for i in owned[b]])[None, :]
            for i, j in zip(*np.nonzero((ious > DUPLICATE_IOU) & (classes_a == classes_b))):
                duplicates.setdefault(start[a] + i, []).append(start[b] + j)
                duplicates.setdefault(start[b] + j, []).append(start[a] + i)
    order = sorted(range(len(flat)), key=lambda k: -flat[k].score)
    rank = {k: r for r, k in enumerate(order)}
    dropped: set[int] = set()
    for k in order:  # greedy, as NMS: a kept instance drops its lower-ranked duplicates
        if k not in dropped:
            dropped.update(j for j in duplicates.get(k, ()) if rank[j] > rank[k])
    return [flat[k] for k in order if k not in dropped][:limit]
