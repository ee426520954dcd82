"""Mask finishing: one image's padded graph outputs -> instances with COCO RLE masks in the original frame.

The service, `training.evaluate` and the export parity checks all call `finish_image`, so every path
measures the same masks. The binary masks are, pixel for pixel, the ones the reference implementations
paste into a full-frame canvas with torch:

- MEInst (mask kind "box28"): detectron2 `paste_masks_in_image` -- `F.grid_sample` (bilinear,
  align_corners=False, zeros padding) of the 28x28 probabilities at the original-image pixel centres of
  the scaled, clipped box, then `>= threshold`.
- EmbedMask (mask kind "logprob_s4"): EM-mrcnn's evaluation -- `F.interpolate` (bilinear,
  align_corners=False, in the log domain) of the stride-4 map to `ceil(H4*4*H/h_in) x ceil(W4*4*W/w_in)`,
  crop to `[:H, :W]`, then `> log(threshold)`.

Nothing is computed outside an instance's reach: bilinear resampling is separable, so this module finds,
per axis, the pixels each mask's source cells can touch and their taps (cell index and weight, by torch's
rules), and the compiled kernel (`model.mask_kernel`) thresholds those pixels and writes the full-frame
column-major RLE counts directly; pycocotools writes the count strings.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from pycocotools import mask as mask_utils

from model import mask_kernel
from model.config import EmbedMaskConfig, MEInstConfig
from model.mask_contract import LOGPROB_STRIDE, OUTSIDE_LOG_PROB, MaskFormat, MaskKind

# A graph carries its own threshold in its metadata; without one, the configs' default of its mask kind.
DEFAULT_MASK_THRESHOLDS: dict[str, float] = {
    "box28": MEInstConfig().mask_threshold,
    "logprob_s4": EmbedMaskConfig().mask_threshold,
}
DEFAULT_BOX_PADDING = EmbedMaskConfig().box_padding  # stride-4 cells around each box of a logprob_s4 map
# Fewer instances than this per thread are not worth a thread hand-off (tens of microseconds).
MIN_INSTANCES_PER_WORKER = 8
MAX_FINISHING_THREADS = 64  # the shared helper pool's size; each call uses at most its `workers` - 1 of them


@dataclass(frozen=True)
class Instance:
    """One finished detection in original-image pixels."""

    box: tuple[float, float, float, float]  # xyxy, clipped to the image
    score: float
    class_index: int  # 0-based contiguous class index
    area: int | None  # mask pixels; None when masks were skipped
    rle: dict[str, Any] | None = None  # COCO compressed RLE {"size": [H, W], "counts": str}
    polygons: list[list[float]] | None = None  # COCO polygons [x0, y0, x1, y1, ...]
    # The mask's uncompressed full-frame counts (column-major runs, zeros first), for measurements; None
    # when masks were skipped.
    counts: np.ndarray | None = field(default=None, compare=False, repr=False)


class AxisTaps(NamedTuple):
    """Bilinear taps along one axis for every instance: instance k covers pixels start[k], start[k] + 1, ...
    whose taps are lo[begin[k]:end[k]] (first source cell; the second is the next one) with weight w_hi on
    the second, as torch computes them (float32)."""

    start: np.ndarray  # int64 [N]
    begin: np.ndarray  # int64 [N]
    end: np.ndarray  # int64 [N]
    lo: np.ndarray  # int64
    w_hi: np.ndarray  # float32


class Frame(NamedTuple):
    """Where an image's masks are written: the image is the region of `size` (H, W) at `origin` (y0, x0),
    (0, 0) for a whole image (the frame is the image) or a tile's corner in the full image."""

    origin: tuple[int, int]
    size: tuple[int, int]

    @classmethod
    def of(
        cls, image_size: tuple[int, int], origin: tuple[int, int] = (0, 0), frame_size: tuple[int, int] | None = None
    ) -> Frame:
        return cls(origin, image_size if frame_size is None else frame_size)


class RunLengths(NamedTuple):
    """Uncompressed full-frame COCO RLE counts (column-major runs, zeros first) and mask areas."""

    counts: list[np.ndarray]
    areas: list[int]


