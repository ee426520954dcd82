"""Take the README's picture of the web page: the page in headless Chromium on a raw 16-bit HeLa field with a
bundled model, zoomed on part of the field (``docs/page.png``).

    python -m training.nucleus --out data/nucleus   # once: the raw 16-bit fields, data/nucleus/test_fields/*.tif
    python -m service.screenshot                    # serves the bundled models, writes docs/page.png
    python -m service.screenshot --url http://localhost:8000 --model meinst --image my_field.tif --out page.png

Without ``--url`` it starts ``python -m service`` on the bundled models (on a free loopback port; exporting them
first if the cache holds no graph) and stops it afterwards. The page is driven as a person drives it: the model
chosen, the file chosen, the wheel turned over image point ``--at`` until one image pixel spans ``--zoom`` screen
pixels.
It prints what the page says (instances, the scale it ran at, warnings). Needs Debian's ``chromium`` and
``chromium-driver`` and selenium (the test extra), as the browser tests do.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.webdriver.chrome.service import Service as DriverService
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
from selenium.webdriver.common.by import By
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.wait import WebDriverWait

from service.launcher import ServiceProcess
from service.settings import REPO

# Headless Chromium as the browser tests run it (tests/test_web.py imports these).
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
)
WINDOW = (1400, 1000)
# The page's wheel rule (service/static/app.js, WHEEL_ZOOM_RATE): zoom factor exp(-rate * wheel pixels).
WHEEL_ZOOM_RATE = 0.002
PAGE_TIMEOUT_S = 120
DEFAULT_IMAGE = REPO / "data" / "nucleus" / "test_fields" / "hela_t00_y0540.tif"
DEFAULT_OUT = REPO / "docs" / "page.png"


def chromium(profile: Path, window: tuple[int, int] = WINDOW, log: Path | None = None) -> webdriver.Chrome:
    """Headless Chromium through chromedriver (Debian's ``chromium`` and ``chromium-driver``); raises
    ``FileNotFoundError`` when either is missing, selenium's ``WebDriverException`` when it cannot start."""
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        raise FileNotFoundError("chromium or chromedriver is missing (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*CHROMIUM_FLAGS, f"--window-size={window[0]},{window[1]}", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=DriverService(driver, log_output=str(log) if log else None), options=options)


def view(driver: webdriver.Chrome) -> tuple[float, float, float]:
    """The page's view transform: (canvas pixels per image pixel, origin x, origin y in canvas pixels)."""
    scale, x, y = driver.execute_script(
        "const d = document.getElementById('canvas').dataset; return [d.scale, d.originX, d.originY];"
    )
    return float(scale), float(x), float(y)


def attribute(driver: webdriver.Chrome, element_id: str, name: str) -> str:
    """An attribute of the page's element ``element_id`` ("" when it has none)."""
    return driver.find_element(By.ID, element_id).get_attribute(name) or ""


def client_point(driver: webdriver.Chrome, at: tuple[float, float]) -> tuple[int, int]:
    """The viewport point (whole CSS pixels) over canvas point ``at`` (canvas pixels from its top-left), with the
    canvas scrolled into view first (pointer actions are addressed in the viewport)."""
    x, y = driver.execute_script(
        "const c = document.getElementById('canvas'); c.scrollIntoView({block: 'nearest'});"
        "const r = c.getBoundingClientRect(); const k = r.width / c.width;"
        "return [Math.round(r.left + arguments[0] * k), Math.round(r.top + arguments[1] * k)];",
        *at,
    )
    return int(x), int(y)


def wheel_zoom(driver: webdriver.Chrome, factor: float, at: tuple[float, float]) -> tuple[int, int]:
    """Turn the wheel over canvas point ``at`` (canvas pixels) until the view zooms by ``factor``; returns the
    viewport point the wheel turned at."""
    x, y = client_point(driver, at)
    delta = round(-math.log(factor) / WHEEL_ZOOM_RATE)
    ActionChains(driver).scroll_from_origin(ScrollOrigin.from_viewport(x, y), 0, delta).perform()
    return x, y


def capture(
    driver: webdriver.Chrome, url: str, image: Path, model: str, out: Path, zoom: float, at: tuple[float, float]
) -> dict[str, Any]:
    """Open the page at ``url``, segment ``image`` with ``model``, zoom to ``zoom`` (canvas pixels per image
    pixel) around image point ``at`` (fractions of its width and height), save the window to ``out`` and
    return what the page shows."""
    wait = WebDriverWait(driver, PAGE_TIMEOUT_S)
    driver.get(url)
    wait.until(lambda d: "Choose an image" in d.find_element(By.ID, "status").text)
    Select(driver.find_element(By.ID, "model")).select_by_value(model)
    driver.find_element(By.ID, "file").send_keys(str(image.resolve()))
    wait.until(lambda d: d.find_element(By.ID, "count").get_attribute("data-count"))
    wait.until(lambda d: d.find_element(By.ID, "canvas").get_attribute("data-image"))
    width, height = (int(v) for v in attribute(driver, "canvas", "data-image").split("x"))
    scale, x, y = view(driver)
    ratio = driver.execute_script("return window.devicePixelRatio")
    wheel_zoom(driver, zoom * ratio / scale, (at[0] * width * scale + x, at[1] * height * scale + y))
    wait.until(lambda d: abs(view(d)[0] / ratio - zoom) < 0.05 * zoom)
    driver.find_element(By.ID, "canvas").click()  # keyboard focus on the view, as after a drag
    out.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(out))
    return {
        "instances": int(attribute(driver, "count", "data-count")),
        "sizing": driver.find_element(By.ID, "sizing").text,
        "warnings": [li.text for li in driver.find_elements(By.CSS_SELECTOR, "#warnings li")],
        "zoom": driver.find_element(By.ID, "zoom-value").text,
        "status": driver.find_element(By.ID, "status").text,
    }


def point(text: str) -> tuple[float, float]:
    x, _, y = text.partition(",")
    return float(x), float(y)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m service.screenshot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a running service (default: start one on the bundled models)")
    parser.add_argument("--model", default="embedmask", help="the model the page uses (default embedmask)")
    parser.add_argument(
        "--image", type=Path, default=DEFAULT_IMAGE, help=f"the image (default {DEFAULT_IMAGE.relative_to(REPO)})"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"the PNG (default {DEFAULT_OUT.relative_to(REPO)})"
    )
    parser.add_argument("--zoom", type=float, default=2.0, help="screen pixels per image pixel (default 2)")
    parser.add_argument(
        "--at", type=point, default=(0.3, 0.5), help="the image point zoomed at, x,y as fractions (default 0.3,0.5)"
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if not args.image.is_file():
        print(
            f"error: {args.image} not found (python -m training.nucleus --out data/nucleus writes it)", file=sys.stderr
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="onestage-screenshot-") as scratch:
        work = Path(scratch)
        server = None if args.url else ServiceProcess([], work / "service.log")
        try:
            if server is not None:
                server.wait_ready()
            driver = chromium(work / "profile", log=work / "chromedriver.log")
            try:
                url = args.url if server is None else server.url
                shown = capture(driver, url, args.image, args.model, args.out, args.zoom, args.at)
            finally:
                driver.quit()
        finally:
            if server is not None:
                server.terminate()
    print(json.dumps({"out": str(args.out), **shown}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
