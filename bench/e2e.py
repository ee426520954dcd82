"""End-to-end CPU race, batch 1: JPEG bytes in -> COCO RLE JSON out, ours vs Ultralytics YOLO11n-seg.

    python -m bench.e2e [--repeats 15] [--threads 2] [--sizes 640 512] [--methods meinst embedmask]
        [--engines onnxruntime openvino-fp32 openvino-bf16 openvino-auto] [--min-detections 90]
        [--output bench/results/e2e.json]

Every model runs on the same real photos (the VOC JPEGs of Debian's labelme-examples), in one process,
interleaved image by image and model by model so that load on a shared machine hits all of them alike.
Each run is timed stage by stage; the tables show medians over every (repeat, image) run, and the
end-to-end figure is the median of the per-run totals. Every contender runs on every CPU engine of this
host (``engines``: onnxruntime, OpenVINO fp32, and OpenVINO bf16 where the CPU has it), so the ratio
compares each of ours with YOLO's fastest route.

- Ours (MEInst, EmbedMask): the CPU recipe (configs/fcos_MNV2_FPN_cpu.yaml, the bundled models' network) exported by
  ``export.onnx_export.export_onnx`` to one fused graph, opened by the runtime factory every entry point uses
  (``inference.runtime.open_runtime``: onnxruntime, or OpenVINO with one static engine for the SxS shape). The
  request path is the service's: ``inference.Predictor`` (decode with EXIF orientation by the model's
  intensity rule; resize by a size rule whose both sides are the bench size, so the long side becomes S, into
  one SxS shape bucket, as YOLO's letterbox; the graph; finishing: paste, threshold, RLE in the original
  frame, on the same thread count as the graph and as YOLO's torch post-processing), its stage times
  (``Segmentation.timings``), then the service's response body
  (``service.schemas.SegmentResponse.from_segmentation``, serialised as the service sends it).
- YOLO11n-seg: built from ``yolo11n-seg.yaml`` (random weights, nothing downloaded), exported by its own
  exporter to a static SxS ONNX graph run in onnxruntime and to OpenVINO IR compiled by OpenVINO (as its
  predictor does, latency hint), with the same thread count. The rest is what its
  predictor does: ``cv2.imdecode`` (its ``imread``), ``LetterBox`` + its tensor preprocessing,
  ``ultralytics.utils.nms.non_max_suppression``, then masks in the original frame by either of its two
  routes -- ``retina`` (``ops.process_mask_native``, what ``retina_masks=True`` does) or ``default``
  (``ops.process_mask`` at input size, then ``ops.scale_masks`` to the original frame as its validator
  does) -- and the empty-mask filter of its ``construct_result``; the RLE is ``pycocotools.mask.encode``
  of the Fortran-ordered full-frame masks, then the same response body (``SegmentResponse`` of its instances).

About 100 detections per image for every model, with random weights: ours take
``bench.latency.bench_detector`` (classification bias set so the 3,000 best pairs of a 512x512 image pass
the 0.05 score threshold, a disk-shaped MEInst codec) and answer every detection the graph returns
(score threshold 0; the graph keeps its ``max_detections`` = 100),
with the box regression bias raised (``BOX_SIDE_STRIDES``) so that our boxes are on average at least as
large as YOLO's; YOLO runs with ``conf=0.0`` (every anchor passes) and ``max_det=100``, and gets
non-empty masks (``yolo_with_masks``). The script asserts at least ``--min-detections`` (default
``MIN_DETECTIONS``) instances in every timed run and reports the counts, the mean box area and the mean mask
area per instance.

Prints a markdown table and writes bench/results/e2e.json. The smoke test's mode: ``--methods meinst --engines
onnxruntime --sizes 128 --repeats 1 --min-detections 0``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

os.environ.setdefault("YOLO_OFFLINE", "1")  # no update checks or downloads from Ultralytics

import cv2
import numpy as np
import onnxruntime as ort
import torch
import ultralytics
from pycocotools import mask as mask_utils
from torch import nn
from ultralytics import YOLO
from ultralytics.data.augment import LetterBox
from ultralytics.utils import nms, ops

from bench.latency import EVERY_DETECTION, at_test_size, bench_config, bench_detector, machine_info
from export.onnx_export import export_onnx
from export.openvino_runtime import cpu_has_bf16
from inference.decode import image_size
from inference.predictor import Predictor, in_process_options
from inference.runtime import RuntimeOptions, open_runtime
from service.schemas import RLE, Instance, SegmentResponse

REPO = Path(__file__).resolve().parents[1]
IMAGES = Path("/usr/share/doc/labelme-examples/examples/instance_segmentation/data_dataset_coco/JPEGImages")
METHODS = ("meinst", "embedmask")
ENGINES = ("onnxruntime", "openvino-fp32", "openvino-bf16", "openvino-auto")
MAX_DETECTIONS = 100
MIN_DETECTIONS = 90
YOLO_IOU = 0.7  # the predictor's default `iou`
# The untrained YOLO's features are flat, so its DFL gives every box sides of 7.5 strides and NMS keeps
# P4/P5 boxes: about 30% of the image each. Ours regress each side in strides too; 16 strides gives
# boxes at least as large on average (the table shows both), so our box-local finishing gets no
# advantage from small boxes.
BOX_SIDE_STRIDES = 16.0
# openvino-auto: the service's default on a bf16 CPU (ours: the mask decode in fp32; YOLO, no such mark: bf16).
OPENVINO_PRECISIONS: dict[str, Literal["bf16", "fp32", "auto"]] = {
    "openvino-fp32": "fp32",
    "openvino-bf16": "bf16",
    "openvino-auto": "auto",
}
STAGES = ("decode", "preprocess", "graph", "postprocess", "rle", "json")


@dataclass
class Run:
    """One image through one pipeline: stage times (ms) and what came out."""

    times: dict[str, float]
    instances: int
    box_area: float  # mean box area / image area
    mask_area: float  # mean mask area / image area
    body: bytes


def mean_share(values: list[float], size: tuple[int, int]) -> float:
    """The mean of ``values`` (areas in pixels) as a share of an image of ``size`` (H, W); 0 for none."""
    return float(np.mean(values)) / (size[0] * size[1]) if values else 0.0


def engine_options(engine: str, threads: int) -> RuntimeOptions:
    """One of ``ENGINES`` as runtime options: one stream of ``threads`` threads, on the CPU."""
    if engine == "onnxruntime":
        return in_process_options(engine="onnxruntime", providers=["CPUExecutionProvider"], threads=threads)
    return in_process_options(engine="openvino", precision=OPENVINO_PRECISIONS[engine], threads=threads)


class OursPipeline:
    """MEInst or EmbedMask: the fused graph on one of the engines we ship, behind the service's pipeline
    (``inference.Predictor``) and its response body."""

    def __init__(self, method: str, size: int, graph: Path, threads: int, engine: str, cache_dir: Path) -> None:
        self.name = f"ours-{method}-{engine}"
        opened = open_runtime(graph, engine_options(engine, threads), cache_dir)
        self.version = opened.version
        # Both sides of the size rule are S (the long side becomes S) and S x S is the one bucket.
        self.predictor = Predictor(
            opened.runtime,
            at_test_size(opened.metadata, size, size),
            buckets=[(size, size)],
            finishing_threads=threads,
            opened=opened,
        )

    def __call__(self, data: bytes) -> Run:
        answer = self.predictor(data, EVERY_DETECTION)
        started = time.perf_counter()
        response = SegmentResponse.from_segmentation(answer, self.name, self.version, self.predictor.metadata)
        body = response.model_dump_json().encode()
        seconds = answer.timings
        times = {
            "decode": seconds["decode"] * 1e3,
            "preprocess": seconds["prepare"] * 1e3,
            "graph": seconds["infer"] * 1e3,
            "postprocess": seconds["finish"] * 1e3,  # paste, threshold and RLE in one pass
            "json": (time.perf_counter() - started) * 1e3,
        }
        boxes = [(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in (i.box for i in answer.instances)]
        areas = [float(i.area or 0) for i in answer.instances]
        size = answer.image_size
        return Run(times, len(answer.instances), mean_share(boxes, size), mean_share(areas, size), body)


class Clock:
    """Stage timer: ``lap(name)`` books the time since the previous lap."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.times[stage] = self.times.get(stage, 0.0) + (now - self._last) * 1e3
        self._last = now


