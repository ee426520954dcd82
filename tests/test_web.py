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

from model.intensity import load_rgb, stretch_to_uint8
from service.launcher import ServiceProcess, free_port
from service.render import instance_colours, label_image, overlay_image
from service.schemas import SegmentResponse
from service.settings import REPO
from tests.service_models import CATEGORY_IDS, CLASS_NAMES, tiny_checkpoint

VOC = Path("/usr/share/doc/labelme-examples/examples/instance_segmentation/data_dataset_coco/JPEGImages")
PHOTO = VOC / "2011_000003.jpg"
METHODS = ("meinst", "embedmask")
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
    models = [{"name": method, "path": str(path)} for method, path in checkpoints.items()]
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


def test_label_answer_is_a_16_bit_label_image(server: ServiceProcess, nucleus_png: Path) -> None:
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
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)


@pytest.fixture(scope="module")
def browser(workdir: Path) -> Iterator[Any]:
    """Headless Chromium driven by chromedriver (Debian's chromium and chromium-driver packages)."""
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip(
            "Chromium cannot start: chromium or chromedriver is missing (apt-get install chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={workdir / 'chromium-profile'}"):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(
            service=Service(driver_path, log_output=str(workdir / "chromedriver.log")), options=options
        )
    except WebDriverException as error:
        pytest.skip(f"Chromium cannot start here: {error.msg}")
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def canvas_pixels(driver: Any) -> np.ndarray:
    """The page's canvas as [H, W, 3] RGB, at its own resolution (the image's)."""
    url = driver.execute_script("return document.getElementById('canvas').toDataURL('image/png')")
    return png_array(base64.b64decode(url.split(",", 1)[1]))[..., :3]


def test_page_shows_the_instances_the_api_finds(server: ServiceProcess, browser: Any, workdir: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.wait import WebDriverWait

    wait = WebDriverWait(browser, 30)
    browser.get(server.url)
    wait.until(lambda d: "Choose an image" in d.find_element(By.ID, "status").text)
    assert [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "model")).options] == list(METHODS)
    Select(browser.find_element(By.ID, "model")).select_by_value("embedmask")
    browser.execute_script(
        "const t = document.getElementById('threshold'); t.value = arguments[0]; t.dispatchEvent(new Event('input'));",
        PAGE_THRESHOLD,
    )
    browser.find_element(By.ID, "file").send_keys(str(PHOTO))
    wait.until(lambda d: d.find_element(By.ID, "count").get_attribute("data-count"))

    # The count a person reads is the API's for the same image, model and threshold.
    expected = answer(server.url, PHOTO.read_bytes(), model="embedmask", score_threshold=PAGE_THRESHOLD)
    shown = int(browser.find_element(By.ID, "count").get_attribute("data-count"))
    assert shown == len(expected.instances) > 0
    assert browser.find_element(By.ID, "count").text == f"{shown} instances"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#instances tbody tr")) == shown
    browser.save_screenshot(str(workdir / "page.png"))

    # The canvas: inside the first instance's box its pixels are drawn over; away from every mask and box
    # it is the photo (Chromium's JPEG decoder may differ from PIL's by a level or two).
    canvas, photo = canvas_pixels(browser).astype(int), np.asarray(load_rgb(str(PHOTO))).astype(int)
    assert canvas.shape == photo.shape
    first = masks_of(expected)[0].astype(bool)
    x, y, w, h = (round(v) for v in expected.instances[0].bbox)
    in_box = np.zeros(first.shape, bool)
    in_box[y : y + h, x : x + w] = True
    drawn = np.abs(canvas - photo).sum(axis=2) > 24
    assert drawn[first & in_box].mean() > 0.8
    clear = cv2.dilate(np.any(masks_of(expected), axis=0).astype(np.uint8), np.ones((7, 7), np.uint8)) == 0
    assert np.abs(canvas - photo)[clear].mean() < 3

    # Hovering over the first instance highlights its row; sorting by score puts the best first.
    labels = label_image(expected)
    ys, xs = np.nonzero(cv2.erode((labels == 1).astype(np.uint8), np.ones((5, 5), np.uint8)))
    element = browser.find_element(By.ID, "canvas")
    rect = browser.execute_script(
        "const r = arguments[0].getBoundingClientRect(); return [r.width, r.height];", element
    )
    px, py = xs[len(xs) // 2], ys[len(ys) // 2]
    offset = ((px + 0.5) * rect[0] / photo.shape[1] - rect[0] / 2, (py + 0.5) * rect[1] / photo.shape[0] - rect[1] / 2)
    ActionChains(browser).move_to_element_with_offset(element, round(offset[0]), round(offset[1])).perform()
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
    browser.save_screenshot(str(workdir / "page-error.png"))


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
