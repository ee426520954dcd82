"""The compiled core of mask finishing (numba): threshold each instance's bilinear resample over its own
pixels and write the full-frame COCO RLE counts at once, with no mask array in between.

Every instance k reads source cells `source[index[k]]` ([y, x]) and covers image rows
`row_start[k] + i` for i < `row_end[k] - row_begin[k]`, whose bilinear taps are `row_lo[row_begin[k] + i]`
(first cell; the second is the next one, clamped to the map) with weight `row_w_hi[...]` on the second;
columns likewise. `model.finishing` computes the taps with the index and weight rules of the torch
reference ops, so the kernel only has to reproduce the arithmetic of each pixel's value:

- fast: a pixel's value is a convex combination of its four cells, so a rectangle of pixels between the
  same four cells whose cells all clear the threshold on one side is decided whole, and so is a column's
  run of pixels in it when the column's two lerps along x do. Otherwise a float32 lerp along y gives each
  pixel a value within a few float32 roundoffs of torch's, which decides every pixel farther than `MARGIN`
  (relative to the largest of its four cells) from the threshold;
- exact: the pixels inside the margin are recomputed with the fused multiply-adds of torch's CPU kernels
  (AVX2/AVX-512), in their order, so exact ties (0.5 between a 0 and a 1) resolve as in torch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

# The torch op whose arithmetic the exact path reproduces.
GRID_SAMPLE = 0  # F.grid_sample, bilinear (detectron2's paste)
INTERPOLATE_PER_CORNER = 1  # F.interpolate, bilinear, when the output's height + width <= 128
INTERPOLATE_SEPARABLE = 2  # F.interpolate, bilinear, larger outputs: along x, then along y
# 32 float32 unit roundoffs of the largest of a pixel's four cells; the fast and torch values differ by fewer than 17.
MARGIN = 2.0**-19
_OUT, _IN, _EDGE = 0, 1, 2  # a rectangle of pixels between the same four cells: all out, all in, or look closer


def _fma_typing(typingctx, a, b, c):
    """float32 a * b + c rounded once (LLVM's fma: the instruction, or libm's exact fmaf)."""
    if not (a == b == c == types.float32):
        return None

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return types.float32(types.float32, types.float32, types.float32), codegen


# What the compiled code calls; typed for the checker as the function it lowers to (numba's intrinsic object
# takes the typing context as its first parameter, which callers never pass).
_fma: Callable[[np.float32, np.float32, np.float32], np.float32] = intrinsic(_fma_typing)  # type: ignore[assignment]


@njit(nogil=True, cache=True)
def _exact(
    mode: int,
    v00: np.float32,
    v01: np.float32,
    v10: np.float32,
    v11: np.float32,
    wy0: np.float32,
    wy1: np.float32,
    wx0: np.float32,
    wx1: np.float32,
) -> np.float32:
    """torch's value of one pixel from its corner cells (vXY: x0/x1, y0/y1) and weights."""
    if mode == GRID_SAMPLE:
        out = v00 * (wy0 * wx0)
        out = _fma(v10, wy0 * wx1, out)
        out = _fma(v01, wy1 * wx0, out)
        return _fma(v11, wy1 * wx1, out)
    if mode == INTERPOLATE_PER_CORNER:
        out = v10 * (wy0 * wx1)
        out = _fma(v00, wy0 * wx0, out)
        out = _fma(v01, wy1 * wx0, out)
        return _fma(v11, wy1 * wx1, out)
    row0 = _fma(v00, wx0, v10 * wx1)
    row1 = _fma(v01, wx0, v11 * wx1)
    return _fma(row0, wy0, row1 * wy1)


@njit(nogil=True, cache=True, inline="always")
def _append(starts: np.ndarray, ends: np.ndarray, m: int, start: int, end: int) -> int:
    """Add the rows [start, end) to a column's m runs of ones (in increasing order, touching runs joined)."""
    if m > 0 and ends[m - 1] == start:
        ends[m - 1] = end
        return m
    starts[m], ends[m] = start, end
    return m + 1