class YoloGraph:
    """YOLO11n-seg's exported graph in an engine: its ONNX file in onnxruntime, or its OpenVINO IR (what
    ``format="openvino"`` writes and its predictor loads) compiled with the given precision hint."""

    def __init__(self, graphs: dict[str, Path], engine: str, threads: int) -> None:
        self.engine = engine
        if engine == "onnxruntime":
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            self.session = ort.InferenceSession(str(graphs["onnx"]), options, providers=["CPUExecutionProvider"])
            self.input_name = self.session.get_inputs()[0].name
        else:
            import openvino as ov

            hint = "f32" if OPENVINO_PRECISIONS[engine] == "fp32" else "bf16"
            config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads}
            self.compiled = ov.Core().compile_model(str(graphs["openvino"]), "CPU", config)
            self.request = self.compiled.create_infer_request()

    def __call__(self, tensor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(prediction, protos) of a float32 [1, 3, S, S] batch."""
        if self.engine == "onnxruntime":
            prediction, protos = self.session.run(None, {self.input_name: tensor})
            return prediction, protos
        self.request.infer({0: tensor})
        return self.request.get_output_tensor(0).data.copy(), self.request.get_output_tensor(1).data.copy()


class YoloPipeline:
    """YOLO11n-seg's graph in one engine with its own pre- and post-processing."""

    def __init__(self, graph: YoloGraph, size: int, names: dict[int, str], masks: str) -> None:
        self.name = f"yolo11n-seg-{masks}-{graph.engine}"
        self.graph = graph
        self.size, self.names, self.masks = size, names, masks
        self.letterbox = LetterBox((size, size), auto=False, stride=32)

    def __call__(self, data: bytes) -> Run:
        clock = Clock()
        original = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # BGR, as ultralytics' imread
        clock.lap("decode")
        letterboxed = self.letterbox(image=original)
        tensor = torch.from_numpy(letterboxed).unsqueeze(0).permute(0, 3, 1, 2).contiguous().flip(1).float().div_(255)
        clock.lap("preprocess")
        prediction, protos = (torch.from_numpy(o) for o in self.graph(tensor.numpy()))
        clock.lap("graph")
        pred = nms.non_max_suppression(
            prediction, conf_thres=0.0, iou_thres=YOLO_IOU, max_det=MAX_DETECTIONS, nc=len(self.names)
        )[0]
        frame = original.shape[:2]
        if self.masks == "retina":
            pred[:, :4] = ops.scale_boxes(tensor.shape[2:], pred[:, :4], original.shape)
            masks = ops.process_mask_native(protos[0], pred[:, 6:], pred[:, :4], frame)
        else:
            masks = ops.process_mask(protos[0], pred[:, 6:], pred[:, :4], tensor.shape[2:], upsample=True)
            pred[:, :4] = ops.scale_boxes(tensor.shape[2:], pred[:, :4], original.shape)
            masks = ops.scale_masks(masks[None], frame)[0].byte()
        keep = masks.amax((-2, -1)) > 0  # construct_result drops empty masks
        pred, masks = pred[keep], masks[keep]
        clock.lap("postprocess")
        rles = mask_utils.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy()))
        areas = mask_utils.area(rles).tolist()
        for rle in rles:
            rle["counts"] = rle["counts"].decode("ascii")
        clock.lap("rle")
        instances = [
            Instance(
                bbox=(x0, y0, x1 - x0, y1 - y0),
                score=score,
                category_id=int(c) + 1,
                category_name=self.names[int(c)],
                area=area,
                segmentation=RLE(**rle),
            )
            for (x0, y0, x1, y1), score, c, area, rle in zip(
                pred[:, :4].tolist(), pred[:, 4].tolist(), pred[:, 5].tolist(), areas, rles
            )
        ]
        height, width = frame
        response = SegmentResponse(
            model=self.name,
            version="",
            width=width,
            height=height,
            scale=1.0,
            resize_factor=self.size / max(width, height),  # the letterbox fits the long side
            diameter=None,
            score_threshold=0.0,
            instances=instances,
        )
        body = response.model_dump_json().encode()
        clock.lap("json")
        boxes = [i.bbox[2] * i.bbox[3] for i in instances]
        return Run(clock.times, len(instances), mean_share(boxes, frame), mean_share(areas, frame), body)


