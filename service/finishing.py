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

Nothing is computed outside an instance's reach: bilinear resampling is separable, so each mask is
evaluated only on the pixels its source cells can touch, and the full-frame column-major RLE comes from
the box-local runs offset by the columns and rows around them; pycocotools writes the count string.

Exactness: a fast float32 separable resample decides every pixel farther than a rounding margin from the
threshold; the few pixels inside the margin are recomputed with the arithmetic of torch's AVX2/AVX-512 CPU
kernels (float32, fused multiply-adds in their order), so exact ties (e.g. 0.5 between a 0 and a 1)
resolve as torch resolves them there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, NamedTuple, Sequence

import numpy as np
from pycocotools import mask as mask_utils

MaskKind = Literal["box28", "logprob_s4"]
MaskFormat = Literal["rle", "polygon", "none"]
DEFAULT_MASK_THRESHOLDS: dict[str, float] = {"box28": 0.5, "logprob_s4": 0.53}
# The EmbedMask graph's contract (model.embedmask.method): stride of the map, value outside each crop.
LOGPROB_STRIDE = 4
OUTSIDE_LOG_PROB = -10.0
# Pixels whose fast value lies this close to the threshold, relative to the magnitude of the source cells
# they read, are recomputed exactly: 32 float32 unit roundoffs; the fast and torch values differ by < 17.
_EXACT_MARGIN = 2.0**-19


@dataclass(frozen=True)
class Instance:
    """One finished detection in original-image pixels."""

    box: tuple[float, float, float, float]  # xyxy, clipped to the image
    score: float
    class_index: int  # 0-based contiguous class index
    area: int | None  # mask pixels; None when masks were skipped
    rle: dict[str, Any] | None = None  # COCO compressed RLE {"size": [H, W], "counts": str}
    polygons: list[list[float]] | None = None  # COCO polygons [x0, y0, x1, y1, ...]


@dataclass(frozen=True)
class LocalMask:
    """A binary mask that is empty outside rows [top, top + h) and columns [left, left + w).

    Stored column by column (the order of COCO RLE): `columns[i, 1 + j]` is pixel (top + j, left + i); each
    column carries one False guard pixel at each end, so runs never leak from one column into the next.
    """

    top: int
    left: int
    columns: np.ndarray  # bool [w, h + 2]

    @property
    def mask(self) -> np.ndarray:
        """The local mask as a [h, w] array (a view)."""
        return self.columns[:, 1:-1].T

    @property
    def area(self) -> int:
        return int(np.count_nonzero(self.columns))


class _Taps(NamedTuple):
    """Bilinear taps of the output pixels start, start+1, ... along one axis: each reads source cells
    lo and lo + 1 of a (padded) source with weights w_lo and w_hi, as torch computes them (float32)."""

    start: int
    lo: np.ndarray  # intp
    w_lo: np.ndarray  # float32
    w_hi: np.ndarray  # float32


