"""What a person looks at: the web page at `/` in headless Chromium, the overlay and label image answers of
`POST /segment`, the page's RLE decoder in Node, and `python -m service.predict` with its measurements table.

One real `python -m service` on loopback serves tiny random-weight MEInst and EmbedMask checkpoints with the
photo rule and an EmbedMask one with the microscopy contract (tests/service_models.py); the images are a
Debian labelme VOC photo, a HeLa nucleus tile and a raw 16-bit HeLa field as the microscope wrote it.
"""

from __future__ import annotations

import base64
import csv
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
import tifffile
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from model.intensity import load_rgb, stretch_to_uint8
from service.launcher import ServiceProcess, free_port
from service.render import LabelOverflow, instance_colours, label_bytes, label_image, overlay_image
from service.schemas import Measurements, SegmentResponse
from service.settings import REPO
from tests.service_models import CATEGORY_IDS, CLASS_NAMES, microscopy_checkpoint, tiny_checkpoint
from training.nucleus import HELA_IMAGES, resource

VOC = Path("/usr/share/doc/labelme-examples/examples/instance_segmentation/data_dataset_coco/JPEGImages")
PHOTO = VOC / "2011_000003.jpg"
METHODS = ("meinst", "embedmask")
NUCLEI = "nuclei"  # the microscopy model
NUCLEUS_SIZE = 12.0  # its training objects' size (input pixels at its own scale 1): nuclei 12 px across
CPU = ["--runtime.providers", '["CPUExecutionProvider"]']
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
    nuclei = microscopy_checkpoint("embedmask", workdir / f"{NUCLEI}.pt", object_size=NUCLEUS_SIZE)
    models = [{"name": name, "path": str(path)} for name, path in {**checkpoints, NUCLEI: nuclei}.items()]
    process = ServiceProcess(
        ["--models", json.dumps(models), "--cache-dir", str(workdir / "cache"), *CPU], workdir / "server.log"
    )
    try:
        process.wait_ready()
        yield process
    finally:
        process.terminate()


def segment(url: str, data: bytes, **params: Any) -> httpx.Response:
    return httpx.post(
        f"{url}/segment", content=data, headers={"Content-Type": "application/octet-stream"}, params=params, timeout=60
    )


def answer(url: str, data: bytes, **params: Any) -> SegmentResponse:
    response = segment(url, data, **params)
    assert response.status_code == 200, response.text
    return SegmentResponse.model_validate_json(response.content)


def png_array(data: bytes) -> np.ndarray:
    """A PNG as OpenCV reads it unchanged (RGB order for colour images)."""
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    return cv2.cvtColor(array, cv2.COLOR_BGR2RGB) if array.ndim == 3 else array


def masks_of(body: SegmentResponse) -> list[np.ndarray]:
    return [
        mask_utils.decode({"size": list(i.segmentation.size), "counts": i.segmentation.counts.encode()})
        for i in body.instances
    ]


@pytest.fixture(scope="module")
def field_tiff(workdir: Path) -> Path:
    """The bottom band of a HeLa frame (160x1100), as the microscope wrote it: a raw 16-bit TIFF whose 12-bit
    signal sits on an offset of about 33,000, which a browser cannot show and a plain stretch leaves grey."""
    path = workdir / "field.tif"
    tifffile.imwrite(path, tifffile.imread(resource(HELA_IMAGES), key=0)[540:700])
    return path


