"""Images larger than every shape bucket are tiled, not shrunk: the tile plan, finishing a tile straight into
the full frame, the merge, evaluation on whole images, and the tiled path on a real model (a mosaic of four
copies of one HeLa nucleus tile answers four times that tile, each copy at its place)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as mask_utils

from export.metadata import DETECTION_OUTPUTS, MASK_OUTPUT, GraphMetadata
from export.onnx_export import build_metadata
from inference.predictor import Predictor
from inference.sizing import pad_batch, shape_buckets
from inference.tiling import TilePlan, check_overlap, cut_tile, finish_tile, merge_tiles, plan_tiles
from model.finishing import Instance, finish_image
from model.input_contract import InputContract, resized_shape
from model.intensity import decode_rgb8
from model.runtime import TorchRuntime
from tests.service_models import CATEGORY_IDS, tiny_detector
from tests.test_finishing import box28_cases, coco_string, logprob_cases
from training.evaluate import evaluate, load_coco, main

SOME = settings(max_examples=60, deadline=None, derandomize=True)


def decode(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")})


def rectangle_rle(box: tuple[int, int, int, int], frame: tuple[int, int]) -> dict:
    mask = np.zeros(frame, np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 1
    return {"size": list(frame), "counts": coco_string(mask)}


# ---------------------------------------------------------------- finishing a tile in the full frame
@SOME
@given(
    case=st.one_of(box28_cases().map(lambda c: ("box28", c)), logprob_cases().map(lambda c: ("logprob_s4", c))),
    origin=st.tuples(st.integers(0, 50), st.integers(0, 50)),
    margin=st.tuples(st.integers(0, 30), st.integers(0, 30)),
    mask_format=st.sampled_from(["rle", "polygon"]),
)
def test_finishing_a_tile_in_its_frame_equals_pasting_it_at_its_origin(
    case: tuple[str, dict], origin: tuple[int, int], margin: tuple[int, int], mask_format: str
) -> None:
    kind, case = case
    count = len(case["boxes"])
    outputs = {
        "num_dets": count,
        "boxes": case["boxes"],
        "scores": np.linspace(0.9, 0.5, count, dtype=np.float32),
        "classes": np.arange(count),
        "masks": case["masks"] if kind == "box28" else case["logprobs"],
    }
    common = {
        "mask_kind": kind,
        "input_size": case["input_size"],
        "image_size": case["image_size"],
        "mask_threshold": case["threshold"],
    }
    (y0, x0), (height, width) = origin, case["image_size"]
    frame = (y0 + height + margin[0], x0 + width + margin[1])
    alone = finish_image(**outputs, **common)
    placed = finish_image(**outputs, **common, origin=origin, frame_size=frame, mask_format=mask_format)
    assert len(placed) == len(alone)
    for tile, full in zip(alone, placed):
        assert full.box == tuple(float(np.float32(v) + np.float32(o)) for v, o in zip(tile.box, (x0, y0, x0, y0)))
        assert (full.score, full.class_index, full.area) == (tile.score, tile.class_index, tile.area)
        if mask_format == "rle":
            pasted = np.zeros(frame, np.uint8)
            pasted[y0 : y0 + height, x0 : x0 + width] = decode(tile.rle)
            assert full.rle == {"size": list(frame), "counts": coco_string(pasted)}
        else:
            tile_polygons = finish_image(**outputs, **common, mask_format="polygon")
            shifted = [
                [[v + (x0, y0)[i % 2] for i, v in enumerate(ring)] for ring in t.polygons] for t in tile_polygons
            ]
            assert [p.polygons for p in placed] == shifted
            break


def segment_tiled(
    image: np.ndarray, plan: TilePlan, infer: Any, pad_value: tuple[int, int, int], batch_size: int, **options: Any
) -> list[Instance]:
    """Every tile of ``image`` through ``infer``, ``batch_size`` per call, finished in the frame and merged: the
    tiling primitives alone, without the pipeline around them."""
    per_tile: list[list[Instance]] = []
    for first in range(0, len(plan.tiles), batch_size):
        tiles = plan.tiles[first : first + batch_size]
        outputs = infer(pad_batch([cut_tile(image, tile) for tile in tiles], plan.bucket, pad_value))
        for i, tile in enumerate(tiles):
            per_tile.append(finish_tile({name: value[i] for name, value in outputs.items()}, plan, tile, **options))
    return merge_tiles(plan, per_tile)


# ---------------------------------------------------------------- the plan
@SOME
@given(
    size=st.tuples(st.integers(1, 3000), st.integers(1, 3000)),
    scale=st.sampled_from([1.0, 0.5, 1 / 3, 0.37, 2.0, 4.5]),
    bucket=st.sampled_from([(128, 128), (128, 192), (256, 96)]),
    overlap=st.integers(0, 48),
)
def test_tiles_cover_the_image_with_the_overlap_and_their_cores_partition_it(
    size: tuple[int, int], scale: float, bucket: tuple[int, int], overlap: int
) -> None:
    check_overlap([bucket], overlap)
    input_size = resized_shape(size[0], size[1], round(min(size) * scale), 10**9)
    assume(min(input_size) >= 1)
    plan = plan_tiles(size, input_size, [bucket], overlap)
    if input_size[0] <= bucket[0] and input_size[1] <= bucket[1]:
        assert plan is None  # it fits: it runs whole, as ever
        return
    assume(plan is not None)  # only images enlarged so much that a pixel nearly fills a bucket run whole
    assert plan.bucket == bucket and plan.image_size == size
    rows = 1 + max(t.grid[0] for t in plan.tiles)
    cols = 1 + max(t.grid[1] for t in plan.tiles)
    assert len(plan.tiles) == rows * cols > 1 and len(plan.row_bounds) == rows - 1 and len(plan.col_bounds) == cols - 1
    for axis, bounds in ((0, plan.row_bounds), (1, plan.col_bounds)):
        factor = input_size[axis] / size[axis]
        starts = sorted({t.origin[axis] for t in plan.tiles})
        extent = plan.tiles[0].size[axis]
        assert all(t.size[axis] == extent and t.input_size[axis] <= bucket[axis] for t in plan.tiles)
        assert all(t.input_size[axis] == max(int(extent * factor + 0.5), 1) for t in plan.tiles)  # resized as an image
        assert starts[0] == 0 and starts[-1] + extent == size[axis]  # the tiles cover the axis
        if len(starts) > 1:
            assert min(a + extent - b for a, b in itertools.pairwise(starts)) >= math.ceil(overlap / factor)
            # Every pixel centre lies in exactly one core, and that core's tile holds the pixel.
            centres = np.arange(size[axis]) + 0.5
            owner = np.searchsorted(bounds, centres, side="right")
            first = np.asarray(starts)[owner]
            assert np.all((first <= centres) & (centres < first + extent))
            assert np.all(np.diff(owner) >= 0) and set(owner.tolist()) == set(range(len(starts)))


def test_images_that_fit_a_bucket_are_never_tiled() -> None:
    """With the photo rule every image fits the default buckets, so nothing changes for them."""
    buckets = shape_buckets(256, 512, 32)
    for height, width in [(1, 1), (256, 256), (700, 1100), (5000, 8000), (30, 2000), (2000, 30)]:
        assert plan_tiles((height, width), resized_shape(height, width, 256, 512), buckets, 64) is None
    plan = plan_tiles((700, 1100), (700, 1100), buckets, 64)  # the same image at its native scale is tiled
    assert (
        plan is not None and plan.bucket in ((256, 512), (512, 256)) and all(t.input_size == t.size for t in plan.tiles)
    )
    with pytest.raises(ValueError, match="half"):
        check_overlap(buckets, 129)


# ---------------------------------------------------------------- the merge
def instance(
    box: tuple[int, int, int, int], score: float, class_index: int = 0, frame: tuple[int, int] = (100, 180)
) -> Instance:
    x0, y0, x1, y1 = box
    return Instance(
        box=tuple(map(float, box)),
        score=score,
        class_index=class_index,
        area=(x1 - x0) * (y1 - y0),
        rle=rectangle_rle(box, frame),
    )


def test_the_merge_keeps_an_object_seen_by_two_overlapping_tiles_once() -> None:
    plan = plan_tiles((100, 180), (100, 180), [(100, 100)], 20)
    assert [t.origin for t in plan.tiles] == [(0, 0), (0, 80)] and plan.col_bounds.tolist() == [90.0]
    left, right = [], []
    # One object, whole in both tiles, its centre on the left of the core boundary: only the left tile keeps it.
    left.append(instance((80, 10, 95, 30), 0.9))
    right.append(instance((81, 10, 96, 30), 0.95))
    # One object seen a little differently by each tile, so that both copies pass the core rule: mask IoU
    # 10/18 > 0.5 keeps the higher score only.
    left.append(instance((80, 40, 92, 60), 0.6))
    right.append(instance((82, 40, 98, 60), 0.7))
    left.append(instance((80, 40, 92, 60), 0.5, class_index=1))  # another class on the same pixels: kept
    # An object the left tile sees cut by its edge, whole in the right tile: the cut copy's centre is in the right core.
    left.append(instance((92, 70, 100, 80), 0.8))
    right.append(instance((92, 70, 105, 80), 0.85))
    left.append(instance((10, 10, 30, 30), 0.4))
    right.append(instance((150, 10, 170, 30), 0.3))
    merged = merge_tiles(plan, [left, right])
    assert [(i.box, i.score) for i in merged] == [
        ((80.0, 10.0, 95.0, 30.0), 0.9),
        ((92.0, 70.0, 105.0, 80.0), 0.85),
        ((82.0, 40.0, 98.0, 60.0), 0.7),
        ((80.0, 40.0, 92.0, 60.0), 0.5),
        ((10.0, 10.0, 30.0, 30.0), 0.4),
        ((150.0, 10.0, 170.0, 30.0), 0.3),
    ]
    assert merge_tiles(plan, [left, right], limit=2) == merged[:2]
    # Masks skipped: the boxes decide (the duplicate's box IoU is the same 10/18).
    boxes_only = [[Instance(i.box, i.score, i.class_index, None) for i in tile] for tile in (left, right)]
    assert [(i.box, i.score) for i in merge_tiles(plan, boxes_only)] == [(i.box, i.score) for i in merged]


# ---------------------------------------------------------------- the tiled path, end to end on rectangles
class RectangleRuntime:
    """A detector of bright rectangles (value > 128 in the red channel) with all-ones box masks: it finds
    every whole rectangle exactly, and a rectangle cut by the image edge as the part it sees, scored by
    the area it sees (so a cut copy scores lower). Records the batch shapes it ran."""

    def __init__(self, max_detections: int = 64) -> None:
        self.max_detections = max_detections
        self.shapes: list[tuple[int, ...]] = []

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        self.shapes.append(images.shape)
        batch, k = len(images), self.max_detections
        out = {
            "num_dets": np.zeros(batch, np.int64),
            "boxes": np.zeros((batch, k, 4), np.float32),
            "scores": np.zeros((batch, k), np.float32),
            "classes": np.zeros((batch, k), np.int64),
            "masks": np.ones((batch, k, 28, 28), np.float32),
        }
        for i, image in enumerate(images):
            _, _, stats, _ = cv2.connectedComponentsWithStats((image[0] > 128).astype(np.uint8), connectivity=4)
            found = stats[1:]
            out["num_dets"][i] = len(found)
            for j, (x, y, w, h, area) in enumerate(found):
                out["boxes"][i, j] = [x, y, x + w, y + h]
                out["scores"][i, j] = 1 - 1 / (1 + area)
        return out


def rectangles_image(
    rng: np.random.Generator, size: tuple[int, int], largest: int
) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """A dark RGB image with bright rectangles of at most `largest` pixels a side, apart from each other."""
    pixels = np.full((*size, 3), 30, np.uint8)
    cell = largest + 2
    boxes = []
    for y in range(0, size[0] - cell + 1, cell):
        for x in range(0, size[1] - cell + 1, cell):
            if rng.random() < 0.7:
                h, w = rng.integers(1, largest + 1, 2)
                top, left = y + 1 + rng.integers(0, cell - 1 - h), x + 1 + rng.integers(0, cell - 1 - w)
                pixels[top : top + h, left : left + w] = 220
                boxes.append((int(left), int(top), int(left + w), int(top + h)))
    return pixels, boxes


@settings(max_examples=25, deadline=None, derandomize=True)
@given(size=st.tuples(st.integers(30, 220), st.integers(65, 260)), seed=st.integers(0, 2**32 - 1))
def test_every_object_comes_out_once_with_its_exact_box_and_mask(size: tuple[int, int], seed: int) -> None:
    """Objects no larger than the overlap, anywhere (across tile edges and corners): the merged answer holds
    each exactly once, with its box and full-frame mask, whatever the tiles saw of it."""
    pixels, boxes = rectangles_image(np.random.default_rng(seed), size, largest=24)
    plan = plan_tiles(size, size, [(64, 64)], 24)
    runtime = RectangleRuntime()
    merged = segment_tiled(pixels, plan, runtime.infer, (124, 116, 104), 4, mask_kind="box28")
    assert sorted(tuple(int(v) for v in i.box) for i in merged) == sorted(boxes)
    for inst in merged:
        assert inst.rle == rectangle_rle(tuple(int(v) for v in inst.box), size)
    assert all(shape[2:] == (64, 64) for shape in runtime.shapes)


@pytest.fixture(scope="module")
def rectangles_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Three images at scale 1 for `RECTANGLES_SPEC` (short side 64): 64x200 and 64x180 (larger than a 64x64
    tile) and 64x64; COCO annotations of their rectangles."""
    root = tmp_path_factory.mktemp("rectangles")
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for image_id, size in enumerate([(64, 200), (64, 64), (64, 180)], start=1):
        pixels, boxes = rectangles_image(rng, size, largest=20)
        Image.fromarray(pixels).save(root / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": size[0], "width": size[1]})
        for x0, y0, x1, y1 in boxes:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "iscrowd": 0,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "segmentation": rectangle_rle((x0, y0, x1, y1), size),
                }
            )
    categories = [{"id": 1, "name": "rectangle"}]
    (root / "annotations.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return str(root / "annotations.json"), str(root)


RECTANGLES = GraphMetadata(
    method="meinst",
    mask_kind="box28",
    class_names=["rectangle"],
    category_ids=[1],
    score_threshold=0.05,
    nms_threshold=0.6,
    max_detections=64,
    pre_nms_topk=1000,
    strides=[8, 16, 32, 64, 128],
    mask_threshold=0.5,
    mask_size=28,
    input=InputContract(pad_value=[124, 116, 104], size_divisibility=32, min_size=64, max_size=200),
    output_names=[*DETECTION_OUTPUTS, MASK_OUTPUT],
)
# 200 wide in 64-pixel tiles overlapping by 20: 5 tiles; 64x64: whole; 180 wide: 4 tiles.
TILED_ELEMENTS = 5 + 1 + 4


def test_evaluation_tiles_images_larger_than_the_tile_and_scores_whole_images(
    rectangles_dataset: tuple[str, str],
) -> None:
    """COCO AP of a detector that is right on every object stays 100 when the images are tiled."""
    annotations, images = rectangles_dataset
    runtime = RectangleRuntime()
    predictor = Predictor(runtime, RECTANGLES, buckets=[(64, 64)], tile_overlap=20)
    metrics = evaluate(predictor, load_coco(annotations), images)
    assert metrics["bbox"]["AP"] == metrics["segm"]["AP"] == 100.0
    assert {shape[2:] for shape in runtime.shapes} == {(64, 64)}  # no image ran whole at 64x224 or 64x192
    assert sum(shape[0] for shape in runtime.shapes) == TILED_ELEMENTS


def test_the_evaluate_command_line_takes_the_tile_size_and_overlap(
    rectangles_dataset: tuple[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    runtime = RectangleRuntime()

    def rectangle_predictor(path: str, options: Any, **settings: Any) -> Predictor:
        del settings["cache_dir"]
        return Predictor(runtime, RECTANGLES, **settings)

    monkeypatch.setattr("training.evaluate.Predictor.open", rectangle_predictor)
    annotations, images = rectangles_dataset
    main(
        [
            "--checkpoint",
            "unused.pt",
            "--annotations",
            annotations,
            "--images",
            images,
            "--output",
            str(tmp_path / "results.json"),
            "--tile-size",
            "64x64",
            "--tile-overlap",
            "20",
            "--batch-size",
            "4",
        ]
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["segm"]["AP"] == 100.0 and summary["buckets"] == [[64, 64]] and summary["tile_overlap"] == 20
    assert {shape[2:] for shape in runtime.shapes} == {(64, 64)} and max(shape[0] for shape in runtime.shapes) == 4
    with pytest.raises(SystemExit):
        main(
            [
                "--checkpoint",
                "x",
                "--annotations",
                annotations,
                "--images",
                images,
                "--tile-size",
                "64x64",
                "--tile-overlap",
                "40",
            ]
        )


# ---------------------------------------------------------------- the tiled path on a real model
@pytest.mark.parametrize("method", ["meinst", "embedmask"])
def test_a_mosaic_of_four_copies_of_a_nucleus_tile_answers_four_times_that_tile(
    nucleus_root: Path, method: str
) -> None:
    model, cfg = tiny_detector(method)
    spec = build_metadata(cfg, {"category_ids": CATEGORY_IDS})
    runtime = TorchRuntime(model)
    tile = decode_rgb8(min((nucleus_root / "val").glob("*.png")).read_bytes(), "percentile")
    height, width = tile.shape[:2]
    bucket = (-(-height // 32) * 32, -(-width // 32) * 32)
    options = {"mask_kind": spec.mask_kind, "mask_threshold": spec.mask_threshold, "box_padding": spec.box_padding}

    out = runtime.infer(pad_batch([tile.transpose(2, 0, 1)], bucket, tuple(spec.input.pad_value)))
    single = finish_image(
        *(out[k][0] for k in ("num_dets", "boxes", "scores", "classes", "masks")),
        input_size=(height, width),
        image_size=(height, width),
        **options,
    )
    assert len(single) >= 5

    mosaic = np.tile(tile, (2, 2, 1))  # the copies meet edge to edge: no overlap keeps each tile on one copy
    plan = plan_tiles(mosaic.shape[:2], mosaic.shape[:2], [bucket], 0)  # the native scale, s = 1
    assert [t.origin for t in plan.tiles] == [(0, 0), (0, width), (height, 0), (height, width)]
    merged = segment_tiled(mosaic, plan, runtime.infer, tuple(spec.input.pad_value), 1, **options)
    assert len(merged) == 4 * len(single)
    for dy, dx in ((0, 0), (0, width), (height, 0), (height, width)):
        copy = [
            i
            for i in merged
            if dx <= (i.box[0] + i.box[2]) / 2 < dx + width and dy <= (i.box[1] + i.box[3]) / 2 < dy + height
        ]
        assert len(copy) == len(single)
        for got, want in zip(copy, single):
            np.testing.assert_allclose(got.box, np.add(want.box, (dx, dy, dx, dy)), atol=1.0)
            assert (got.score, got.class_index, got.area) == (want.score, want.class_index, want.area)
            shifted = np.zeros(mosaic.shape[:2], np.uint8)
            shifted[dy : dy + height, dx : dx + width] = decode(want.rle)
            assert got.rle == {"size": list(mosaic.shape[:2]), "counts": coco_string(shifted)}