def scale_boxes(
    boxes: np.ndarray, input_size: tuple[int, int], image_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Input-pixel boxes -> original-pixel boxes (float32, as detectron2's `Boxes.scale` and `clip`) and
    the mask of non-empty ones (width > 0 and height > 0 after clipping)."""
    (h_in, w_in), (height, width) = input_size, image_size
    out = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    out[:, 0::2] *= np.float32(width / w_in)
    out[:, 1::2] *= np.float32(height / h_in)
    np.clip(out[:, 0::2], 0, width, out=out[:, 0::2])
    np.clip(out[:, 1::2], 0, height, out=out[:, 1::2])
    nonempty = (out[:, 2] - out[:, 0] > 0) & (out[:, 3] - out[:, 1] > 0)
    return out, nonempty


def _ragged_ranges(first: np.ndarray, last: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The integer ranges [first[k], last[k]) laid end to end: each element's range k, its value, and
    the offset of every range in the flat array."""
    lengths = last - first
    offsets = np.cumsum(lengths) - lengths
    owner = np.repeat(np.arange(len(first)), lengths)
    return owner, np.arange(len(owner)) - (offsets - first)[owner], offsets


def _grid_sample_taps(lo: np.ndarray, hi: np.ndarray, size: int, extent: int) -> AxisTaps:
    """grid_sample taps along one axis for `size`-cell masks spanning [lo[k], hi[k]] (float32 box edges),
    each over the pixels of [0, extent) its samples can touch. Cell indices are into the mask padded by
    one zero cell on each side."""
    span = hi - lo
    cell = span / size
    first = np.clip(np.floor(lo - cell) - 1, 0, extent).astype(np.int64)
    last = np.maximum(np.minimum(np.ceil(hi + cell) + 1, extent).astype(np.int64), first)
    owner, pixel, offsets = _ragged_ranges(first, last)
    with np.errstate(over="ignore"):  # a box a few ulps wide sends its far pixels to +-inf, as in torch
        grid = ((pixel + 0.5).astype(np.float32) - lo[owner]) / span[owner] * 2 - 1  # detectron2's float32 grid
        source = ((grid + 1).astype(np.float64) * (size / 2) - 0.5).astype(np.float32)  # torch: fma(g+1, size/2, -.5)
    source = np.clip(source, -2, size + 1)  # changes only pixels beyond the mask
    # Each mask keeps the pixels whose source lies in [-1, size): one run, found on a key sorted across masks.
    stride = size + 4.0
    key = source + owner * stride
    base = np.arange(len(lo)) * stride
    inside, beyond = key.searchsorted(base - 1), key.searchsorted(base + size)
    floor = np.floor(source)
    return AxisTaps(
        first + inside - offsets, inside, beyond, floor.astype(np.int64) + 1, (source - floor).astype(np.float32)
    )


def _interpolate_taps(first: np.ndarray, last: np.ndarray, in_size: int, out_size: int) -> AxisTaps:
    """F.interpolate(bilinear, align_corners=False) taps of output pixels [first[k], last[k]) when
    `in_size` cells are resized to `out_size` pixels (torch's index and lambda rules, with its clamps)."""
    scale = float(np.float32(in_size) / np.float32(out_size))
    _, pixel, offsets = _ragged_ranges(first, last)
    source = ((pixel + 0.5) * scale - 0.5).astype(np.float32)  # torch: fma(scale, i + 0.5, -0.5), then >= 0
    np.maximum(source, 0, out=source)
    lo = np.minimum(np.floor(source), in_size - 1)
    w_hi = source - lo
    np.minimum(w_hi, 1, out=w_hi)
    return AxisTaps(first, offsets, offsets + last - first, lo.astype(np.int64), w_hi.astype(np.float32))


def _threshold_rle(
    source: np.ndarray,
    index: np.ndarray,
    rows: AxisTaps,
    cols: AxisTaps,
    threshold: float,
    strict: bool,
    mode: int,
    frame: Frame,
    workers: int,
) -> RunLengths:
    """Run the kernel, over up to `workers` threads when there are enough instances (it releases the GIL):
    the instances are cut into contiguous parts of about equal pixel counts; the calling thread finishes
    the first part while the shared pool finishes the others. The taps are region-local; the kernel writes
    at the frame's indices of the region's pixels."""
    source, index = np.ascontiguousarray(source, dtype=np.float32), np.asarray(index, dtype=np.int64)
    (y0, x0), image_size = frame.origin, frame.size
    rows, cols = rows._replace(start=rows.start + y0), cols._replace(start=cols.start + x0)

    def run(part: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return mask_kernel.threshold_rle(
            source,
            index[part],
            *_instances(rows, part),
            *_instances(cols, part),
            np.float32(threshold),
            strict,
            mode,
            *image_size,
        )

    parts = [slice(0, len(index))]
    workers = min(workers, len(index) // MIN_INSTANCES_PER_WORKER)
    if workers > 1:
        pixels = np.cumsum((rows.end - rows.begin) * (cols.end - cols.begin))
        cuts = np.searchsorted(pixels, pixels[-1] * np.arange(1, workers) / workers).tolist()
        parts = [slice(a, b) for a, b in zip([0, *cuts], [*cuts, len(index)]) if b > a]
    others = [_helpers().submit(run, part) for part in parts[1:]]
    counts, areas = [], []
    for part_counts, offsets, part_areas in [run(parts[0]), *(future.result() for future in others)]:
        bounds = offsets.tolist()
        counts += [part_counts[b:e] for b, e in zip(bounds[:-1], bounds[1:])]
        areas += part_areas.tolist()
    return RunLengths(counts, areas)


def _instances(taps: AxisTaps, part: slice) -> AxisTaps:
    """The taps of some of the instances (begin/end index the shared lo and w_hi arrays)."""
    return AxisTaps(taps.start[part], taps.begin[part], taps.end[part], taps.lo, taps.w_hi)


@functools.cache
def _helpers() -> ThreadPoolExecutor:
    """Threads that take parts of an image's instances off the calling thread, shared by the process so
    that concurrent requests do not each start their own."""
    return ThreadPoolExecutor(MAX_FINISHING_THREADS, thread_name_prefix="onestage-finishing")


def paste_box28_rles(
    masks: np.ndarray,
    boxes: np.ndarray,
    image_size: tuple[int, int],
    threshold: float = DEFAULT_MASK_THRESHOLDS["box28"],
    workers: int = 1,
    frame: Frame | None = None,
) -> RunLengths:
    """MEInst: paste box-relative probabilities [N, s, s] into their boxes [N, 4] (original pixels of the
    image_size region, clipped, float32) and keep >= threshold; RLEs of `frame` (default: the region)."""
    if not threshold > 0:
        raise ValueError("a box-relative mask threshold must be > 0: pixels away from the box sample 0")
    height, width = image_size
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    rows = _grid_sample_taps(boxes[:, 1], boxes[:, 3], masks.shape[1], height)
    cols = _grid_sample_taps(boxes[:, 0], boxes[:, 2], masks.shape[2], width)
    cells = np.zeros(
        (len(boxes), masks.shape[1] + 2, masks.shape[2] + 2), dtype=np.float32
    )  # grid_sample's zero padding
    cells[:, 1:-1, 1:-1] = masks
    frame = frame or Frame.of(image_size)
    return _threshold_rle(
        cells, np.arange(len(boxes)), rows, cols, threshold, False, mask_kernel.GRID_SAMPLE, frame, workers
    )


def upsample_logprob_rles(
    logprobs: np.ndarray,
    boxes: np.ndarray,
    input_size: tuple[int, int],
    image_size: tuple[int, int],
    threshold: float = DEFAULT_MASK_THRESHOLDS["logprob_s4"],
    box_padding: int = DEFAULT_BOX_PADDING,
    index: np.ndarray | None = None,
    workers: int = 1,
    frame: Frame | None = None,
) -> RunLengths:
    """EmbedMask: upsample stride-4 log-probabilities (over the padded input) to the original scale and keep
    > log(threshold), around their boxes [N, 4] (input pixels, as the graph cropped them). Box k reads map
    `logprobs[index[k]]` ([K, H4, W4]; index defaults to 0..N-1). RLEs of `frame` (default: the image)."""
    if not math.log(threshold) > OUTSIDE_LOG_PROB:
        raise ValueError(f"threshold must exceed exp({OUTSIDE_LOG_PROB}), the map's value outside each crop")
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    index = np.arange(len(boxes)) if index is None else index
    (h_in, w_in), (height, width) = input_size, image_size
    h4, w4 = logprobs.shape[1:]
    canvas = (-(-h4 * LOGPROB_STRIDE * height // h_in), -(-w4 * LOGPROB_STRIDE * width // w_in))
    # The crop reaches box_padding cells past the truncated box; one more cell for the bilinear support.
    reach = (box_padding + 2) * LOGPROB_STRIDE
    taps = []
    for axis, n_cells, out_size, extent in ((1, h4, canvas[0], height), (0, w4, canvas[1], width)):
        lo, hi = boxes[:, axis], np.maximum(boxes[:, axis + 2], 0)
        per_input_pixel = out_size / (n_cells * LOGPROB_STRIDE)  # canvas pixels per input pixel
        first = np.clip(np.floor((lo - reach) * per_input_pixel) - 1, 0, extent).astype(np.int64)
        last = np.minimum(np.ceil((hi + reach) * per_input_pixel) + 1, extent).astype(np.int64)
        taps.append(_interpolate_taps(first, np.maximum(last, first), n_cells, out_size))
    # torch runs a per-corner kernel when the output's height + width <= 128, else a separable one.
    mode = mask_kernel.INTERPOLATE_PER_CORNER if sum(canvas) <= 128 else mask_kernel.INTERPOLATE_SEPARABLE
    frame = frame or Frame.of(image_size)
    rows, cols = taps
    log_threshold = float(np.float32(math.log(threshold)))
    return _threshold_rle(logprobs, index, rows, cols, log_threshold, True, mode, frame, workers)


def encode_rles(counts: list[np.ndarray], image_size: tuple[int, int]) -> list[dict[str, Any]]:
    """Compressed COCO RLEs (counts as str, JSON-ready) from uncompressed counts; pycocotools encodes."""
    if not counts:
        return []
    height, width = image_size
    rles = mask_utils.frPyObjects([{"size": [height, width], "counts": c} for c in counts], height, width)
    return [{"size": [height, width], "counts": r["counts"].decode("ascii")} for r in rles]


def mask_crop(counts: np.ndarray, image_size: tuple[int, int]) -> tuple[tuple[int, int], np.ndarray] | None:
    """An RLE mask (uncompressed counts over an (H, W) frame) on its bounding box: ((top, left), uint8 mask of
    the box), never the whole frame; None for an empty mask."""
    ends = np.cumsum(counts)
    starts, ends = (ends - counts)[1::2], ends[1::2]
    if len(starts) == 0 or not np.any(ends > starts):
        return None
    _, pixels, _ = _ragged_ranges(starts, ends)  # frame indices of the mask's pixels
    cols, rows = np.divmod(pixels, image_size[0])
    top, left = int(rows.min()), int(cols.min())
    mask = np.zeros((rows.max() - top + 1, cols.max() - left + 1), dtype=np.uint8)
    mask[rows - top, cols - left] = 1
    return (top, left), mask


def polygons_from_counts(counts: np.ndarray, image_size: tuple[int, int]) -> list[list[float]]:
    """Outer contours of an RLE mask as COCO polygons [x0, y0, x1, y1, ...] in image pixels (OpenCV), traced
    on the mask's bounding box only."""
    import cv2  # opencv-python-headless; only this optional output format needs it

    crop = mask_crop(counts, image_size)
    if crop is None:
        return []
    (top, left), mask = crop
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    offset = np.array([left, top])
    return [(c.reshape(-1, 2) + offset).ravel().astype(float).tolist() for c in contours if len(c) >= 3]


def compile_kernel() -> None:
    """Compile the finishing kernel now rather than on the first request (a few seconds the first time;
    numba caches the machine code on disk, next to the module or in the user's cache directory)."""
    paste_box28_rles(np.ones((1, 2, 2), np.float32), np.array([0, 0, 1, 1], np.float32), (2, 2))


def finish_image(
    num_dets: int | np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    masks: np.ndarray | None,
    *,
    mask_kind: MaskKind,
    input_size: tuple[int, int],
    image_size: tuple[int, int],
    mask_threshold: float | None = None,
    score_threshold: float = 0.0,
    max_detections: int | None = None,
    mask_format: MaskFormat = "rle",
    box_padding: int = DEFAULT_BOX_PADDING,
    workers: int = 1,
    origin: tuple[int, int] = (0, 0),
    frame_size: tuple[int, int] | None = None,
) -> list[Instance]:
    """Finish one image's padded graph outputs: instances in descending score order, boxes in original
    pixels, masks as COCO RLE, as polygons, or skipped (mask_format "none", which never reads `masks`).

    A tile of a larger image is finished straight into that image: `image_size` is the tile's region (h, w),
    `origin` its top left corner (y0, x0) and `frame_size` the whole image (H, W). Boxes are clipped to the
    region as if it were the image, then shifted by the origin; masks are clipped to the region and written
    as RLEs of the whole frame. The defaults (origin (0, 0), no frame) finish a whole image.

    `boxes` are xyxy in input pixels (the resized image before padding; `input_size` = (h_in, w_in)), `masks`
    [K, 28, 28] probabilities ("box28") or [K, H4, W4] stride-4 log-probabilities over the padded input
    ("logprob_s4"). Only the first `num_dets` rows count; detections whose clipped box is empty or whose
    score is below `score_threshold` are dropped, and at most `max_detections` are kept. `workers` threads
    share the masks of one image.
    """
    if mask_kind not in DEFAULT_MASK_THRESHOLDS:
        raise ValueError(f"unknown mask kind {mask_kind!r}")
    if mask_format not in ("rle", "polygon", "none"):
        raise ValueError(f"unknown mask format {mask_format!r}")
    if masks is None and mask_format != "none":
        raise ValueError(f"mask_format {mask_format!r} needs the masks output")
    count = int(num_dets)
    threshold = DEFAULT_MASK_THRESHOLDS[mask_kind] if mask_threshold is None else mask_threshold
    scaled, keep = scale_boxes(boxes[:count], input_size, image_size)
    frame = Frame.of(image_size, origin, frame_size)
    scores = np.asarray(scores[:count], dtype=np.float32)
    order = np.flatnonzero(keep & (scores >= score_threshold))
    order = order[np.argsort(-scores[order], kind="stable")][:max_detections].tolist()

    if mask_format == "none" or masks is None:  # (no masks with another format was refused above)
        runs = RunLengths([None] * len(order), [None] * len(order))  # type: ignore[list-item]
    elif mask_kind == "box28":
        runs = paste_box28_rles(masks[order], scaled[order], image_size, threshold, workers, frame)
    else:
        runs = upsample_logprob_rles(
            masks,
            boxes[order],
            input_size,
            image_size,
            threshold,
            box_padding,
            np.array(order, dtype=np.int64),
            workers,
            frame,
        )
    rles = encode_rles(runs.counts, frame.size) if mask_format == "rle" else [None] * len(order)
    scaled[:, 0::2] += np.float32(origin[1])
    scaled[:, 1::2] += np.float32(origin[0])
    boxes_out, scores_out, classes_out = scaled.tolist(), scores.tolist(), np.asarray(classes[:count]).tolist()
    return [
        Instance(
            box=tuple(boxes_out[k]),
            score=scores_out[k],
            class_index=int(classes_out[k]),
            area=area,
            rle=rle,
            polygons=polygons_from_counts(counts, frame.size) if mask_format == "polygon" else None,
            counts=counts,
        )
        for k, counts, area, rle in zip(order, runs.counts, runs.areas, rles)
    ]


def finish_outputs(outputs: Mapping[str, np.ndarray], **options: Any) -> list[Instance]:
    """``finish_image`` of one image's graph outputs, keyed by the graph's output names (``masks`` absent for
    a boxes-only graph); ``options`` are ``finish_image``'s keywords."""
    return finish_image(
        outputs["num_dets"], outputs["boxes"], outputs["scores"], outputs["classes"], outputs.get("masks"), **options
    )