@pytest.fixture(scope="module")
def nucleus_png(nucleus_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real nucleus tile as an 8-bit PNG (the raw 16-bit tile stretched, as a viewer exports it), which the
    tests' photo-rule models read as it is."""
    raw = np.asarray(Image.open(min((nucleus_root / "val").glob("*.png"))))
    path = tmp_path_factory.mktemp("nucleus_png") / "tile.png"
    Image.fromarray(stretch_to_uint8(raw, 1.0, 99.8)).save(path)
    return path


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


def test_label_answers_are_16_bit_png_or_tiff_label_images(server: ServiceProcess, nucleus_png: Path) -> None:
    data = nucleus_png.read_bytes()
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

    # The same labels as a TIFF, as Fiji, napari and scikit-image (tifffile) and PIL read it.
    response = segment(server.url, data, model="meinst", mask_format="label", label_format="tiff")
    assert response.status_code == 200 and response.headers["content-type"] == "image/tiff"
    assert int(response.headers["x-instances"]) == len(body.instances)
    with tifffile.TiffFile(io.BytesIO(response.content)) as tif:
        assert tif.pages[0].dtype == np.uint16 and tif.pages[0].compression != 1  # compressed
        assert np.array_equal(tif.asarray(), labels)
    with Image.open(io.BytesIO(response.content)) as opened:
        assert opened.format == "TIFF" and np.array_equal(np.asarray(opened), labels)
    refused = segment(server.url, data, model="meinst", label_format="tiff")  # a TIFF of what? JSON was asked for
    assert refused.status_code == 422 and "mask_format=label" in refused.json()["error"]


def test_label_files_past_65535_instances_are_32_bit_tiffs_and_never_clipped_pngs() -> None:
    labels = np.array([[0, 1], [70_000, 65_536]], np.uint32)
    with tifffile.TiffFile(io.BytesIO(label_bytes(labels, "tiff"))) as tif:
        assert tif.pages[0].dtype == np.uint32 and np.array_equal(tif.asarray(), labels)
    with pytest.raises(LabelOverflow, match="label_format=tiff"):
        label_bytes(labels, "png")


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


def test_page_rle_decoder_equals_pycocotools(server: ServiceProcess, nucleus_png: Path, workdir: Path) -> None:
    major = node_major()
    if major is None or major < 20:
        pytest.skip(f"the decoder test needs Node >= 20 (found {major}); the Python tests cover the same masks")
    masks, labels = [], []
    images = {"photo": PHOTO.read_bytes(), "nuclei": nucleus_png.read_bytes()}
    for method in METHODS:
        for name, data in images.items():
            body = answer(server.url, data, model=method, max_detections=10)
            for index, (instance, mask) in enumerate(zip(body.instances, masks_of(body))):
                flat = mask.ravel(order="F")  # COCO runs are column-major, starting with zeros
                changes = np.flatnonzero(np.diff(flat)) + 1
                runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
                masks.append(
                    {
                        "name": f"{method}/{name}/{index}",
                        "rle": instance.segmentation.model_dump(mode="json"),
                        "mask": base64.b64encode(np.ascontiguousarray(mask).tobytes()).decode(),
                        "runs": ([0] if flat[0] else []) + runs,
                        "area": instance.area,
                    }
                )
            labels.append(
                {
                    "name": f"{method}/{name}",
                    "height": body.height,
                    "width": body.width,
                    "rles": [i.segmentation.model_dump(mode="json") for i in body.instances],
                    "labels": base64.b64encode(label_image(body).astype("<u2").tobytes()).decode(),
                }
            )
    cases = workdir / "rle_cases.json"
    cases.write_text(json.dumps({"masks": masks, "labels": labels, "colours": instance_colours(24).tolist()}))
    result = subprocess.run(  # app.js is an ES module without a package.json: Node 20 must be told to detect it
        ["node", "--experimental-detect-module", "--test", str(NODE_TEST)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "ONESTAGE_RLE_CASES": str(cases)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"# pass 5\b", result.stdout) and re.search(r"# fail 0\b", result.stdout), result.stdout


# ---------------------------------------------------------------- the page in Chromium
@pytest.fixture(scope="module")
def browser(workdir: Path) -> Iterator[Any]:
    """Headless Chromium driven by chromedriver (Debian's chromium and chromium-driver packages), as
    `python -m service.screenshot` drives it; downloads land in `workdir/downloads`."""
    from selenium.common.exceptions import WebDriverException

    from service.screenshot import chromium

    try:
        driver = chromium(workdir / "chromium-profile", log=workdir / "chromedriver.log")
    except FileNotFoundError as error:
        pytest.skip(f"Chromium cannot start: {error}")
    except WebDriverException as error:
        pytest.skip(f"Chromium cannot start here: {error.msg}")
    driver.set_script_timeout(30)
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads(workdir))}
    )
    try:
        yield driver
    finally:
        driver.quit()


def downloads(workdir: Path) -> Path:
    """Where the browser saves what the page downloads."""
    return workdir / "downloads"


def open_page(driver: Any, url: str, model: str, threshold: str | None = None) -> Any:
    """The page at `url` with `model` chosen (and the slider at `threshold`); returns a 30 s WebDriverWait."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.wait import WebDriverWait

    wait = WebDriverWait(driver, 30)
    driver.get(url)
    wait.until(lambda d: "Choose an image" in d.find_element(By.ID, "status").text)
    Select(driver.find_element(By.ID, "model")).select_by_value(model)
    if threshold is not None:
        set_input(driver, "threshold", threshold, "input")
    return wait


def choose(driver: Any, wait: Any, path: Path) -> None:
    """Choose `path` in the file field and wait until the page shows both the image and its answer."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "file").send_keys(str(path))
    wait.until(lambda d: d.find_element(By.ID, "count").get_attribute("data-count"))
    wait.until(lambda d: d.find_element(By.ID, "canvas").get_attribute("data-image"))


