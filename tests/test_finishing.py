"""Mask finishing equals the full-frame torch pastes of the reference implementations and pycocotools' RLE.

The references paste into a canvas of the whole image with torch, as detectron2 (MEInst) and EM-mrcnn
(EmbedMask) do; `model.finishing` works box-locally and must give the same binary masks and the same
RLE strings, bit for bit, over random masks, borders, ties, empty and full masks, and scale factors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_utils

from model import mask_kernel
from model.finishing import (
    MIN_INSTANCES_PER_WORKER,
    RunLengths,
    encode_rles,
    finish_image,
    paste_box28_rles,
    polygons_from_counts,
    scale_boxes,
    upsample_logprob_rles,
)
from model.mask_contract import LOGPROB_STRIDE, OUTSIDE_LOG_PROB

EXAMPLES = settings(max_examples=150, deadline=None, derandomize=True)
LOG_053 = float(np.float32(math.log(0.53)))


# ---------------------------------------------------------------- references (full frame, torch)
def reference_scale_boxes(
    boxes: np.ndarray, input_size: tuple[int, int], image_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """detectron2 detector_postprocess: Boxes.scale, Boxes.clip, nonempty."""
    (h_in, w_in), (height, width) = input_size, image_size
    t = torch.as_tensor(boxes, dtype=torch.float32).clone()
    t[:, 0::2] *= width / w_in
    t[:, 1::2] *= height / h_in
    for i, limit in enumerate((width, height, width, height)):
        t[:, i] = t[:, i].clamp(min=0, max=limit)
    nonempty = (t[:, 2] - t[:, 0] > 0) & (t[:, 3] - t[:, 1] > 0)
    return t.numpy(), nonempty.numpy()


def reference_paste(mask: np.ndarray, box: np.ndarray, image_size: tuple[int, int], threshold: float) -> np.ndarray:
    """detectron2 paste_masks_in_image over the whole frame, then >= threshold."""
    height, width = image_size
    x0, y0, x1, y1 = torch.as_tensor(box, dtype=torch.float32)
    gy = ((torch.arange(height, dtype=torch.float32) + 0.5) - y0) / (y1 - y0) * 2 - 1
    gx = ((torch.arange(width, dtype=torch.float32) + 0.5) - x0) / (x1 - x0) * 2 - 1
    grid = torch.stack([gx[None, :].expand(height, width), gy[:, None].expand(height, width)], dim=2)[None]
    pasted = F.grid_sample(torch.as_tensor(mask, dtype=torch.float32)[None, None], grid, align_corners=False)
    return (pasted[0, 0] >= threshold).numpy()


def reference_upsample(
    logprob: np.ndarray, input_size: tuple[int, int], image_size: tuple[int, int], threshold: float
) -> np.ndarray:
    """EM-mrcnn evaluation: log-domain bilinear upsample of the padded canvas, crop, > log(threshold)."""
    (h_in, w_in), (height, width) = input_size, image_size
    h4, w4 = logprob.shape
    size = (math.ceil(h4 * 4 * height / h_in), math.ceil(w4 * 4 * width / w_in))
    up = F.interpolate(torch.as_tensor(logprob)[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return (up[:height, :width] > math.log(threshold)).numpy()


def graph_crop(logprob: np.ndarray, box: np.ndarray, box_padding: int = 2) -> np.ndarray:
    """The EmbedMask graph's crop (model.embedmask.method): -10 outside floor(box / 4) +- box_padding cells."""
    h4, w4 = logprob.shape
    cells = np.floor(np.maximum(box, 0) / LOGPROB_STRIDE)
    rows, cols = np.arange(h4), np.arange(w4)
    inside = ((rows >= cells[1] - box_padding) & (rows <= cells[3] + box_padding))[:, None] & (
        (cols >= cells[0] - box_padding) & (cols <= cells[2] + box_padding)
    )[None, :]
    return np.where(inside, logprob, np.float32(OUTSIDE_LOG_PROB)).astype(np.float32)


def coco_string(full: np.ndarray) -> str:
    return mask_utils.encode(np.asfortranarray(full.astype(np.uint8)))["counts"].decode("ascii")


def assert_same_masks(runs: RunLengths, references: list[np.ndarray]) -> None:
    """RLE strings and areas equal those of the full-frame reference masks."""
    assert len(runs.counts) == len(references)
    for counts, area, reference in zip(runs.counts, runs.areas, references):
        assert encode_rles([counts], reference.shape)[0]["counts"] == coco_string(reference)
        assert area == int(reference.sum())