@njit(nogil=True, cache=True, inline="always")
def _room(counts: np.ndarray, used: int, needed: int) -> np.ndarray:
    """`counts` with room for `needed` more after its first `used` (doubled when it is short)."""
    if used + needed <= counts.size:
        return counts
    grown = np.empty(max(2 * counts.size, used + needed), counts.dtype)
    grown[:used] = counts[:used]
    return grown


@njit(nogil=True, cache=True)
def _segments(lo: np.ndarray, begin: int, count: int, start: np.ndarray, first_cell: np.ndarray) -> int:
    """Split pixels 0..count-1 of one axis into segments of pixels with the same taps' cells: segment s is
    pixels [start[s], start[s + 1]), reading cells first_cell[s] and the next. Returns the number of segments."""
    n = 0
    for i in range(count):
        if i == 0 or lo[begin + i] != lo[begin + i - 1]:
            start[n], first_cell[n] = i, lo[begin + i]
            n += 1
    start[n] = count
    return n


@njit(nogil=True, cache=True)
def threshold_rle(
    source: np.ndarray,  # float32 [K, Y, X]
    index: np.ndarray,  # int64 [N]: instance k reads source[index[k]]
    row_start: np.ndarray,  # int64 [N]: image row of each instance's first tap
    row_begin: np.ndarray,  # int64 [N]
    row_end: np.ndarray,  # int64 [N]
    row_lo: np.ndarray,  # int64 [*]
    row_w_hi: np.ndarray,  # float32 [*]
    col_start: np.ndarray,
    col_begin: np.ndarray,
    col_end: np.ndarray,
    col_lo: np.ndarray,
    col_w_hi: np.ndarray,
    threshold: np.float32,
    strict: bool,
    mode: int,
    height: int,
    width: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Uncompressed RLE counts of every instance's mask (value > threshold if strict, else >=) over the
    full height x width frame: (counts, offsets, areas), instance k's counts at counts[offsets[k]:offsets[k+1]].

    Each instance's pixels fall into rectangles between the same four cells (a row segment times a column
    segment); a pixel's value is a convex combination of its four cells, so a rectangle whose cells all
    clear the threshold on one side is decided whole. Down each column, runs of such rectangles become runs
    of the RLE; only rectangles the mask's edge crosses are looked at row by row."""
    n = len(index)
    one = np.float32(1.0)
    # Counts for one run of ones per column (grown when a mask has more): two per run, one more at the end.
    room, max_rows = 0, 0
    for k in range(n):
        room += 2 * (col_end[k] - col_begin[k]) + 3
        max_rows = max(max_rows, row_end[k] - row_begin[k])
    counts = np.empty(room, np.int64)
    offsets = np.zeros(n + 1, np.int64)
    areas = np.zeros(n, np.int64)
    cells_y, cells_x = source.shape[1], source.shape[2]
    y_start, y_cell = np.empty(cells_y + 1, np.int64), np.empty(cells_y + 1, np.int64)
    x_start, x_cell = np.empty(cells_x + 1, np.int64), np.empty(cells_x + 1, np.int64)
    kind = np.empty((cells_x, cells_y), np.int8)  # per rectangle [x segment, y segment]: OUT, IN or EDGE
    run_kind, run_from, run_to = np.empty(cells_y, np.int8), np.empty(cells_y, np.int64), np.empty(cells_y, np.int64)
    ones_start, ones_end = np.empty(max_rows + 1, np.int64), np.empty(max_rows + 1, np.int64)  # a column's runs
    for k in range(n):
        out, written_to, open_start, open_end = offsets[k], 0, -1, -1  # the run being extended, frame indices
        counts = _room(counts, out, 3)  # the open run and the last zeros
        cells = source[index[k]]
        last_y, last_x = cells_y - 1, cells_x - 1
        r0, rows = row_begin[k], row_end[k] - row_begin[k]
        c0, cols = col_begin[k], col_end[k] - col_begin[k]
        if rows > 0 and cols > 0:
            n_y = _segments(row_lo, r0, rows, y_start, y_cell)
            n_x = _segments(col_lo, c0, cols, x_start, x_cell)
            for sx in range(n_x):
                x0 = x_cell[sx]
                x1 = min(x0 + 1, last_x)
                for sy in range(n_y):
                    y0 = y_cell[sy]
                    y1 = min(y0 + 1, last_y)
                    low = min(min(cells[y0, x0], cells[y0, x1]), min(cells[y1, x0], cells[y1, x1]))
                    high = max(max(cells[y0, x0], cells[y0, x1]), max(cells[y1, x0], cells[y1, x1]))
                    margin = MARGIN * max(high, -low)
                    kind[sx, sy] = _IN if low > threshold + margin else (_OUT if high < threshold - margin else _EDGE)
            for sx in range(n_x):
                # This column segment's runs of rectangles: OUT and IN rectangles merged, EDGE ones alone.
                runs = 0
                for sy in range(n_y):
                    if sy > 0 and kind[sx, sy] != _EDGE and kind[sx, sy] == run_kind[runs - 1]:
                        run_to[runs - 1] = sy + 1
                    else:
                        run_kind[runs], run_from[runs], run_to[runs] = kind[sx, sy], sy, sy + 1
                        runs += 1
                x0 = x_cell[sx]
                x1 = min(x0 + 1, last_x)
                for j in range(x_start[sx], x_start[sx + 1]):
                    wx1 = col_w_hi[c0 + j]
                    wx0 = one - wx1
                    m = 0
                    for r in range(runs):
                        if run_kind[r] == _IN:
                            m = _append(ones_start, ones_end, m, y_start[run_from[r]], y_start[run_to[r]])
                        elif run_kind[r] == _EDGE:
                            sy = run_from[r]
                            y0 = y_cell[sy]
                            y1 = min(y0 + 1, last_y)
                            v00, v01, v10, v11 = cells[y0, x0], cells[y1, x0], cells[y0, x1], cells[y1, x1]
                            margin = MARGIN * max(max(abs(v00), abs(v01)), max(abs(v10), abs(v11)))
                            upper, lower = threshold + margin, threshold - margin
                            a = v00 * wx0 + v10 * wx1  # this column's lerps along x
                            b = v01 * wx0 + v11 * wx1
                            if min(a, b) > upper:
                                m = _append(ones_start, ones_end, m, y_start[sy], y_start[sy + 1])
                            elif max(a, b) >= lower:  # pixel by pixel
                                for p in range(y_start[sy], y_start[sy + 1]):
                                    wy1 = row_w_hi[r0 + p]
                                    wy0 = one - wy1
                                    value = a * wy0 + b * wy1
                                    if value > upper:
                                        on = True
                                    elif value < lower:
                                        on = False
                                    else:
                                        exact = _exact(mode, v00, v01, v10, v11, wy0, wy1, wx0, wx1)
                                        on = bool(exact > threshold if strict else exact >= threshold)
                                    if on:
                                        m = _append(ones_start, ones_end, m, p, p + 1)
                    column = (col_start[k] + j) * height + row_start[k]  # frame index of local row 0
                    counts = _room(counts, out, 2 * m + 3)  # this column's runs, then as at the start
                    for q in range(m):
                        if column + ones_start[q] == open_end:  # continues the open run (full-height columns)
                            open_end = column + ones_end[q]
                            continue
                        if open_start >= 0:
                            counts[out], counts[out + 1] = open_start - written_to, open_end - open_start
                            out, written_to = out + 2, open_end
                        open_start, open_end = column + ones_start[q], column + ones_end[q]
        if open_start >= 0:
            counts[out], counts[out + 1] = open_start - written_to, open_end - open_start
            out, written_to = out + 2, open_end
        for c in range(offsets[k] + 1, out, 2):
            areas[k] += counts[c]
        if written_to < height * width:  # the zeros after the last run (all of them for an empty mask)
            counts[out] = height * width - written_to
            out += 1
        offsets[k + 1] = out
    return counts[: offsets[n]], offsets, areas