def set_input(driver: Any, element_id: str, value: str, event: str = "change") -> None:
    driver.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
        "e.dispatchEvent(new Event(arguments[2]));",
        element_id,
        value,
        event,
    )


def shown(driver: Any) -> tuple[np.ndarray, float, float, float]:
    """The page's view: its canvas as [H, W, 3] RGB and the transform it was drawn with (canvas pixels per
    image pixel, and the image origin in canvas pixels)."""
    url = driver.execute_script("return document.getElementById('canvas').toDataURL('image/png')")
    data = driver.execute_script("return {...document.getElementById('canvas').dataset};")
    canvas = png_array(base64.b64decode(url.split(",", 1)[1]))[..., :3]
    return canvas, float(data["scale"]), float(data["originX"]), float(data["originY"])


def image_under(
    canvas_shape: tuple[int, ...], scale: float, x0: float, y0: float, image_shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every canvas pixel, the image pixel the view draws there (the one whose area holds the canvas pixel's
    centre) and whether that is unambiguous: inside the image and not within 2% of a pixel edge, where a
    renderer's rounding may pick the neighbour."""
    v, u = np.mgrid[: canvas_shape[0], : canvas_shape[1]]
    fx, fy = (u + 0.5 - x0) / scale, (v + 0.5 - y0) / scale
    ix, iy = np.floor(fx).astype(int), np.floor(fy).astype(int)
    inside = (ix >= 0) & (iy >= 0) & (ix < image_shape[1]) & (iy < image_shape[0])
    clear = (np.abs(fx - np.round(fx)) > 0.02) & (np.abs(fy - np.round(fy)) > 0.02)
    return np.clip(ix, 0, image_shape[1] - 1), np.clip(iy, 0, image_shape[0] - 1), inside & clear


def composed(image: np.ndarray, body: SegmentResponse, fill: bool = True) -> np.ndarray:
    """What the page draws at the image's own size with Fill on and Outline and Boxes off: each instance's
    pixels mixed 60/40 with its colour (the higher score keeps overlaps), rounded half to even as a canvas."""
    out = image.astype(np.float64)
    labels = label_image(body)
    if fill:
        colours = instance_colours(len(body.instances)).astype(np.float64)
        inside = labels > 0
        out[inside] = out[inside] * (1 - 0.4) + colours[labels[inside].astype(int) - 1] * 0.4
    return np.round(out).astype(np.uint8)


def displayed(url: str, data: bytes, model: str) -> np.ndarray:
    """The image as the model reads it, from `POST /display`, as [H, W, 3] RGB."""
    response = httpx.post(f"{url}/display", params={"model": model}, content=data, timeout=60)
    assert response.status_code == 200, response.text
    picture = png_array(response.content)
    return np.repeat(picture[..., None], 3, axis=2) if picture.ndim == 2 else picture


def test_page_shows_the_instances_the_api_finds(server: ServiceProcess, browser: Any, workdir: Path) -> None:
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.select import Select

    from service.screenshot import client_point

    wait = open_page(browser, server.url, "embedmask", PAGE_THRESHOLD)
    models = [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "model")).options]
    assert models == [*METHODS, NUCLEI]
    choose(browser, wait, PHOTO)

    # The count a person reads is the API's for the same image, model and threshold.
    expected = answer(server.url, PHOTO.read_bytes(), model="embedmask", score_threshold=PAGE_THRESHOLD)
    count = int(browser.find_element(By.ID, "count").get_attribute("data-count"))
    assert count == len(expected.instances) > 0
    assert browser.find_element(By.ID, "count").text == f"{count} instances"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#instances tbody tr")) == count
    warnings = browser.find_element(By.ID, "warnings")  # the answer's, word for word (here: detections capped)
    assert [li.text for li in warnings.find_elements(By.TAG_NAME, "li")] == expected.warnings
    assert warnings.is_displayed() == bool(expected.warnings)
    browser.save_screenshot(str(workdir / "page.png"))

    # At 1:1 the view is the photo as the model read it, pixel for pixel, with the instances filled in:
    # inside the first instance's box its pixels are drawn over; away from every mask it is the photo.
    browser.find_element(By.ID, "zoom-one").click()
    canvas, scale, x0, y0 = shown(browser)
    assert scale == 1 and browser.find_element(By.ID, "zoom-value").text == "100%"
    photo = np.asarray(load_rgb(str(PHOTO))).astype(int)
    ix, iy, seen_here = image_under(canvas.shape, scale, x0, y0, photo.shape)
    assert seen_here.sum() == photo.shape[0] * photo.shape[1]  # the whole photo is in view
    image = np.zeros_like(photo)
    image[iy[seen_here], ix[seen_here]] = canvas[seen_here]
    first = masks_of(expected)[0].astype(bool)
    x, y, w, h = (round(v) for v in expected.instances[0].bbox)
    in_box = np.zeros(first.shape, bool)
    in_box[y : y + h, x : x + w] = True
    drawn = np.abs(image - photo).sum(axis=2) > 24
    assert drawn[first & in_box].mean() > 0.8
    clear = cv2.dilate(np.any(masks_of(expected), axis=0).astype(np.uint8), np.ones((7, 7), np.uint8)) == 0
    assert np.array_equal(image[clear], photo[clear])

    # Hovering over the first instance highlights its row; sorting by area puts the largest first.
    labels = label_image(expected)
    ys, xs = np.nonzero(cv2.erode((labels == 1).astype(np.uint8), np.ones((5, 5), np.uint8)))
    px, py = xs[len(xs) // 2], ys[len(ys) // 2]
    pointer = ActionBuilder(browser)
    pointer.pointer_action.move_to_location(*client_point(browser, ((px + 0.5) * scale + x0, (py + 0.5) * scale + y0)))
    pointer.perform()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#instances tbody tr.hovered"))
    assert browser.find_element(By.CSS_SELECTOR, "#instances tbody tr.hovered").get_attribute("data-index") == "0"
    browser.find_element(By.CSS_SELECTOR, "th[data-key='area']").click()
    areas = [int(td.text) for td in browser.find_elements(By.CSS_SELECTOR, "#instances tbody td:nth-child(4)")]
    assert areas == sorted((i.area for i in expected.instances), reverse=True)

    # A text file: the API's 415 becomes a readable message, and no stale result stays on screen.
    text_file = workdir / "notes.txt"
    text_file.write_text("not an image\n")
    browser.find_element(By.ID, "file").send_keys(str(text_file))
    message = wait.until(seen.visibility_of_element_located((By.ID, "message")))
    assert "HTTP 415" in message.text and "not an image" in message.text
    assert browser.find_element(By.ID, "count").get_attribute("data-count") == ""
    assert not browser.find_elements(By.CSS_SELECTOR, "#instances tbody tr")
    assert browser.find_element(By.ID, "canvas").get_attribute("data-image") is None
    assert (shown(browser)[0] == shown(browser)[0][0, 0]).all()  # the view is empty
    browser.save_screenshot(str(workdir / "page-error.png"))


def test_a_raw_16_bit_field_is_visible_and_its_masks_stay_on_it_at_every_zoom(
    server: ServiceProcess, browser: Any, field_tiff: Path, workdir: Path
) -> None:
    """A raw 16-bit TIFF, which no browser shows, is drawn as the model reads it (stretched, not black or
    flat); zooming with the wheel keeps the image point under the cursor, and at every zoom and after a drag
    every canvas pixel is exactly the image pixel under it, tinted where (and only where) a mask covers it;
    the contrast sliders change the picture, and the downloaded overlay is the picture the page shows."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.by import By

    from service.screenshot import client_point, wheel_zoom

    wait = open_page(browser, server.url, NUCLEI)
    choose(browser, wait, field_tiff)
    data = field_tiff.read_bytes()
    image = displayed(server.url, data, NUCLEI)
    threshold = browser.find_element(By.ID, "threshold").get_attribute("value")
    body = answer(server.url, data, model=NUCLEI, score_threshold=threshold)
    assert int(browser.find_element(By.ID, "count").get_attribute("data-count")) == len(body.instances) > 5
    assert image.shape[:2] == (160, 1100)

    # Masks hidden: the whole field fits the view, and it is the image, not black or flat grey.
    for toggle in ("show-fill", "show-outline"):
        browser.find_element(By.ID, toggle).click()
    canvas, scale, x0, y0 = shown(browser)
    ix, iy, here = image_under(canvas.shape, scale, x0, y0, image.shape)
    assert scale < 1 and here.sum() > 0.5 * image.shape[0] * image.shape[1] * scale**2  # all of it, made smaller
    grey = canvas[here][:, 0].astype(int)
    assert np.percentile(grey, 99.5) - np.percentile(grey, 1) > 150 and grey.mean() < 128  # bright nuclei on dark
    assert abs(grey.mean() - image[..., 0].mean()) < 8

    def check_view(fill: bool, what: str) -> tuple[float, float, float]:
        browser_canvas, s, ox, oy = shown(browser)
        ux, uy, clear = image_under(browser_canvas.shape, s, ox, oy, image.shape)
        expected = composed(image, body, fill)
        assert clear.sum() > 10_000, what
        wrong = np.any(browser_canvas[clear] != expected[uy[clear], ux[clear]], axis=1)
        assert not wrong.any(), f"{what}: {wrong.sum()} of {clear.sum()} canvas pixels differ from the image under them"
        return s, ox, oy

    def image_point(client: tuple[int, int]) -> tuple[float, float]:
        """The image point under viewport point `client`, by the view's transform."""
        _, s, ox, oy = shown(browser)
        left, top, k = browser.execute_script(
            "const c = document.getElementById('canvas'); const r = c.getBoundingClientRect();"
            "return [r.left, r.top, c.width / r.width];"
        )
        return ((client[0] - left) * k - ox) / s, ((client[1] - top) * k - oy) / s

    # Zoomed in at a nucleus with the wheel: that nucleus stays under the cursor, the view is exact.
    x, y, w, h = body.instances[0].bbox
    nucleus = ((x + w / 2) * scale + x0, (y + h / 2) * scale + y0)  # canvas pixels
    cursor = client_point(browser, nucleus)
    before = image_point(cursor)
    wheel_zoom(browser, 2.0, nucleus)
    wait.until(lambda d: shown(d)[1] > 1.5 * scale)
    after = image_point(cursor)
    assert abs(after[0] - before[0]) < 1 and abs(after[1] - before[1]) < 1 and abs(before[0] - x - w / 2) < 2
    ActionChains(browser).move_to_element(browser.find_element(By.TAG_NAME, "h1")).perform()  # no hover highlight
    check_view(False, "zoomed, masks hidden")
    browser.find_element(By.ID, "show-fill").click()
    first = check_view(True, "zoomed, masks shown")
    _, s1, ox1, oy1 = shown(browser)
    wheel_zoom(browser, 3.0, ((x + w / 2) * s1 + ox1, (y + h / 2) * s1 + oy1))
    wait.until(lambda d: shown(d)[1] > 2.5 * first[0])
    # Hovered, the nucleus lights up (its row too); left, not a pixel of the highlight stays behind.
    _, s2, ox2, oy2 = shown(browser)
    pointer = ActionBuilder(browser)
    pointer.pointer_action.move_to_location(*client_point(browser, ((x + w / 2) * s2 + ox2, (y + h / 2) * s2 + oy2)))
    pointer.perform()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#instances tbody tr.hovered"))
    assert browser.find_element(By.CSS_SELECTOR, "#instances tbody tr.hovered").get_attribute("data-index") == "0"
    canvas, s2, ox2, oy2 = shown(browser)
    ux, uy, clear = image_under(canvas.shape, s2, ox2, oy2, image.shape)
    lit = clear & (label_image(body) == 1)[uy, ux]
    assert lit.sum() > 100 and np.any(canvas[lit] != composed(image, body)[uy[lit], ux[lit]], axis=1).mean() > 0.9
    ActionChains(browser).move_to_element(browser.find_element(By.TAG_NAME, "h1")).perform()
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#instances tbody tr.hovered"))
    second = check_view(True, "zoomed further, after a hover")
    assert second[0] > 4 * scale

    # Dragged 120 px to the left: the image and its masks move together.
    canvas_element = browser.find_element(By.ID, "canvas")
    ActionChains(browser).click_and_hold(canvas_element).move_by_offset(-120, 0).release().perform()
    ActionChains(browser).move_to_element(browser.find_element(By.TAG_NAME, "h1")).perform()
    panned = check_view(True, "dragged")
    assert panned[1] == second[1] - 120 and panned[2] == second[2]

    # Contrast: a raised black point darkens the view; the downloaded overlay is the page's picture, whole.
    set_input(browser, "black", "60", "input")
    lifted = np.clip(np.round((image.astype(float) - 60) / (255 - 60) * 255), 0, 255).astype(np.uint8)
    canvas, s, ox, oy = shown(browser)
    ux, uy, clear = image_under(canvas.shape, s, ox, oy, image.shape)
    assert np.array_equal(canvas[clear], composed(lifted, body)[uy[clear], ux[clear]])
    saved = downloads(workdir) / "field.overlay.png"
    saved.unlink(missing_ok=True)
    browser.find_element(By.ID, "download-png").click()
    wait.until(lambda d: saved.is_file() and saved.stat().st_size > 0)
    assert np.array_equal(png_array(saved.read_bytes())[..., :3], composed(lifted, body))


def test_object_size_options_reach_the_api_and_the_page_says_what_ran(
    server: ServiceProcess, browser: Any, field_tiff: Path
) -> None:
    """auto (the API's default for a model that records its object size, and the page's), the model's own scale
    and a diameter are sent as scale=auto, scale=1 and diameter=; the page says the scale the answer ran at and
    the diameter it assumed, and the diameter the model expects; a model without a recorded object size
    offers neither auto nor a diameter."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    wait = open_page(browser, server.url, NUCLEI)
    browser.execute_script(
        "window.sent = []; const original = window.fetch;"
        "window.fetch = (url, options) => { window.sent.push(String(url)); return original(url, options); };"
    )
    expected = browser.find_element(By.ID, "expected").text
    assert f"about {NUCLEUS_SIZE:g} px across" in expected  # /models' expected_diameter
    choose(browser, wait, field_tiff)
    data = field_tiff.read_bytes()
    sizing = browser.find_element(By.ID, "sizing")

    def segment_requests() -> list[str]:
        return [url for url in browser.execute_script("return window.sent") if url.startswith("/segment?")]

    assert sizing.get_attribute("data-mode") == "auto" and "scale=auto" in segment_requests()[-1]
    auto = answer(server.url, data, model=NUCLEI, scale="auto", score_threshold=0)
    assert float(sizing.get_attribute("data-scale")) == pytest.approx(auto.scale) and auto.scale != 1
    assert f"scale {auto.scale:.3g} measured by scale=auto" in sizing.text

    mode = Select(browser.find_element(By.ID, "size-mode"))
    mode.select_by_value("model")
    wait.until(lambda d: d.find_element(By.ID, "sizing").get_attribute("data-mode") == "model")
    assert "scale=1" in segment_requests()[-1] and "the model's own scale" in sizing.text
    assert f"assuming objects {NUCLEUS_SIZE:g} px across" in sizing.text

    mode.select_by_value("diameter")
    assert browser.find_element(By.ID, "size-value").get_attribute("value") == f"{NUCLEUS_SIZE:g}"  # prefilled
    set_input(browser, "size-value", "24")
    wait.until(lambda d: d.find_element(By.ID, "sizing").get_attribute("data-mode") == "diameter")
    assert "diameter=24" in segment_requests()[-1] and "scale=" not in segment_requests()[-1]
    by_diameter = answer(server.url, data, model=NUCLEI, diameter=24, score_threshold=0)
    assert float(sizing.get_attribute("data-scale")) == pytest.approx(by_diameter.scale) == pytest.approx(0.5)
    assert "assuming objects 24 px across" in sizing.text and "from your diameter" in sizing.text
    assert int(browser.find_element(By.ID, "count").get_attribute("data-count")) == len(by_diameter.instances)

    set_input(browser, "size-value", "-3")  # refused in the page, with a message, before any request
    message = wait.until(lambda d: d.find_element(By.ID, "message").text)
    assert "diameter" in message and len(segment_requests()) == 3

    Select(browser.find_element(By.ID, "model")).select_by_value("meinst")  # photo rule, no object size
    offered = {o.get_attribute("value"): o.is_enabled() for o in mode.options}
    assert offered == {"model": True, "auto": False, "diameter": False, "scale": True}
    assert mode.first_selected_option.get_attribute("value") == "model"


def test_warnings_of_the_answer_are_shown(server: ServiceProcess, browser: Any) -> None:
    """A colour photo sent to the microscopy model: the answer's warnings appear above the picture, word for word."""
    from selenium.webdriver.common.by import By

    wait = open_page(browser, server.url, NUCLEI)
    choose(browser, wait, PHOTO)
    body = answer(server.url, PHOTO.read_bytes(), model=NUCLEI, score_threshold=0)
    assert any("colour" in warning for warning in body.warnings)
    box = browser.find_element(By.ID, "warnings")
    assert box.is_displayed() and box.get_attribute("role") == "status"
    assert [li.text for li in box.find_elements(By.TAG_NAME, "li")] == body.warnings


# ---------------------------------------------------------------- python -m service.predict
def predict(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.predict", *args],
        env={**os.environ, **(env or {})},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_predict_cli_writes_overlays_labels_and_coco_results(
    server: ServiceProcess, checkpoints: dict[str, Path], nucleus_png: Path, workdir: Path
) -> None:
    images = workdir / "predict_in"
    images.mkdir()
    shutil.copy(PHOTO, images / "photo.jpg")
    shutil.copy(nucleus_png, images / "tile.png")
    (images / "broken.png").write_bytes(b"this is text, not a PNG")
    (images / "readme.txt").write_text("ignored: not an image suffix")
    out = workdir / "predict_url"
    run = predict(
        str(images),
        str(workdir / "missing.jpg"),
        "--url",
        server.url,
        "--model",
        "embedmask",
        "--out",
        str(out),
        "--concurrency",
        "3",
        "--score-threshold",
        PAGE_THRESHOLD,
    )
    assert run.returncode == 1, run.stderr  # two inputs failed, the others were written
    assert "broken.png" in run.stderr and "missing.jpg" in run.stderr and "readme.txt" not in run.stderr
    assert "2 of 3 images segmented" in run.stdout

    answers = {}
    for name, path in (("photo", images / "photo.jpg"), ("tile", images / "tile.png")):
        answers[name] = answer(server.url, path.read_bytes(), model="embedmask", score_threshold=PAGE_THRESHOLD)
        labels = segment(
            server.url, path.read_bytes(), model="embedmask", score_threshold=PAGE_THRESHOLD, mask_format="label"
        )
        overlay = segment(
            server.url, path.read_bytes(), model="embedmask", score_threshold=PAGE_THRESHOLD, render="overlay"
        )
        assert np.array_equal(png_array((out / f"{name}.labels.png").read_bytes()), png_array(labels.content)), name
        assert np.array_equal(png_array((out / f"{name}.overlay.png").read_bytes()), png_array(overlay.content)), name
    assert not (out / "broken.overlay.png").exists()

    # One COCO results file for the run, loadable with pycocotools against the run's image list.
    dataset = COCO(str(out / "images.json"))
    results = dataset.loadRes(str(out / "results.json"))
    ids = {Path(img["file_name"]).stem: img["id"] for img in dataset.dataset["images"]}
    assert ids == {"photo": 2, "tile": 3}  # ids in input order (the folder's files sorted), failed ones left out
    assert [c["name"] for c in dataset.dataset["categories"]] == CLASS_NAMES and dataset.getCatIds() == CATEGORY_IDS
    for name, image_id in ids.items():
        anns = results.loadAnns(results.getAnnIds(imgIds=[image_id]))
        expected = answers[name].instances
        assert [a["segmentation"]["counts"] for a in anns] == [i.segmentation.counts for i in expected]
        assert [a["score"] for a in anns] == [i.score for i in expected] and len(anns) > 0

    # In process from the checkpoint (its graph cached by the server), on a glob: the service's answers. The
    # in-process model reads the service's ONESTAGE_* settings: the same runtime and providers as the server.
    local = workdir / "predict_local"
    run = predict(
        str(images / "t*.png"),
        "--checkpoint",
        str(checkpoints["embedmask"]),
        "--cache-dir",
        str(workdir / "cache"),
        "--out",
        str(local),
        "--score-threshold",
        PAGE_THRESHOLD,
        "--runtime",
        "onnxruntime",  # as the test server runs it
    )
    assert run.returncode == 0 and "1 of 1 images segmented" in run.stdout, run.stderr
    local_results = json.loads((local / "results.json").read_text())
    url_results = [
        {**r, "image_id": 1} for r in json.loads((out / "results.json").read_text()) if r["image_id"] == ids["tile"]
    ]
    assert local_results == url_results

    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there: nothing is segmented, exit status 2
    run = predict(str(images / "tile.png"), "--url", nobody, "--out", str(workdir / "predict_none"))
    assert run.returncode == 2 and "cannot reach the service" in run.stderr
    assert np.array_equal(
        png_array((local / "tile.labels.png").read_bytes()), png_array((out / "tile.labels.png").read_bytes())
    )


def test_predict_cli_sizes_by_diameter_measures_writes_tiff_labels_and_prints_warnings(
    server: ServiceProcess, field_tiff: Path, workdir: Path
) -> None:
    """`--diameter`, `--measure` and `--label-format both` on a raw field and a photo through the microscopy
    model: one measurements.csv whose rows are the API's instances and measurements for the same diameter, a
    TIFF label image equal to the PNG one, and the photo's colour warning on stderr, naming the file."""
    images = workdir / "predict_nuclei"
    images.mkdir()
    shutil.copy(field_tiff, images / "field.tif")
    shutil.copy(PHOTO, images / "photo.jpg")
    out = workdir / "predict_measured"
    run = predict(
        str(images), "--url", server.url, "--model", NUCLEI, "--diameter", "24", "--measure",
        "--label-format", "both", "--score-threshold", "0", "--out", str(out),
    )  # fmt: skip
    assert run.returncode == 0 and "2 of 2 images segmented" in run.stdout, run.stderr
    assert re.search(r"warning: \S*photo\.jpg: this image has colour", run.stderr), run.stderr

    with (out / "measurements.csv").open(newline="") as table:
        reader = csv.DictReader(table)
        columns, rows = reader.fieldnames, list(reader)
    assert columns == [
        "image_id", "image", "label", "category", "score", "bbox_x", "bbox_y", "bbox_width", "bbox_height",
        *Measurements.model_fields,
    ]  # fmt: skip
    assert {row["image"] for row in rows} == {"field", "photo"}
    for image_id, name in enumerate(("field.tif", "photo.jpg"), start=1):
        data = (images / name).read_bytes()
        expected = answer(server.url, data, model=NUCLEI, diameter=24, score_threshold=0, measure="true")
        mine = [row for row in rows if row["image_id"] == str(image_id)]
        assert len(mine) == len(expected.instances) > 0, name
        for label, (row, instance) in enumerate(zip(mine, expected.instances), start=1):
            assert (int(row["label"]), row["category"], float(row["score"])) == (
                label,
                instance.category_name,
                instance.score,
            )
            assert [float(row[k]) for k in ("bbox_x", "bbox_y", "bbox_width", "bbox_height")] == list(instance.bbox)
            assert instance.measurements is not None
            assert {k: float(row[k]) for k in Measurements.model_fields} == instance.measurements.model_dump()
        stem = Path(name).stem
        with tifffile.TiffFile(out / f"{stem}.labels.tif") as tif:
            labels = tif.asarray()
        assert labels.dtype == np.uint16 and np.array_equal(
            labels, png_array((out / f"{stem}.labels.png").read_bytes())
        )
        assert np.array_equal(labels, label_image(expected))


# ---------------------------------------------------------------- the page with API keys on
PAGE_KEY = "page-test-key-0123456789"


@pytest.fixture(scope="module")
def keyed_server(workdir: Path, checkpoints: dict[str, Path], server: ServiceProcess) -> Iterator[ServiceProcess]:
    """The same models (graphs cached by the first server) behind an API key."""
    models = [{"name": method, "path": str(path)} for method, path in checkpoints.items()]
    process = ServiceProcess(
        ["--models", json.dumps(models), "--cache-dir", str(workdir / "cache"), *CPU, "--api-keys", f"page:{PAGE_KEY}"],
        workdir / "keyed.log",
    )
    try:
        process.wait_ready()
        yield process
    finally:
        process.terminate()


def test_page_asks_for_the_key_and_keeps_it_in_the_session(keyed_server: ServiceProcess, browser: Any) -> None:
    """With keys on, the page (itself open) says a key is needed; once one is typed it lists the models and
    shows the API's instances, and the key is kept in sessionStorage only (not localStorage, not a cookie)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.wait import WebDriverWait

    wait = WebDriverWait(browser, 30)
    browser.get(keyed_server.url)
    browser.execute_script("sessionStorage.clear(); localStorage.clear();")
    browser.get(keyed_server.url)
    message = wait.until(seen.visibility_of_element_located((By.ID, "message")))
    assert "needs an API key" in message.text and "401" in message.text

    key_field = browser.find_element(By.ID, "api-key")
    key_field.send_keys(PAGE_KEY)
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'));", key_field)
    wait.until(lambda d: "Choose an image" in d.find_element(By.ID, "status").text)
    browser.execute_script(
        "const t = document.getElementById('threshold'); t.value = arguments[0]; t.dispatchEvent(new Event('input'));",
        PAGE_THRESHOLD,
    )
    browser.find_element(By.ID, "file").send_keys(str(PHOTO))
    wait.until(lambda d: d.find_element(By.ID, "count").get_attribute("data-count"))
    expected = httpx.post(
        f"{keyed_server.url}/segment",
        content=PHOTO.read_bytes(),
        headers={"Content-Type": "image/jpeg", "Authorization": f"Bearer {PAGE_KEY}"},
        params={
            "model": browser.find_element(By.ID, "model").get_attribute("value"),
            "score_threshold": PAGE_THRESHOLD,
        },
        timeout=60,
    )
    assert expected.status_code == 200
    shown = int(browser.find_element(By.ID, "count").get_attribute("data-count"))
    assert shown == len(expected.json()["instances"]) > 0
    stored = browser.execute_script(
        "return [Object.values(sessionStorage), Object.values(localStorage), document.cookie];"
    )
    assert PAGE_KEY in stored[0] and PAGE_KEY not in stored[1] and PAGE_KEY not in stored[2]