# ---------------------------------------------------------------- strategies
def edges(draw: st.DrawFn, extent: int) -> tuple[float, float]:
    """Two sorted box edges: image borders, just outside them, integers or arbitrary float32 values."""
    edge = st.one_of(
        st.sampled_from([0.0, float(extent), -2.0, extent + 2.0]),
        st.integers(-2, extent + 2).map(float),
        st.floats(-4, extent + 4, width=32),
    )
    lo, hi = sorted((draw(edge), draw(edge)))
    return lo, hi


def box28_mask(kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "uniform":
        return rng.random((28, 28))
    if kind == "binary":
        return rng.random((28, 28)) < 0.5
    if kind in ("ones", "zeros", "half"):
        return np.full((28, 28), {"ones": 1.0, "zeros": 0.0, "half": 0.5}[kind])
    if kind == "pixel":
        mask = np.zeros((28, 28))
        mask[tuple(rng.integers(0, 28, 2))] = 1.0
        return mask
    if kind == "near_half":
        return 0.5 + rng.normal(0, 1e-6, (28, 28))
    t = (np.arange(28) + 0.5) / 14 - 1
    return 1 / (1 + np.exp(-8 * (0.6 - t[:, None] ** 2 - t[None, :] ** 2)))


def logprob_map(kind: str, rng: np.random.Generator, shape: tuple[int, int], box: np.ndarray) -> np.ndarray:
    if kind == "normal":
        return rng.normal(-1, 3, shape)
    if kind == "ties":
        return np.full(shape, LOG_053)
    if kind == "near":
        return LOG_053 + rng.normal(0, 1e-6, shape)
    if kind == "certain":
        return np.zeros(shape)
    x0, y0, x1, y1 = box.astype(float)
    ys, xs = (np.arange(shape[0]) + 0.5) * 4, (np.arange(shape[1]) + 0.5) * 4
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2 + 1, (y1 - y0) / 2 + 1
    return math.log(0.53) * (((xs[None, :] - cx) / rx) ** 2 + ((ys[:, None] - cy) / ry) ** 2)


@st.composite
def box28_cases(draw: st.DrawFn) -> dict:
    """One to four instances of one image (the functions work on all of an image's instances at once)."""
    height, width = draw(st.integers(1, 72)), draw(st.integers(1, 72))
    h_in, w_in = draw(st.integers(4, 96)), draw(st.integers(4, 96))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    boxes, masks = [], []
    for _ in range(draw(st.integers(1, 4))):
        (x0, x1), (y0, y1) = edges(draw, w_in), edges(draw, h_in)
        boxes.append([x0, y0, x1, y1])
        masks.append(
            box28_mask(
                draw(st.sampled_from(["uniform", "binary", "ones", "zeros", "pixel", "half", "near_half", "blob"])), rng
            )
        )
    return {
        "boxes": np.array(boxes, dtype=np.float32),
        "masks": np.array(masks, dtype=np.float32),
        "input_size": (h_in, w_in),
        "image_size": (height, width),
        "threshold": draw(st.sampled_from([0.5, 0.5, 0.3, 0.9])),
    }


@st.composite
def logprob_cases(draw: st.DrawFn) -> dict:
    height, width = draw(st.integers(1, 100)), draw(st.integers(1, 100))
    h_in, w_in = draw(st.integers(4, 96)), draw(st.integers(4, 96))
    h4, w4 = math.ceil(h_in / 4) + draw(st.integers(0, 2)), math.ceil(w_in / 4) + draw(st.integers(0, 2))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    boxes, maps = [], []
    for _ in range(draw(st.integers(1, 4))):
        (x0, x1), (y0, y1) = edges(draw, w_in), edges(draw, h_in)
        box = np.array([x0, y0, x1, y1], dtype=np.float32)
        kind = draw(st.sampled_from(["normal", "ties", "near", "certain", "blob"]))
        boxes.append(box)
        maps.append(graph_crop(logprob_map(kind, rng, (h4, w4), box).astype(np.float32), box))
    return {
        "boxes": np.array(boxes),
        "logprobs": np.array(maps),
        "input_size": (h_in, w_in),
        "image_size": (height, width),
        "threshold": draw(st.sampled_from([0.53, 0.53, 0.2, 0.9])),
    }


# ---------------------------------------------------------------- properties
@EXAMPLES
@given(box28_cases())
def test_box28_equals_detectron2_full_frame_paste(case: dict) -> None:
    scaled, nonempty = scale_boxes(case["boxes"], case["input_size"], case["image_size"])
    ref_scaled, ref_nonempty = reference_scale_boxes(case["boxes"], case["input_size"], case["image_size"])
    np.testing.assert_array_equal(scaled, ref_scaled)
    np.testing.assert_array_equal(nonempty, ref_nonempty)
    masks, scaled = case["masks"][nonempty], scaled[nonempty]
    references = [reference_paste(mask, box, case["image_size"], case["threshold"]) for mask, box in zip(masks, scaled)]
    assert_same_masks(paste_box28_rles(masks, scaled, case["image_size"], case["threshold"]), references)


@EXAMPLES
@given(logprob_cases())
def test_logprob_equals_em_mrcnn_full_frame_upsample(case: dict) -> None:
    runs = upsample_logprob_rles(
        case["logprobs"], case["boxes"], case["input_size"], case["image_size"], case["threshold"]
    )
    assert_same_masks(
        runs,
        [
            reference_upsample(logprob, case["input_size"], case["image_size"], case["threshold"])
            for logprob in case["logprobs"]
        ],
    )


@EXAMPLES
@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**32 - 1), st.sampled_from([0.02, 0.5, 0.98, 1.0]))
def test_kernel_rle_equals_pycocotools_encode(height: int, width: int, seed: int, density: float) -> None:
    """The kernel's run writing on its own: taps that read cell values unchanged (weight 0 on the second
    cell) turn a binary source into the same mask, placed anywhere in the frame."""
    rng = np.random.default_rng(seed)
    top, left = rng.integers(0, height + 1), rng.integers(0, width + 1)
    if rng.random() < 0.3:  # full height: runs meet across columns
        top = 0
    h, w = rng.integers(0, height - top + 1), rng.integers(0, width - left + 1)
    if top == 0 and rng.random() < 0.5:
        h = height
    local_mask = rng.random((h, w)) < density
    full = np.zeros((height, width), dtype=bool)
    full[top : top + h, left : left + w] = local_mask

    def taps(start: int, size: int) -> tuple[np.ndarray, ...]:
        return (
            np.array([start]),
            np.array([0]),
            np.array([size]),
            np.arange(size, dtype=np.int64),
            np.zeros(size, np.float32),
        )

    source = np.zeros((1, h + 1, w + 1), np.float32)
    source[0, :h, :w] = local_mask
    counts, offsets, areas = mask_kernel.threshold_rle(
        source,
        np.array([0]),
        *taps(top, h),
        *taps(left, w),
        np.float32(0.5),
        False,
        mask_kernel.GRID_SAMPLE,
        height,
        width,
    )
    assert offsets.tolist() == [0, len(counts)]
    assert_same_masks(RunLengths([counts], areas.tolist()), [full])