def export_ours(method: str, directory: Path) -> Path:
    """The recipe with ``bench_detector``'s detecting heads, boxes widened to at least YOLO's (above)."""
    cfg = bench_config(method)
    model = bench_detector(cfg)
    with torch.no_grad():
        nn.init.constant_(model.head.bbox_pred.bias, BOX_SIDE_STRIDES)
    path = directory / f"{method}.onnx"
    export_onnx(model, cfg, {}, path)
    return path


def yolo_with_masks(model: YOLO) -> None:
    """Give the untrained YOLO non-empty masks (its flat features give all-negative ones, which its
    predictor drops): a constant prototype (channel 0) with a positive coefficient, so every mask is its
    whole box -- a rectangle, the cheapest shape to encode."""
    head = model.model.model[-1]
    with torch.no_grad():
        head.proto.cv3.bn.weight[0], head.proto.cv3.bn.bias[0] = 0.0, 2.0
        for branch in head.cv4:
            branch[-1].bias[0] = 1.0


def export_yolo(size: int, directory: Path, openvino: bool) -> tuple[dict[str, Path], dict[int, str]]:
    """YOLO11n-seg from its yaml (random weights), exported by Ultralytics to a static SxS ONNX graph and,
    with ``openvino``, to OpenVINO IR (fp32 weights; the precision is chosen when it is compiled)."""
    torch.manual_seed(0)
    model = YOLO("yolo11n-seg.yaml")
    yolo_with_masks(model)
    target = directory / f"yolo11n-seg-{size}"
    target.mkdir()
    graphs = {}
    with contextlib.chdir(target):
        graphs["onnx"] = Path(model.export(format="onnx", imgsz=size, dynamic=False, verbose=False)).resolve()
        if openvino:
            folder = Path(model.export(format="openvino", imgsz=size, dynamic=False, half=False, verbose=False))
            graphs["openvino"] = next(folder.resolve().glob("*.xml"))
    return graphs, dict(model.names)


