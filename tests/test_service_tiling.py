"""The service on images larger than every shape bucket: `python -m service` with one 128x128 bucket, so that
a wide image is cut into tiles that go through the dynamic batcher and come back merged in the full frame,
as the tiling primitives (`inference.tiling`: plan, cut, finish in the frame, merge) compute offline; a 1x1
image and a 40-megapixel image are answered, one pixel more than the limit gets 413."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from export.runtimes import OnnxRuntime
from inference.runtime import cached_name
from inference.sizing import pad_batch
from inference.tiling import cut_tile, finish_tile, merge_tiles, plan_tiles
from model.intensity import decode_rgb8, load_rgb
from service.launcher import ServiceProcess
from tests.service_models import tiny_checkpoint
from tests.test_service import CPU, METHODS, metrics, ok, png_header_only, post, value

BUCKET = (128, 128)
OVERLAP = 32
MAX_PIXELS = 40_000_000


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("service_tiling")


@pytest.fixture(scope="module")
def checkpoints(workdir: Path) -> dict[str, Path]:
    return {method: tiny_checkpoint(method, workdir / f"{method}.pt") for method in METHODS}


@pytest.fixture(scope="module")
def server(workdir: Path, checkpoints: dict[str, Path]) -> Iterator[ServiceProcess]:
    """Both tiny models (test size 128, longest side 192) with the single bucket 128x128, tiles overlapping
    by 32 input pixels, batches of up to 4, the default 40-megapixel limit."""
    bucket = f"{BUCKET[0]}x{BUCKET[1]}"
    models = [{"name": method, "path": str(path), "buckets": [bucket]} for method, path in checkpoints.items()]
    process = ServiceProcess(
        [
            "--models",
            json.dumps(models),
            "--cache-dir",
            str(workdir / "cache"),
            *CPU,
            "--max-batch-size",
            "4",
            "--max-delay-ms",
            "50",
            "--tile-overlap",
            str(OVERLAP),
            "--max-image-pixels",
            str(MAX_PIXELS),
        ],
        workdir / "server.log",
    )
    try:
        process.wait_ready()
        yield process
    finally:
        process.terminate()


@pytest.fixture(scope="module")
def runtimes(server: ServiceProcess, workdir: Path, checkpoints: dict[str, Path]) -> dict[str, OnnxRuntime]:
    """The graphs the server exported, run offline."""
    graphs = {m: workdir / "cache" / cached_name(checkpoints[m], ".onnx") for m in METHODS}
    return {m: OnnxRuntime(graph, providers=["CPUExecutionProvider"]) for m, graph in graphs.items()}


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def wide_image(nucleus_root: Path) -> bytes:
    """Three real 128x128 nucleus tiles side by side: 128x384, which the photo rule resizes to 64x192 (scale
    0.5), wider than the 128x128 bucket, so it runs as two tiles of 128x256 original pixels."""
    tiles = [decode_rgb8(path.read_bytes(), "percentile") for path in sorted((nucleus_root / "val").glob("*.png"))[:3]]
    return png(np.concatenate(tiles, axis=1))


def offline_tiled(
    runtime: OnnxRuntime, data: bytes, bucket: tuple[int, int] = BUCKET, overlap: int = OVERLAP
) -> tuple[list[dict[str, Any]], int]:
    """The instances computed without the service (plan, cut, graph, finish in the frame, merge), as the
    response encodes them, and the number of tiles."""
    meta = runtime.metadata
    image = np.asarray(load_rgb(io.BytesIO(data)))
    size = image.shape[:2]
    plan = plan_tiles(size, meta.input.resized_shape(*size), [bucket], overlap)
    options = {"mask_kind": meta.mask_kind, "mask_threshold": meta.mask_threshold, "box_padding": meta.box_padding or 0}
    per_tile = []
    for tile in plan.tiles:
        outputs = runtime.infer(pad_batch([cut_tile(image, tile)], plan.bucket, meta.input.pad_value))
        per_tile.append(finish_tile({name: value[0] for name, value in outputs.items()}, plan, tile, **options))
    instances = merge_tiles(plan, per_tile, meta.max_detections * len(plan.tiles))
    encoded = [
        {
            "bbox": [i.box[0], i.box[1], i.box[2] - i.box[0], i.box[3] - i.box[1]],
            "score": i.score,
            "category_id": meta.category_ids[i.class_index],
            "category_name": meta.class_names[i.class_index],
            "area": i.area,
            "segmentation": i.rle,
            "measurements": None,
        }
        for i in instances
    ]
    return json.loads(json.dumps(encoded)), len(plan.tiles)


@pytest.mark.parametrize("method", METHODS)
def test_an_image_wider_than_every_bucket_is_tiled_and_answered_in_its_full_frame(
    server: ServiceProcess, runtimes: dict[str, OnnxRuntime], wide_image: bytes, method: str
) -> None:
    before = metrics(server.url)
    body = ok(post(server.url, wide_image, "image/png", model=method))
    expected, tiles = offline_tiled(runtimes[method], wide_image)
    assert tiles == 2
    assert (body["width"], body["height"]) == (384, 128)
    assert body["instances"] == expected and len(expected) > 5
    for instance in body["instances"]:
        rle = instance["segmentation"]
        assert rle["size"] == [128, 384]
        assert int(mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode()})) == instance["area"]
    after = metrics(server.url)
    assert (
        value(after, "onestage_tiles_per_request_count", model=method)
        - value(before, "onestage_tiles_per_request_count", model=method)
        == 1
    )
    assert (
        value(after, "onestage_tiles_per_request_sum", model=method)
        - value(before, "onestage_tiles_per_request_sum", model=method)
        == 2
    )
    capped = ok(post(server.url, wide_image, "image/png", model=method, max_detections=3))
    assert capped["instances"] == body["instances"][:3]  # the cap applies to the merged answer
    polygons = ok(post(server.url, wide_image, "image/png", model=method, mask_format="polygon"))["instances"]
    assert [i["bbox"] for i in polygons] == [i["bbox"] for i in body["instances"]]
    for ring in (ring for i in polygons for ring in i["segmentation"]):
        assert 0 <= min(ring[0::2]) and max(ring[0::2]) < 384 and 0 <= min(ring[1::2]) and max(ring[1::2]) < 128


def test_concurrent_tiled_requests_share_batches_with_unchanged_answers(
    server: ServiceProcess, wide_image: bytes
) -> None:
    solo = {method: ok(post(server.url, wide_image, "image/png", model=method)) for method in METHODS}
    before = metrics(server.url)
    jobs = [method for method in METHODS for _ in range(3)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda method: post(server.url, wide_image, "image/png", model=method), jobs))
    after = metrics(server.url)
    for method, response in zip(jobs, answers):
        assert ok(response) == solo[method]
    for method in METHODS:
        run = value(after, "onestage_batch_size_count", model=method) - value(
            before, "onestage_batch_size_count", model=method
        )
        assert run < 6, (method, run)  # 3 requests x 2 tiles in fewer, larger batches


def test_a_one_pixel_a_thin_strip_and_a_40_megapixel_image_are_answered_one_pixel_more_is_413(
    server: ServiceProcess,
) -> None:
    tiny = ok(post(server.url, png(np.full((1, 1, 3), 200, np.uint8)), "image/png", model="meinst"))
    assert (tiny["width"], tiny["height"]) == (1, 1)
    assert all(i["segmentation"]["size"] == [1, 1] for i in tiny["instances"])
    strip = ok(post(server.url, png(np.full((2, 3000, 3), 200, np.uint8)), "image/png", model="embedmask"))
    assert (strip["width"], strip["height"]) == (3000, 2)  # 1 x 192 pixels at the photo rule, in two tiles
    width, height = 8000, 5000  # exactly the limit; a flat colour keeps the PNG small
    big = png(np.full((height, width, 3), 90, np.uint8))
    for method in METHODS:
        body = ok(post(server.url, big, "image/png", timeout=120, model=method))
        assert (body["width"], body["height"]) == (width, height)
        assert all(i["segmentation"]["size"] == [height, width] for i in body["instances"])
    over = post(server.url, png_header_only(width + 1, height), "image/png", model="meinst")
    assert over.status_code == 413 and "limit" in over.json()["error"]
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200


@pytest.fixture(scope="module")
def crowded(server: ServiceProcess, workdir: Path, checkpoints: dict[str, Path]) -> Iterator[ServiceProcess]:
    """MEInst alone from the cached graph with one 64x64 bucket (tiles overlapping by 16), batches of up to
    2 and a queue of 3: fewer places than one image's tiles."""
    graph = workdir / "cache" / cached_name(checkpoints["meinst"], ".onnx")
    models = json.dumps([{"name": "meinst", "path": str(graph), "buckets": ["64x64"]}])
    process = ServiceProcess(
        ["--models", models, *CPU, "--max-batch-size", "2", "--max-queue-size", "3", "--tile-overlap", "16"],
        workdir / "crowded.log",
    )
    try:
        process.wait_ready()
        yield process
    finally:
        process.terminate()


def test_an_image_with_more_tiles_than_queue_places_waits_for_its_own_tiles(
    crowded: ServiceProcess, runtimes: dict[str, OnnxRuntime], nucleus_root: Path
) -> None:
    """200x300 at the photo rule is 128x192: twelve 64x64 tiles through a queue of 3, two per batch."""
    pixels = np.asarray(Image.open(min((nucleus_root / "val").glob("*.png"))).convert("RGB").resize((300, 200)))
    data = png(pixels)
    before = metrics(crowded.url)
    body = ok(post(crowded.url, data, "image/png", model="meinst"))
    after = metrics(crowded.url)
    expected, tiles = offline_tiled(runtimes["meinst"], data, (64, 64), 16)
    assert tiles == 12 and body["instances"] == expected
    batches = value(after, "onestage_batch_size_count", model="meinst") - value(
        before, "onestage_batch_size_count", model="meinst"
    )
    elements = value(after, "onestage_batch_size_sum", model="meinst") - value(
        before, "onestage_batch_size_sum", model="meinst"
    )
    assert elements == 12 and batches < 12  # the request filled batches of two