def scale_boxes(boxes: np.ndarray, input_size: tuple[int, int], image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
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


def _fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 a*b + c rounded once, as a fused multiply-add. a*b is exact in float64; where the float64
    sum was itself rounded onto a float32 halfway point, step it towards the exact sum first."""
    product = a.astype(np.float64) * b
    total = product + c
    halfway = (total.view(np.int64) & 0x1FFFFFFF) == 0x10000000
    if halfway.any():
        back = total - product
        error = (product - (total - back)) + (c - back)  # exact: product + c == total + error
        nudged = np.nextafter(total, np.where(error > 0, np.inf, -np.inf))
        total = np.where(halfway & (error != 0), nudged, total)
    return total.astype(np.float32)


def _ragged_ranges(first: np.ndarray, last: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The integer ranges [first[k], last[k]) laid end to end: each element's range k, its value, and
    the offset of every range in the flat array."""
    lengths = last - first
    offsets = np.cumsum(lengths) - lengths
    owner = np.repeat(np.arange(len(first)), lengths)
    return owner, np.arange(len(owner)) - (offsets - first)[owner], offsets


def _split_taps(start: np.ndarray, begin: np.ndarray, end: np.ndarray, lo: np.ndarray, w_hi: np.ndarray) -> list[_Taps]:
    """Per-range taps from flat arrays: range k owns elements [begin[k], end[k]) and starts at pixel start[k]."""
    w_lo = 1 - w_hi
    return [_Taps(s, lo[b:e], w_lo[b:e], w_hi[b:e]) for s, b, e in zip(start.tolist(), begin.tolist(), end.tolist())]


def _grid_sample_taps(lo: np.ndarray, hi: np.ndarray, size: int, extent: int) -> list[_Taps]:
    """grid_sample taps along one axis for `size`-cell masks spanning [lo[k], hi[k]] (float32 box edges),
    each over the pixels of [0, extent) its samples can touch. Cell indices are into the mask padded by
    one zero cell on each side."""
    span = hi - lo
    cell = span / size
    first = np.clip(np.floor(lo - cell) - 1, 0, extent).astype(np.intp)
    last = np.maximum(np.minimum(np.ceil(hi + cell) + 1, extent).astype(np.intp), first)
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
    return _split_taps(first + inside - offsets, inside, beyond, floor.astype(np.intp) + 1, source - floor)


def _interpolate_taps(first: np.ndarray, last: np.ndarray, in_size: int, out_size: int) -> list[_Taps]:
    """F.interpolate(bilinear, align_corners=False) taps of output pixels [first[k], last[k]) when
    `in_size` cells are resized to `out_size` pixels (torch's index and lambda rules, with its clamps)."""
    scale = float(np.float32(in_size) / np.float32(out_size))
    _, pixel, offsets = _ragged_ranges(first, last)
    source = ((pixel + 0.5) * scale - 0.5).astype(np.float32)  # torch: fma(scale, i + 0.5, -0.5), then >= 0
    np.maximum(source, 0, out=source)
    lo = np.minimum(np.floor(source), in_size - 1)
    w_hi = source - lo
    np.minimum(w_hi, 1, out=w_hi)
    return _split_taps(first, offsets, offsets + last - first, lo.astype(np.intp), w_hi)


def _exact_grid_sample(v: np.ndarray, wy0: np.ndarray, wy1: np.ndarray, wx0: np.ndarray, wx1: np.ndarray) -> np.ndarray:
    """torch's CPU grid_sample bilinear value from corner cells v [N, 4] (x0y0, x0y1, x1y0, x1y1)."""
    out = v[:, 0] * (wy0 * wx0)
    out = _fma32(v[:, 2], wy0 * wx1, out)
    out = _fma32(v[:, 1], wy1 * wx0, out)
    return _fma32(v[:, 3], wy1 * wx1, out)


def _exact_interpolate(v: np.ndarray, wy0: np.ndarray, wy1: np.ndarray, wx0: np.ndarray, wx1: np.ndarray, per_corner: bool) -> np.ndarray:
    """torch's CPU upsample_bilinear2d value from corner cells v [N, 4] (x0y0, x0y1, x1y0, x1y1). torch
    runs a per-corner kernel when the output's height + width <= 128, else a separable one (x, then y)."""
    if per_corner:
        out = v[:, 2] * (wy0 * wx1)
        out = _fma32(v[:, 0], wy0 * wx0, out)
        out = _fma32(v[:, 1], wy1 * wx0, out)
        return _fma32(v[:, 3], wy1 * wx1, out)
    along_x = _fma32(v[:, 0:2], wx0[:, None], v[:, 2:4] * wx1[:, None])  # rows y0 and y1
    return _fma32(along_x[:, 0], wy0, along_x[:, 1] * wy1)


ExactFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]
_CORNER_X, _CORNER_Y = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])


def _threshold_local(cells: np.ndarray, rows: _Taps, cols: _Taps, threshold: float, strict: bool, exact: ExactFn) -> np.ndarray:
    """Threshold the bilinear resample of `cells` (the source transposed, [x, y], so that every step below
    runs along contiguous memory) at the given taps: a guarded column strip [w, h + 2]."""
    strip = np.zeros((len(cols.lo), len(rows.lo) + 2), dtype=bool)
    if strip.size == 0 or len(rows.lo) == 0:
        return strip
    # Fast separable resample, two lerps: along y into a small [x cells, h] table, then along x.
    table = cells[:, rows.lo]
    table += (cells[:, 1:] - cells[:, :-1])[:, rows.lo] * rows.w_hi
    values = table[cols.lo]
    step = (table[1:] - table[:-1])[cols.lo]
    step *= cols.w_hi[:, None]
    values += step
    # Pixels clear of the threshold by the rounding margin of the largest cell are decided at once.
    margin = _EXACT_MARGIN * max(float(cells.max()), -float(cells.min()))
    decided = strip[:, 1:-1]
    np.greater(values, threshold + margin, out=decided)
    maybe = values >= threshold - margin
    if np.count_nonzero(maybe) == np.count_nonzero(strip):
        return strip
    # The rest: the fast value stands unless it is within the margin of the pixel's own four cells.
    compare = np.greater if strict else np.greater_equal
    x, y = np.divmod((maybe ^ decided).ravel().nonzero()[0], values.shape[1])
    corners = cells[cols.lo[x, None] + _CORNER_X, rows.lo[y, None] + _CORNER_Y]
    fast = values[x, y]
    strip[x, y + 1] = compare(fast, threshold)
    close = np.abs(fast - threshold) <= _EXACT_MARGIN * np.abs(corners).max(axis=1)
    if close.any():
        x, y = x[close], y[close]
        strip[x, y + 1] = compare(exact(corners[close], rows.w_lo[y], rows.w_hi[y], cols.w_lo[x], cols.w_hi[x]), threshold)
    return strip


