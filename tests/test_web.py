"""What a person looks at: the web page at `/` in headless Chromium, the overlay and label PNG answers of
`POST /segment`, the page's RLE decoder in Node, and `python -m service.predict`.

One real `python -m service` on loopback serves tiny random-weight MEInst and EmbedMask checkpoints
(tests/service_models.py); the images are a Debian labelme VOC photo and a HeLa nucleus tile.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from service.launcher import ServiceProcess
from service.render import instance_colours, label_image, overlay_image
from service.schemas import SegmentResponse
from service.settings import REPO
from tests.service_models import CATEGORY_IDS, CLASS_NAMES, tiny_checkpoint
from training.data import load_rgb

VOC = Path("/usr/share/doc/labelme-examples/examples/instance_segmentation/data_dataset_coco/JPEGImages")
PHOTO = VOC / "2011_000003.jpg"
METHODS = ("meinst", "embedmask")
CPU = ["--providers", '["CPUExecutionProvider"]']
NODE_TEST = REPO / "tests" / "web" / "rle.test.mjs"
PAGE_THRESHOLD = "0.05"  # the tiny models' scores sit just above the graph's 0.05


# ---------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("web")


@pytest.fixture(scope="module")
def checkpoints(workdir: Path) -> dict[str, Path]:
    return {method: tiny_checkpoint(method, workdir / f"{method}.pt") for method in METHODS}


@pytest.fixture(scope="module")
def server(workdir: Path, checkpoints: dict[str, Path]) -> Iterator[ServiceProcess]:
    models = [{"name": method, "path": str(path)} for method, path in checkpoints.items()]
    process = ServiceProcess(["--models", json.dumps(models), "--cache-dir", str(workdir / "cache"), *CPU], workdir / "server.log")
    try:
        process.wait_ready()
        yield process
    finally:
        process.terminate()


def segment(url: str, data: bytes, **params: Any) -> httpx.Response:
    return httpx.post(f"{url}/segment", content=data, headers={"Content-Type": "application/octet-stream"}, params=params, timeout=60)


def answer(url: str, data: bytes, **params: Any) -> SegmentResponse:
    response = segment(url, data, **params)
    assert response.status_code == 200, response.text
    return SegmentResponse.model_validate_json(response.content)


def png_array(data: bytes) -> np.ndarray:
    """A PNG as OpenCV reads it unchanged (RGB order for colour images)."""
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    return cv2.cvtColor(array, cv2.COLOR_BGR2RGB) if array.ndim == 3 else array


def masks_of(body: SegmentResponse) -> list[np.ndarray]:
    return [mask_utils.decode({"size": list(i.segmentation.size), "counts": i.segmentation.counts.encode()}) for i in body.instances]


def nucleus_tile(nucleus_root: Path) -> Path:
    return sorted((nucleus_root / "val").glob("*.png"))[0]


# ---------------------------------------------------------------- overlay and label answers
def test_overlay_answer_draws_each_instance_on_the_image(server: ServiceProcess) -> None:
    data = PHOTO.read_bytes()
    body = answer(server.url, data, model="embedmask")
    response = segment(server.url, data, model="embedmask", render="overlay")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert int(response.headers["x-instances"]) == len(body.instances) > 0
    drawn, photo = png_array(response.content), np.asarray(load_rgb(str(PHOTO)))
    assert drawn.shape == photo.shape and drawn.dtype == np.uint8
    masks = masks_of(body)
    union = np.any(masks, axis=0)
    outside = cv2.dilate(union.astype(np.uint8), np.ones((5, 5), np.uint8)) == 0  # clear of every outline
    assert np.array_equal(drawn[outside], photo[outside])  # the picture is untouched away from the masks
    first = masks[0].astype(bool)
    tint = np.abs(drawn[first].astype(int) - photo[first]).sum(axis=1)
    assert (tint > 0).mean() > 0.9  # the first (highest-scoring) instance is drawn over all of its pixels
    assert np.array_equal(drawn, overlay_image(photo, body))  # the same picture predict and the page draw

    boxes = segment(server.url, data, model="embedmask", render="overlay", mask_format="none")
    assert boxes.status_code == 200
    changed = np.any(png_array(boxes.content) != photo, axis=2)
    outlines = np.zeros(changed.shape, np.uint8)
    for x, y, w, h in (i.bbox for i in body.instances):
        cv2.rectangle(outlines, (round(x), round(y)), (round(x + w) - 1, round(y + h) - 1), 1, 1)
    assert not np.any(changed & (outlines == 0)) and changed.sum() > 0.9 * outlines.sum()  # box outlines only


def test_label_answer_is_a_16_bit_label_image(server: ServiceProcess, nucleus_root: Path) -> None:
    data = nucleus_tile(nucleus_root).read_bytes()
    body = answer(server.url, data, model="meinst")
    response = segment(server.url, data, model="meinst", mask_format="label")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert int(response.headers["x-instances"]) == len(body.instances) > 1
    with Image.open(io.BytesIO(response.content)) as opened:  # as scikit-image, napari and Fiji read it
        assert opened.format == "PNG" and opened.mode in ("I;16", "I;16B", "I")
        labels = np.asarray(opened).astype(np.int64)
    assert png_array(response.content).dtype == np.uint16
    assert labels.shape == (body.height, body.width)
    masks = masks_of(body)
    assert np.array_equal(labels > 0, np.any(masks, axis=0))
    claimed = np.zeros(labels.shape, bool)
    for value, mask in enumerate(masks, start=1):
        own = mask.astype(bool) & ~claimed  # higher scores (lower values) keep overlapping pixels
        assert np.all(labels[own] == value)
        claimed |= mask.astype(bool)
    assert set(np.unique(labels)) <= set(range(len(masks) + 1)) and len(np.unique(labels)) > 2
    assert np.array_equal(labels, label_image(body))


def test_unsupported_combinations_get_422_with_a_reason(server: ServiceProcess) -> None:
    data = PHOTO.read_bytes()
    for params in ({"render": "overlay", "mask_format": "label"}, {"render": "overlay", "mask_format": "polygon"}):
        response = segment(server.url, data, model="meinst", **params)
        assert response.status_code == 422 and "render=overlay" in response.json()["error"], params
    response = segment(server.url, data, model="meinst", render="svg")
    assert response.status_code == 422 and "render" in response.json()["error"]
    spec = httpx.get(f"{server.url}/openapi.json").json()["paths"]["/segment"]["post"]
    assert {"application/json", "image/png"} <= set(spec["responses"]["200"]["content"])
    assert "X-Instances" in spec["responses"]["200"]["headers"]
    assert {p["name"] for p in spec["parameters"]} >= {"render", "mask_format"}


# ---------------------------------------------------------------- the RLE decoder in Node
def node_major() -> int | None:
    node = shutil.which("node")
    if node is None:
        return None
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout
    return int(re.match(r"v(\d+)", version)[1])


def test_page_rle_decoder_equals_pycocotools(server: ServiceProcess, nucleus_root: Path, workdir: Path) -> None:
    major = node_major()
    if major is None or major < 20:
        pytest.skip(f"the decoder test needs Node >= 20 (found {major}); the Python tests cover the same masks")
    masks, labels = [], []
    images = {"photo": PHOTO.read_bytes(), "nuclei": nucleus_tile(nucleus_root).read_bytes()}
    for method in METHODS:
        for name, data in images.items():
            body = answer(server.url, data, model=method, max_detections=10)
            for index, (instance, mask) in enumerate(zip(body.instances, masks_of(body))):
                flat = mask.ravel(order="F")  # COCO runs are column-major, starting with zeros
                changes = np.flatnonzero(np.diff(flat)) + 1
                runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
                masks.append({
                    "name": f"{method}/{name}/{index}",
                    "rle": instance.segmentation.model_dump(mode="json"),
                    "mask": base64.b64encode(np.ascontiguousarray(mask).tobytes()).decode(),
                    "runs": ([0] if flat[0] else []) + runs,
                    "area": instance.area,
                })
            labels.append({
                "name": f"{method}/{name}", "height": body.height, "width": body.width,
                "rles": [i.segmentation.model_dump(mode="json") for i in body.instances],
                "labels": base64.b64encode(label_image(body).astype("<u2").tobytes()).decode(),
            })
    cases = workdir / "rle_cases.json"
    cases.write_text(json.dumps({"masks": masks, "labels": labels, "colours": instance_colours(24).tolist()}))
    result = subprocess.run(  # app.js is an ES module without a package.json: Node 20 must be told to detect it
        ["node", "--experimental-detect-module", "--test", str(NODE_TEST)], capture_output=True, text=True, timeout=120,
        env={**os.environ, "ONESTAGE_RLE_CASES": str(cases)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"# pass 5\b", result.stdout) and re.search(r"# fail 0\b", result.stdout), result.stdout