# ---------------------------------------------------------------- fixed cases
@pytest.mark.parametrize("box", [(3, 5, 17, 20), (0, 0, 40, 30), (10, 1, 11, 2), (0, 7, 39, 30)])
def test_all_ones_box28_fills_exactly_the_box(box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    runs = paste_box28_rles(np.ones((1, 28, 28), np.float32), np.array(box, np.float32), (30, 40))
    expected = np.zeros((30, 40), dtype=bool)
    expected[y0:y1, x0:x1] = True
    assert_same_masks(runs, [expected])


@pytest.mark.parametrize("threshold", [0.3, 0.5])
@pytest.mark.parametrize("box", [(2.6, 2.6, 20.6, 20.6), (0.5, 3.3, 7.9, 9.1), (10.2, 10.2, 150.2, 100.2)])
def test_low_thresholds_reach_past_the_box_edge(box: tuple[float, ...], threshold: float) -> None:
    """Pixel centres up to half a mask cell outside the box sample the border cells with weight < 0.5."""
    mask, box = np.ones((28, 28), np.float32), np.array(box, np.float32)
    assert_same_masks(
        paste_box28_rles(mask[None], box, (112, 160), threshold), [reference_paste(mask, box, (112, 160), threshold)]
    )


@pytest.mark.parametrize("box", [(15.9, 23.9, 28.0, 36.0), (3.9, 0.0, 40.0, 11.9), (0.0, 20.1, 11.1, 47.9)])
def test_the_whole_bilinear_support_of_the_crop_is_covered(box: tuple[float, ...]) -> None:
    """A near-zero threshold and large values inside the crop light almost every pixel the crop reaches."""
    box = np.array(box, np.float32)
    logprob = graph_crop(np.full((16, 16), 20.0, np.float32), box)
    expected = reference_upsample(logprob, (64, 64), (77, 83), 1e-4)
    assert_same_masks(upsample_logprob_rles(logprob[None], box, (64, 64), (77, 83), 1e-4), [expected])


def test_full_image_masks() -> None:
    size = (37, 23)
    runs = paste_box28_rles(np.ones((1, 28, 28), np.float32), np.array([0, 0, 23, 37], np.float32), size)
    assert runs.counts[0].tolist() == [0, 37 * 23]
    assert_same_masks(runs, [np.ones(size, dtype=bool)])
    logprob = np.zeros((1, 10, 6), np.float32)  # probability 1 everywhere: the whole image
    assert_same_masks(
        upsample_logprob_rles(logprob, np.array([0, 0, 24, 40], np.float32), (40, 24), size),
        [np.ones(size, dtype=bool)],
    )


@pytest.mark.parametrize("shape", [(28, 28), (28, 56), (31, 45)])
def test_exact_ties_resolve_as_torch(shape: tuple[int, int]) -> None:
    """Box sizes that put pixel centres exactly between mask cells: 0/1 masks interpolate to exactly 0.5."""
    rng = np.random.default_rng(0)
    height, width = shape
    mask = (rng.random((28, 28)) < 0.5).astype(np.float32)
    box = np.array([0, 0, width, height], np.float32)
    assert_same_masks(paste_box28_rles(mask[None], box, shape), [reference_paste(mask, box, shape, 0.5)])
    logprob = np.where(rng.random((8, 12)) < 0.5, np.float32(LOG_053), np.float32(0)).astype(np.float32)
    expected = reference_upsample(logprob, (32, 48), shape, 0.53)
    assert_same_masks(
        upsample_logprob_rles(logprob[None], np.array([0, 0, 48, 32], np.float32), (32, 48), shape), [expected]
    )


def test_thresholds_that_would_light_pixels_outside_the_region_are_refused() -> None:
    with pytest.raises(ValueError):
        paste_box28_rles(np.ones((1, 28, 28), np.float32), np.array([0, 0, 5, 5], np.float32), (10, 10), threshold=0.0)
    with pytest.raises(ValueError):
        upsample_logprob_rles(
            np.zeros((1, 4, 4), np.float32), np.array([0, 0, 5, 5], np.float32), (16, 16), (10, 10), threshold=1e-5
        )


# ---------------------------------------------------------------- finish_image
def graph_outputs() -> dict:
    """Four padded detections (plus garbage past num_dets) on a 60x80 input of a 90x120 image."""
    masks = np.zeros((6, 28, 28), np.float32)
    masks[:, 4:24, 6:22] = 1.0
    return {
        "num_dets": np.int64(4),
        "boxes": np.array(
            [[10, 10, 30, 40], [0, 0, 80, 60], [50, 20, 70, 50], [70, 55, 90, 70], [1, 1, 2, 2], [3, 3, 9, 9]],
            np.float32,
        ),
        "scores": np.array([0.3, 0.9, 0.6, 0.8, 0.99, 0.99], np.float32),
        "classes": np.array([4, 1, 2, 7, 0, 0]),
        "masks": masks,
    }


def test_finish_image_scales_filters_orders_and_encodes() -> None:
    outputs = graph_outputs()
    image_size, input_size = (90, 120), (60, 80)
    instances = finish_image(**outputs, mask_kind="box28", input_size=input_size, image_size=image_size)
    assert [i.class_index for i in instances] == [1, 7, 2, 4]  # descending score, garbage rows ignored
    assert instances[0].box == (0.0, 0.0, 120.0, 90.0)
    assert instances[1].box == (105.0, 82.5, 120.0, 90.0)  # clipped to the image
    scaled, _ = scale_boxes(outputs["boxes"], input_size, image_size)
    for inst, k in zip(instances, [1, 3, 2, 0]):
        expected = reference_paste(outputs["masks"][k], scaled[k], image_size, 0.5)
        assert inst.rle == {"size": [90, 120], "counts": coco_string(expected)}
        assert inst.area == int(expected.sum())
        assert inst.score == float(outputs["scores"][k])

    kept = finish_image(
        **outputs,
        mask_kind="box28",
        input_size=input_size,
        image_size=image_size,
        score_threshold=0.5,
        max_detections=2,
    )
    assert [i.class_index for i in kept] == [1, 7]

    outputs["boxes"][3] = [85, 65, 95, 75]  # entirely outside the input: empty once clipped
    assert 7 not in [
        i.class_index for i in finish_image(**outputs, mask_kind="box28", input_size=input_size, image_size=image_size)
    ]


def test_finish_image_skips_masks_and_offers_polygons() -> None:
    outputs = graph_outputs()
    skipped = finish_image(
        **{**outputs, "masks": None}, mask_kind="box28", input_size=(60, 80), image_size=(90, 120), mask_format="none"
    )
    assert [(i.rle, i.area, i.polygons) for i in skipped] == [(None, None, None)] * 4

    import cv2

    for inst in finish_image(
        **outputs, mask_kind="box28", input_size=(60, 80), image_size=(90, 120), mask_format="polygon"
    ):
        assert inst.rle is None and inst.polygons
        canvas = np.zeros((90, 120), np.uint8)
        cv2.fillPoly(canvas, [np.array(p, np.int32).reshape(-1, 2) for p in inst.polygons], 1)
        assert int(canvas.sum()) == inst.area  # a filled rectangle: the contour covers exactly its pixels


def test_finish_image_embedmask_equals_reference() -> None:
    rng = np.random.default_rng(1)
    input_size, image_size = (50, 70), (75, 105)  # padded input 64x96 -> 16x24 stride-4 map
    boxes = np.array([[5, 5, 30, 40], [0, 10, 70, 50], [40, 0, 69, 20]], np.float32)
    masks = np.stack([graph_crop(rng.normal(-0.5, 1.5, (16, 24)).astype(np.float32), b) for b in boxes])
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    instances = finish_image(
        3, boxes, scores, np.arange(3), masks, mask_kind="logprob_s4", input_size=input_size, image_size=image_size
    )
    assert len(instances) == 3
    for inst, mask in zip(instances, masks):
        assert inst.rle["counts"] == coco_string(reference_upsample(mask, input_size, image_size, 0.53))


def test_polygons_of_an_empty_mask() -> None:
    assert polygons_from_counts(np.array([15]), (3, 5)) == []


@pytest.mark.parametrize("kind", ["box28", "logprob_s4"])
def test_threads_split_the_instances_without_changing_the_answer(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    count, input_size, image_size = 40, (64, 96), (96, 144)
    x0, y0 = rng.uniform(-4, 80, count), rng.uniform(-4, 50, count)
    boxes = np.stack([x0, y0, x0 + rng.uniform(1, 40, count), y0 + rng.uniform(1, 30, count)], axis=1).astype(
        np.float32
    )
    if kind == "box28":
        masks = rng.random((count, 28, 28)).astype(np.float32)
    else:
        masks = np.stack([graph_crop(rng.normal(-0.5, 1.5, (16, 24)).astype(np.float32), b) for b in boxes])
    outputs = {
        "num_dets": count,
        "boxes": boxes,
        "scores": rng.random(count).astype(np.float32),
        "classes": np.zeros(count, int),
        "masks": masks,
    }
    kernel, parts = mask_kernel.threshold_rle, []  # instances per kernel call
    monkeypatch.setattr(
        mask_kernel,
        "threshold_rle",
        lambda source, index, *rest: parts.append(len(index)) or kernel(source, index, *rest),
    )
    single = finish_image(**outputs, mask_kind=kind, input_size=input_size, image_size=image_size)
    assert len(single) > 30 and sum(i.area for i in single) > 0
    assert len(parts) == 1
    for workers in (2, 3):
        parts.clear()
        assert (
            finish_image(**outputs, mask_kind=kind, input_size=input_size, image_size=image_size, workers=workers)
            == single
        )
        assert len(parts) == workers and sum(parts) == count
    parts.clear()
    finish_image(**outputs, mask_kind=kind, input_size=input_size, image_size=image_size, workers=8)
    assert len(parts) == count // MIN_INSTANCES_PER_WORKER  # at least MIN_INSTANCES_PER_WORKER instances a thread