def paste_box28_local(masks: np.ndarray, boxes: np.ndarray, image_size: tuple[int, int], threshold: float = 0.5) -> list[LocalMask]:
    """MEInst: paste box-relative probabilities [N, s, s] into their boxes [N, 4] (original pixels, clipped,
    float32) and keep >= threshold."""
    if not threshold > 0:
        raise ValueError("a box-relative mask threshold must be > 0: pixels away from the box sample 0")
    height, width = image_size
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    rows = _grid_sample_taps(boxes[:, 1], boxes[:, 3], masks.shape[1], height)
    cols = _grid_sample_taps(boxes[:, 0], boxes[:, 2], masks.shape[2], width)
    cells = np.zeros((len(boxes), masks.shape[2] + 2, masks.shape[1] + 2), dtype=np.float32)
    cells[:, 1:-1, 1:-1] = np.asarray(masks).transpose(0, 2, 1)
    threshold = float(np.float32(threshold))
    return [
        LocalMask(r.start, c.start, _threshold_local(cells[k], r, c, threshold, False, _exact_grid_sample))
        for k, (r, c) in enumerate(zip(rows, cols))
    ]


def upsample_logprob_local(
    logprobs: Sequence[np.ndarray],
    boxes: np.ndarray,
    input_size: tuple[int, int],
    image_size: tuple[int, int],
    threshold: float = 0.53,
    box_padding: int = 2,
) -> list[LocalMask]:
    """EmbedMask: upsample stride-4 log-probabilities [H4, W4] (over the padded input) to the original scale
    and keep > log(threshold), around their boxes [N, 4] (input pixels, as the graph cropped them)."""
    if not math.log(threshold) > OUTSIDE_LOG_PROB:
        raise ValueError(f"threshold must exceed exp({OUTSIDE_LOG_PROB}), the map's value outside each crop")
    if len(logprobs) == 0:
        return []
    (h_in, w_in), (height, width) = input_size, image_size
    h4, w4 = logprobs[0].shape
    canvas = (-(-h4 * LOGPROB_STRIDE * height // h_in), -(-w4 * LOGPROB_STRIDE * width // w_in))
    # The crop reaches box_padding cells past the truncated box; one more cell for the bilinear support.
    reach = (box_padding + 2) * LOGPROB_STRIDE
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    taps = []
    for axis, n_cells, out_size, extent in ((1, h4, canvas[0], height), (0, w4, canvas[1], width)):
        lo, hi = boxes[:, axis], np.maximum(boxes[:, axis + 2], 0)
        per_input_pixel = out_size / (n_cells * LOGPROB_STRIDE)  # canvas pixels per input pixel
        first = np.clip(np.floor((lo - reach) * per_input_pixel) - 1, 0, extent).astype(np.intp)
        last = np.minimum(np.ceil((hi + reach) * per_input_pixel) + 1, extent).astype(np.intp)
        taps.append(_interpolate_taps(first, np.maximum(last, first), n_cells, out_size))
    threshold = float(np.float32(math.log(threshold)))
    per_corner = sum(canvas) <= 128
    return [_upsample_local(logprob, r, c, threshold, per_corner) for logprob, r, c in zip(logprobs, *taps)]


def _upsample_local(logprob: np.ndarray, rows: _Taps, cols: _Taps, threshold: float, per_corner: bool) -> LocalMask:
    """One EmbedMask instance: read only the cells its taps touch, then threshold."""
    if len(rows.lo) == 0 or len(cols.lo) == 0:
        return LocalMask(rows.start, cols.start, np.zeros((len(cols.lo), len(rows.lo) + 2), dtype=bool))
    # The last cell repeats where torch clamps the second tap to the map's edge.
    row_cells = np.minimum(np.arange(rows.lo[0], rows.lo[-1] + 2), logprob.shape[0] - 1)
    col_cells = np.minimum(np.arange(cols.lo[0], cols.lo[-1] + 2), logprob.shape[1] - 1)
    cells = np.asarray(logprob, dtype=np.float32).T[col_cells[:, None], row_cells]
    rows = _Taps(rows.start, rows.lo - rows.lo[0], rows.w_lo, rows.w_hi)
    cols = _Taps(cols.start, cols.lo - cols.lo[0], cols.w_lo, cols.w_hi)

    def exact(v: np.ndarray, wy0: np.ndarray, wy1: np.ndarray, wx0: np.ndarray, wx1: np.ndarray) -> np.ndarray:
        return _exact_interpolate(v, wy0, wy1, wx0, wx1, per_corner)

    return LocalMask(rows.start, cols.start, _threshold_local(cells, rows, cols, threshold, True, exact))


def rle_counts(local: LocalMask, image_size: tuple[int, int]) -> np.ndarray:
    """Uncompressed COCO RLE counts of the full image (column-major runs, starting with zeros)."""
    height, width = image_size
    flat = local.columns.ravel()
    changes = (flat[1:] != flat[:-1]).nonzero()[0] + 1  # first strip index of every new run
    column, row = np.divmod(changes, local.columns.shape[1])
    toggles = (local.left + column) * height + (local.top - 1 + row)  # full-frame index where a run starts/ends
    if local.top == 0 and local.columns.shape[1] - 2 == height:
        # A run ending on the bottom row meets one starting on the top row of the next column: one run.
        meet = (toggles[1:] == toggles[:-1]).nonzero()[0]
        keep = np.ones(len(toggles), dtype=bool)
        keep[meet] = keep[meet + 1] = False
        toggles = toggles[keep]
    bounds = np.concatenate(([0], toggles, [height * width]))
    counts = bounds[1:] - bounds[:-1]
    return counts[:-1] if len(counts) > 1 and counts[-1] == 0 else counts


def encode_rles(counts: list[np.ndarray], image_size: tuple[int, int]) -> list[dict[str, Any]]:
    """Compressed COCO RLEs (counts as str, JSON-ready) from uncompressed counts; pycocotools encodes."""
    if not counts:
        return []
    height, width = image_size
    rles = mask_utils.frPyObjects([{"size": [height, width], "counts": c} for c in counts], height, width)
    return [{"size": [height, width], "counts": r["counts"].decode("ascii")} for r in rles]


def polygons_from_local(local: LocalMask) -> list[list[float]]:
    """Outer contours of the mask as COCO polygons [x0, y0, x1, y1, ...] in image pixels (OpenCV)."""
    import cv2  # opencv-python-headless; only this optional output format needs it

    contours, _ = cv2.findContours(np.ascontiguousarray(local.mask, dtype=np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    offset = np.array([local.left, local.top])
    return [(c.reshape(-1, 2) + offset).ravel().astype(float).tolist() for c in contours if len(c) >= 3]


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
    box_padding: int = 2,
) -> list[Instance]:
    """Finish one image's padded graph outputs: instances in descending score order, boxes in original
    pixels, masks as COCO RLE, as polygons, or skipped (mask_format "none", which never reads `masks`).

    `boxes` are xyxy in input pixels (the resized image before padding; `input_size` = (h_in, w_in)), `masks`
    [K, 28, 28] probabilities ("box28") or [K, H4, W4] stride-4 log-probabilities over the padded input
    ("logprob_s4"). Only the first `num_dets` rows count; detections whose clipped box is empty or whose
    score is below `score_threshold` are dropped, and at most `max_detections` are kept.
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
    scores = np.asarray(scores[:count], dtype=np.float32)
    order = np.flatnonzero(keep & (scores >= score_threshold))
    order = order[np.argsort(-scores[order], kind="stable")][:max_detections].tolist()

    if mask_format == "none":
        locals_: list[LocalMask | None] = [None] * len(order)
    elif mask_kind == "box28":
        locals_ = paste_box28_local(masks[order], scaled[order], image_size, threshold)
    else:
        locals_ = upsample_logprob_local([masks[k] for k in order], boxes[order], input_size, image_size, threshold, box_padding)
    if mask_format == "rle":
        rles = encode_rles([rle_counts(m, image_size) for m in locals_], image_size)
    else:
        rles = [None] * len(order)
    boxes_out, scores_out, classes_out = scaled.tolist(), scores.tolist(), np.asarray(classes[:count]).tolist()
    return [
        Instance(
            box=tuple(boxes_out[k]),
            score=scores_out[k],
            class_index=int(classes_out[k]),
            area=None if local is None else local.area,
            rle=rle,
            polygons=polygons_from_local(local) if mask_format == "polygon" else None,
        )
        for k, local, rle in zip(order, locals_, rles)
    ]
