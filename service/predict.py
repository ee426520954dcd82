"""Segment files, folders or globs and write what a person looks at and what an analysis reads: per image an
overlay PNG and a label image (PNG and/or TIFF), and for the whole run one COCO results file and, with
--measure, one table of per-instance measurements.

    python -m service.predict data/nucleus/test_fields --url http://localhost:8000 --model embedmask --measure
    python -m service.predict "fields/**/*.tif" --checkpoint models/meinst_nucleus/model.pt --diameter 30

`--url` sends every image to a running service (`--concurrency` requests at a time); `--checkpoint` runs
a training checkpoint (exported to ONNX into `--cache-dir` first, as the service does), an exported
`.onnx` graph or a TensorRT engine in this process through `inference.Predictor`, the service's own
pipeline, so both modes give the service's answers. Both default to the model's recommended score threshold
and its own scale; `--diameter` (the objects' typical diameter in pixels of your images), `--scale` or
`--scale auto` size the objects to what the model was trained on.

Written under `--out` (default `predictions`): `<name>.overlay.png` (the image as the model reads it, with
each instance in its own colour) and `<name>.labels.png` and/or `<name>.labels.tif` (`--label-format`: 0
background, instance i = i in score order; uint16, in TIFF uint32 above 65535 instances) per image;
`results.json`, the COCO results list of the run (image ids 1, 2, ... in input order); `images.json`, a COCO
file with those images and the model's categories, so that `COCO("images.json").loadRes("results.json")`
works; and with `--measure`, `measurements.csv`: one row per instance (image id and name, label, category,
score, box, area, centroid, perimeter, eccentricity, mean and max intensity of the original image's values).
Each image's warnings (a colour image sent to a grey microscopy model, a clamped scale, far more objects than
the model saw in training) are printed. Files that cannot be read or segmented are reported and skipped; the
exit status is 1 if any failed, 2 if nothing could be segmented at all (no service at `--url`, no such model
or checkpoint, no input files).
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from inference.cli import CACHE_DIR_HELP, add_runtime_arguments, runtime_options
from inference.decode import decode_image
from inference.errors import InputError
from inference.pipeline import DEFAULT_SCALE_HELP, SegmentOptions
from inference.predictor import Predictor
from inference.runtime import RuntimeOptions, default_cache_dir
from model.input_contract import InputContract, scale_argument
from service.render import LABEL_SUFFIXES, label_bytes, label_image, overlay_image, png_bytes
from service.schemas import RLE, LabelFormat, Measurements, SegmentResponse

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
# A service from before models advertised their input contract served photo models: 8-bit RGB, as PIL decodes.
PHOTO_CONTRACT = InputContract(size_divisibility=32, min_size=800, max_size=1333, pad_value=[124, 116, 104])
API_KEY_ENV = "ONESTAGE_API_KEY"
LABEL_FORMAT_CHOICES: dict[str, tuple[LabelFormat, ...]] = {"png": ("png",), "tiff": ("tiff",), "both": ("png", "tiff")}
MEASUREMENTS_FILE = "measurements.csv"
# The table's columns: the instance (its image, its value in the label image, class, score, box) and the API's
# measurements.
INSTANCE_COLUMNS = ("image_id", "image", "label", "category", "score", "bbox_x", "bbox_y", "bbox_width", "bbox_height")
MEASUREMENT_COLUMNS = tuple(Measurements.model_fields)


class PredictFailed(Exception):
    """One image could not be segmented; the message says why."""


class SetupFailed(Exception):
    """Nothing can be segmented (no service, no such model or checkpoint); the message says why."""


@dataclass(frozen=True)
class Job:
    image_id: int  # 1-based, input order
    path: Path
    name: str  # output file stem, unique in the run


@dataclass(frozen=True)
class Done:
    job: Job
    answer: SegmentResponse | None
    error: str | None


# ------------------------------------------------------------------ inputs
def collect_inputs(arguments: Iterable[str]) -> tuple[list[Path], list[str]]:
    """Image paths from files, folders (their image files, sorted) and globs (`**` recurses), each once and
    in the order given; and the arguments that matched nothing."""
    paths: list[Path] = []
    unmatched: list[str] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(argument, recursive=True) if Path(p).is_file())
        if not found:
            unmatched.append(argument)
        paths.extend(found)
    unique = list(dict.fromkeys(p.resolve() for p in paths))
    return unique, unmatched


def plan_jobs(paths: list[Path]) -> list[Job]:
    """One job per image; output names are the file stems, numbered where two files share one."""
    jobs, used = [], set()
    for image_id, path in enumerate(paths, start=1):
        name, n = path.stem, 1
        while name in used:
            n += 1
            name = f"{path.stem}-{n}"
        used.add(name)
        jobs.append(Job(image_id, path, name))
    return jobs


# ------------------------------------------------------------------ predictors
class RemotePredictor:
    """`POST /segment` on a running service (httpx's client is thread-safe: one pool for all workers)."""

    def __init__(
        self, url: str, model: str | None, api_key: str | None, options: SegmentOptions, channel: int | None = None
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=120.0)
        try:
            listed = self.client.get("/models")
        except httpx.TransportError as error:
            raise SetupFailed(f"cannot reach the service at {url}: {error}") from None
        if listed.status_code == 401:
            raise SetupFailed(f"the service at {url} needs an API key: pass --api-key or set {API_KEY_ENV}")
        if listed.status_code != 200:
            raise SetupFailed(f"GET {url}/models answered HTTP {listed.status_code}: {listed.text[:300]}")
        models = {m["name"]: m for m in listed.json()["models"]}
        self.model = model or next(iter(models))
        if self.model not in models:
            raise SetupFailed(f"the service has no model {self.model!r}; it serves {', '.join(models)}")
        meta = models[self.model]
        self.categories = [{"id": i, "name": n} for i, n in zip(meta["category_ids"], meta["class_names"])]
        # How the model reads images, to draw the overlays on what it saw (a photo model's rule if not told).
        self.contract = InputContract.model_validate(meta["input"]) if meta.get("input") else PHOTO_CONTRACT
        self.channel = options.channel
        self.params: dict[str, Any] = {"model": self.model}
        optional = {
            "score_threshold": options.score_threshold,
            "max_detections": options.max_detections,
            "channel": options.channel,
            "scale": options.scale,
            "diameter": options.diameter,
            "measure": "true" if options.measure else None,
        }
        self.params.update({key: value for key, value in optional.items() if value is not None})

    def __call__(self, data: bytes) -> tuple[np.ndarray, SegmentResponse]:
        # The overlay's background: the 8-bit image the model reads, oriented as the service sees it (the
        # service checks its own pixel limit).
        image = decode_image(data, self.contract, self.channel).rgb
        try:
            response = self.client.post(
                "/segment", content=data, params=self.params, headers={"Content-Type": "application/octet-stream"}
            )
        except httpx.TransportError as error:
            raise PredictFailed(f"request failed: {error}") from None
        if response.status_code != 200:
            try:
                detail = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                detail = response.text[:300]
            raise PredictFailed(f"HTTP {response.status_code}: {detail}")
        return image, SegmentResponse.model_validate_json(response.content)


class LocalPredictor:
    """The model in this process through ``inference.Predictor``: the service's pipeline (decode by the
    model's contract, resize into a bucket or tile, runtime, finishing, merge), one image at a time."""

    def __init__(self, checkpoint: Path, cache_dir: Path, options: SegmentOptions, runtime: RuntimeOptions) -> None:
        if not checkpoint.is_file():
            raise SetupFailed(f"{checkpoint} not found")
        try:
            self.predictor = Predictor.open(checkpoint, runtime, cache_dir=cache_dir)
        except Exception as error:  # a file that is no checkpoint or graph: say so, not with a traceback
            raise SetupFailed(f"cannot load {checkpoint}: {type(error).__name__}: {error}") from error
        try:
            self.predictor.pipeline.check(options)
        except InputError as error:
            raise SetupFailed(f"{checkpoint}: {error}") from None
        self.model = checkpoint.parent.name if checkpoint.stem == "model" else checkpoint.stem
        meta = self.predictor.metadata
        self.categories = [{"id": i, "name": n} for i, n in zip(meta.category_ids, meta.class_names)]
        self.options = options

    def __call__(self, data: bytes) -> tuple[np.ndarray, SegmentResponse]:
        decoded = self.predictor.pipeline.decode(data, self.options.channel)
        segmentation = self.predictor(decoded, self.options)
        opened = self.predictor.opened
        version = opened.version if opened is not None else ""
        answer = SegmentResponse.from_segmentation(segmentation, self.model, version, self.predictor.metadata)
        return decoded.rgb, answer


Segmenter = Callable[[bytes], tuple[np.ndarray, SegmentResponse]]


# ------------------------------------------------------------------ one image, the run
def run_job(job: Job, segment: Segmenter, out: Path, label_formats: tuple[LabelFormat, ...] = ("png",)) -> Done:
    """Read, segment and draw one image, its label image in each of ``label_formats``; every failure becomes
    the Done's error, never an exception."""
    try:
        image, answer = segment(job.path.read_bytes())
        (out / f"{job.name}.overlay.png").write_bytes(png_bytes(overlay_image(image, answer)))
        labels = label_image(answer)
        for label_format in label_formats:
            (out / f"{job.name}.labels{LABEL_SUFFIXES[label_format]}").write_bytes(label_bytes(labels, label_format))
    except (InputError, PredictFailed, OSError) as error:
        return Done(job, None, str(error))
    except Exception as error:  # noqa: BLE001 -- whatever else one image provokes, the run goes on
        return Done(job, None, f"{type(error).__name__}: {error}")
    return Done(job, answer, None)


def coco_results(done: list[Done]) -> list[dict[str, Any]]:
    """The COCO results list (`loadRes` input): one entry per instance, images in input order."""
    return [
        {
            "image_id": d.job.image_id,
            "category_id": instance.category_id,
            "bbox": list(instance.bbox),
            "score": instance.score,
            "segmentation": instance.segmentation.model_dump(mode="json"),
        }
        for d in sorted(done, key=lambda d: d.job.image_id)
        if d.answer is not None
        for instance in d.answer.instances
        if isinstance(instance.segmentation, RLE)
    ]


def measurement_rows(done: list[Done]) -> list[dict[str, Any]]:
    """One row per instance (``INSTANCE_COLUMNS`` + ``MEASUREMENT_COLUMNS``), images in input order and
    instances in score order (``label`` is the instance's value in its label image); the measurement cells
    are empty where an instance has none (an empty mask)."""
    rows = []
    for d in sorted(done, key=lambda d: d.job.image_id):
        if d.answer is None:
            continue
        for label, instance in enumerate(d.answer.instances, start=1):
            x, y, w, h = instance.bbox
            row: dict[str, Any] = {
                "image_id": d.job.image_id,
                "image": d.job.name,
                "label": label,
                "category": instance.category_name,
                "score": instance.score,
                "bbox_x": x,
                "bbox_y": y,
                "bbox_width": w,
                "bbox_height": h,
            }
            if instance.measurements is not None:
                row.update(instance.measurements.model_dump())
            rows.append(row)
    return rows


def write_measurements(path: Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` as a CSV table with a header (pandas, Fiji and napari read it as-is)."""
    with path.open("w", newline="") as table:
        writer = csv.DictWriter(table, fieldnames=[*INSTANCE_COLUMNS, *MEASUREMENT_COLUMNS], restval="")
        writer.writeheader()
        writer.writerows(rows)


def coco_images(done: list[Done], categories: list[dict[str, Any]]) -> dict[str, Any]:
    """A COCO dataset of the run's segmented images (no annotations), for `COCO(...).loadRes(results)`."""
    images = [
        {"id": d.job.image_id, "file_name": str(d.job.path), "width": d.answer.width, "height": d.answer.height}
        for d in sorted(done, key=lambda d: d.job.image_id)
        if d.answer is not None
    ]
    return {"images": images, "annotations": [], "categories": categories}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m service.predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "inputs", nargs="+", help="image files, folders (their images) or globs (quote them; ** recurses)"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--url", help="a running service, e.g. http://localhost:8000")
    source.add_argument(
        "--checkpoint", type=Path, help="a training checkpoint (.pt), an exported .onnx graph or a TensorRT engine"
    )
    parser.add_argument("--out", type=Path, default=Path("predictions"), help="output folder (default: predictions)")
    parser.add_argument("--model", help="--url: the served model (default: the service's first)")
    parser.add_argument(
        "--score-threshold",
        type=float,
        default=None,
        help="drop detections scoring below this (default: the model's recommended threshold, chosen on its "
        "validation split, as the service and its page default to)",
    )
    parser.add_argument("--max-detections", type=int, default=None, help="keep at most this many per image")
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--diameter",
        type=float,
        default=None,
        help="the objects' typical diameter in pixels of your images: the model runs at the scale that brings it "
        "to the size it was trained on (its expected_diameter; models that record their training object size)",
    )
    size.add_argument(
        "--scale",
        type=scale_argument,
        default=None,
        help="instead of a diameter: a factor on the model's own input size (0.1-10; e.g. 0.5 for images at "
        "twice the training magnification), or 'auto' to estimate it from a first pass (default "
        f"{DEFAULT_SCALE_HELP})",
    )
    parser.add_argument(
        "--channel",
        type=int,
        default=None,
        help="microscopy models: the channel (0-3) of a multi-channel image to segment (default: the mean of its "
        "colour channels)",
    )
    parser.add_argument(
        "--measure",
        action="store_true",
        help=f"write {MEASUREMENTS_FILE}: per instance its area, centroid, perimeter, eccentricity, and the mean "
        "and max intensity of the original image's values (scikit-image's regionprops)",
    )
    parser.add_argument(
        "--label-format",
        choices=tuple(LABEL_FORMAT_CHOICES),
        default="png",
        help="the label images: <name>.labels.png (16-bit), <name>.labels.tif (16-bit, 32-bit above 65535 "
        "instances) or both (default png)",
    )
    parser.add_argument("--concurrency", type=int, default=4, help="--url: requests in flight at once (default 4)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"--url: sent as a Bearer token (default: ${API_KEY_ENV})",
    )
    add_runtime_arguments(parser)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"--checkpoint: {CACHE_DIR_HELP}",
    )
    args = parser.parse_args(argv)
    if args.score_threshold is not None and not 0 <= args.score_threshold <= 1:
        parser.error("--score-threshold must be in [0, 1]")
    if args.concurrency < 1 or (args.max_detections is not None and args.max_detections < 1):
        parser.error("--concurrency and --max-detections must be at least 1")
    if args.diameter is not None and not args.diameter > 0:
        parser.error("--diameter must be a positive number of pixels")
    if args.channel is not None and not 0 <= args.channel <= 3:
        parser.error("--channel must be 0, 1, 2 or 3")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    paths, unmatched = collect_inputs(args.inputs)
    for argument in unmatched:
        print(f"skipped {argument}: no such file, or no images in it", file=sys.stderr)
    if not paths:
        print("error: no images to segment", file=sys.stderr)
        return 2
    options = SegmentOptions(
        score_threshold=args.score_threshold,
        max_detections=args.max_detections,
        scale=args.scale,
        diameter=args.diameter,
        channel=args.channel,
        measure=args.measure,
    )
    predict: RemotePredictor | LocalPredictor
    try:
        if args.url:
            predict = RemotePredictor(args.url, args.model, args.api_key, options)
        else:
            cache_dir = args.cache_dir or default_cache_dir()
            predict = LocalPredictor(args.checkpoint, cache_dir, options, runtime_options(args))
    except SetupFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    workers = args.concurrency if args.url else 1  # in process, the runtime already uses the cores
    args.out.mkdir(parents=True, exist_ok=True)

    jobs = plan_jobs(paths)
    done: list[Done] = []
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(jobs), unit="image", desc=predict.model) as bar:
        label_formats = LABEL_FORMAT_CHOICES[args.label_format]
        futures = [pool.submit(run_job, job, predict, args.out, label_formats) for job in jobs]
        for future in as_completed(futures):
            result = future.result()
            if result.error is not None:
                bar.write(f"skipped {result.job.path}: {result.error}", file=sys.stderr)
            for warning in result.answer.warnings if result.answer is not None else []:
                bar.write(f"warning: {result.job.path}: {warning}", file=sys.stderr)
            done.append(result)
            bar.update()

    (args.out / "results.json").write_text(json.dumps(coco_results(done)))
    (args.out / "images.json").write_text(json.dumps(coco_images(done, predict.categories), indent=1))
    if args.measure:
        write_measurements(args.out / MEASUREMENTS_FILE, measurement_rows(done))
    segmented = [d.answer for d in done if d.answer is not None]
    failed = len(done) - len(segmented) + len(unmatched)
    instances = sum(len(answer.instances) for answer in segmented)
    print(
        f"{len(segmented)} of {len(done)} images segmented ({instances} instances), {failed} failed; wrote {args.out}/"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