def summarise(runs: list[Run]) -> dict[str, Any]:
    summary: dict[str, Any] = {
        f"{stage}_ms": statistics.median(r.times.get(stage, 0.0) for r in runs) for stage in STAGES
    }
    summary["total_ms"] = statistics.median(sum(r.times.values()) for r in runs)
    summary["total_ms_p90"] = float(np.percentile([sum(r.times.values()) for r in runs], 90))
    counts = [r.instances for r in runs]
    summary.update(
        runs=len(runs),
        instances_min=min(counts),
        instances_median=statistics.median(counts),
        box_area_mean=statistics.fmean(r.box_area for r in runs),
        mask_area_mean=statistics.fmean(r.mask_area for r in runs),
        json_bytes_median=statistics.median(len(r.body) for r in runs),
    )
    return summary


def engines() -> list[str]:
    """Every CPU engine on this host: onnxruntime, and OpenVINO in fp32 and, where the CPU has it, in bf16 and
    in the service's default (auto)."""
    return ["onnxruntime", "openvino-fp32", *(["openvino-bf16", "openvino-auto"] if cpu_has_bf16() else [])]


def benchmark(
    repeats: int,
    threads: int,
    sizes: list[int],
    log: Callable[[str], None],
    methods: Sequence[str] = METHODS,
    engine_names: list[str] | None = None,
    min_detections: int = MIN_DETECTIONS,
) -> dict[str, Any]:
    """The race on ``engine_names`` (default: every CPU engine of this host, ``engines``) at each size."""
    engine_names = engine_names or engines()
    torch.set_num_threads(threads)
    photos = sorted(IMAGES.glob("*.jpg"))
    encoded = [p.read_bytes() for p in photos]
    info = machine_info(threads)
    info.update(
        ultralytics=ultralytics.__version__,
        opencv=cv2.__version__,
        pycocotools=version("pycocotools"),
        onnxslim=version("onnxslim"),
    )
    results: dict[str, Any] = {
        "machine": info,
        "repeats": repeats,
        "images": [
            {"file": p.name, "height_width": list(image_size(d)[::-1]), "bytes": len(d)}
            for p, d in zip(photos, encoded)
        ],
        "detections": (
            f"ours: bench.latency.bench_detector heads, box regression bias {BOX_SIDE_STRIDES} strides, graph "
            f"max_detections={MAX_DETECTIONS}, every detection answered; YOLO: conf=0.0, iou={YOLO_IOU}, "
            f"max_det={MAX_DETECTIONS}, masks made non-empty (yolo_with_masks); every timed run asserted >= "
            f"{min_detections} instances"
        ),
        "json": "the service's response body (service.schemas.SegmentResponse: {model, version, width, height, scale, "
        "score_threshold, instances: [{bbox xywh, score, category_id, category_name, area, segmentation: COCO "
        "compressed RLE}], warnings}) for every model",
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        ours = {method: export_ours(method, directory) for method in methods}
        log("exported ours")
        for size in sizes:
            openvino = any(engine in OPENVINO_PRECISIONS for engine in engine_names)
            yolo_graphs, names = export_yolo(size, directory, openvino)
            log(f"exported YOLO11n-seg at {size}")
            pipelines: list[OursPipeline | YoloPipeline] = [
                OursPipeline(m, size, path, threads, engine, directory / "cache")
                for m, path in ours.items()
                for engine in engine_names
            ]
            for engine in engine_names:
                graph = YoloGraph(yolo_graphs, engine, threads)
                pipelines += [YoloPipeline(graph, size, names, masks) for masks in ("retina", "default")]
            runs: dict[str, list[Run]] = {p.name: [] for p in pipelines}
            for attempt in range(repeats + 1):  # the first round warms up
                for data in encoded:
                    for pipeline in pipelines:
                        run = pipeline(data)
                        if attempt:
                            assert run.instances >= min_detections, (
                                f"{pipeline.name} at {size}: only {run.instances} instances"
                            )
                            runs[pipeline.name].append(run)
            rows = [{"model": name, "size": size, **summarise(r)} for name, r in runs.items()]
            yolo_best = min(r["total_ms"] for r in rows if r["model"].startswith("yolo"))
            for row in rows:
                row["yolo_best_over_this"] = yolo_best / row["total_ms"]
            results["rows"].extend(rows)
            for method in methods:
                ours_best = min(r["total_ms"] for r in rows if r["model"].startswith(f"ours-{method}"))
                log(
                    f"{size}: fastest YOLO {yolo_best:.1f} ms, fastest ours-{method} {ours_best:.1f} ms, "
                    f"ratio {yolo_best / ours_best:.2f}"
                )
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    return results


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        (
            "| input | model | decode | preprocess | graph | postprocess | RLE | JSON | **end to end** (p90) "
            "| fastest YOLO / this | instances (min) | box area | mask area |"
        ),
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        rle = f"{r['rle_ms']:.1f}" if r["model"].startswith("yolo") else "(in post)"
        lines.append(
            f"| {r['size']}x{r['size']} | {r['model']} | {r['decode_ms']:.1f} | {r['preprocess_ms']:.1f} | "
            f"{r['graph_ms']:.1f} | {r['postprocess_ms']:.1f} | {rle} | {r['json_ms']:.1f} | "
            f"**{r['total_ms']:.1f}** ({r['total_ms_p90']:.1f}) | "
            f"{r['yolo_best_over_this']:.2f}x | {r['instances_median']:.0f} ({r['instances_min']}) | "
            f"{100 * r['box_area_mean']:.1f}% | {100 * r['mask_area_mean']:.1f}% |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--repeats", type=int, default=15, help="timed rounds over all images (after one warm-up round)"
    )
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads for onnxruntime and torch"
    )
    parser.add_argument("--sizes", nargs="+", type=int, default=[640, 512])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="our contenders")
    parser.add_argument(
        "--engines", nargs="+", choices=ENGINES, default=None, help="CPU engines (default: every one of this host)"
    )
    parser.add_argument(
        "--min-detections",
        type=int,
        default=MIN_DETECTIONS,
        help="instances every timed run must answer (random heads keep about 100 at the default sizes)",
    )
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "e2e.json"))
    args = parser.parse_args(argv)
    results = benchmark(
        args.repeats,
        args.threads,
        args.sizes,
        log=lambda line: print(line, flush=True),
        methods=args.methods,
        engine_names=args.engines,
        min_detections=args.min_detections,
    )
    print(table(results["rows"]))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    print(f"saved {output}")


if __name__ == "__main__":
    main()
