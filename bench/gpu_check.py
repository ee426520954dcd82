"""The one prepared GPU check: what the repository claims about CUDA, measured in one run of about 8 minutes.

    python -m bench.gpu_check OUT [--dry-run] [--parts tests parity ...]

(``bench/gpu_check.sh OUT`` installs the carried wheels and the project first, then runs this.) Each part
runs in its own process under a time cap, writes ``OUT/<part>.json`` after every measurement (a part cut
off by its cap still leaves what it measured), and the run ends with ``OUT/summary.json``: the machine, each
part's status, time and what it skipped. The parts, in order:

- ``tests``: the suite's CUDA tests (marker ``cuda``: AMP training steps, the torch runtime on CUDA against
  the CPU graph, CUDA graph replays, ``torch.compile``, fp16/bf16, the service's CUDA-graph warm-up) and the
  TensorRT tests, which skip where TensorRT is missing;
- ``parity``: COCO AP of the bundled models on the nucleus validation set (60 tiles), the fused graph in
  onnxruntime on the CPU against the torch runtime on CUDA in fp32 (TF32 convolutions, torch's default),
  fp16 and bf16; the bar is 0.2 AP;
- ``latency``: one ``TorchRuntime.infer`` (upload, network, selection, NMS, mask decode, download) at
  800x1333 (padded 800x1344), batch 1 and 8, fp32/fp16/bf16, MEInst and EmbedMask on MobileNetV2-FPN (the
  CPU recipe) and ResNet-50-FPN (the paper recipe, 80 classes), random heads that keep 100 detections an
  image (``bench.latency.bench_detector``); beside the papers' speeds (MEInst R-50 12.8 FPS on a 1080 Ti,
  EmbedMask R-50 66 ms on a 2080 Ti: other GPUs, so a reference, not a race);
- ``training``: seconds per image of an AMP training step (fp16 autocast, GradScaler; forward, backward,
  SGD step), MEInst, EmbedMask and torchvision's Mask R-CNN on the same backbone and input size, interleaved
  on the same batches of HeLa tiles resized by each recipe's training rule: MobileNetV2 (ImageNet weights
  not needed for speed) and ResNet-50 (random init), batch 8;
- ``serve``: ``bench.serve`` against ``python -m service --runtime.engine torch`` on the GPU with the bundled
  models, concurrency 1/16/64, batching on (8) and off, p50/p99 and where the time goes (decode, queue,
  batch run, finishing, from the service's metrics);
- ``graphs``: CUDA graphs and ``torch.compile`` of the network part against eager, batch 1, fp16, per
  backbone (launch overhead is what they remove; whether that pays is what this measures), with compile times.

``--dry-run`` (automatic without CUDA) runs every part on the CPU with tiny sizes and iteration counts
(64- to 256-pixel inputs, one timed step, fp32 only, one thread per process): it proves the script end to end
and says what it skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
PARTS = ("tests", "parity", "latency", "training", "serve", "graphs")
# Seconds each part may take on the GPU (about 8 minutes in all with the install).
BUDGETS = {"tests": 90, "parity": 45, "latency": 75, "training": 85, "serve": 100, "graphs": 70}
DRY_BUDGETS = dict.fromkeys(PARTS, 300)  # caps only: on a loaded 2-core CPU a part took minutes
KILL_GRACE_S = 10  # past its budget a part is killed (it stops itself between measurements before that)
PARITY_BAR_AP = 0.2
PUBLISHED = {
    "meinst": {
        "backbone": "r50",
        "fps": 12.8,
        "ms": 1000 / 12.8,
        "gpu": "GTX 1080 Ti",
        "source": "MEInst paper (R-50, 800x1333)",
    },
    "embedmask": {
        "backbone": "r50",
        "fps": 1000 / 66,
        "ms": 66.0,
        "gpu": "RTX 2080 Ti",
        "source": "EmbedMask paper (R-50, 800x1333)",
    },
}
BACKBONES = {"mnv2": "configs/{method}_MNV2_nucleus.yaml", "r50": "configs/{method}_R50_FPN_1x.yaml"}
LATENCY_BACKBONES = {"mnv2": "configs/fcos_MNV2_FPN_cpu.yaml", "r50": "configs/{method}_R50_FPN_1x.yaml"}
NO_IMAGENET = ["model.backbone.weights=null", "model.backbone.weights_sha256=null"]
CODEC = REPO / "models" / "meinst_nucleus" / "codec.npz"
BUNDLED = {
    "meinst": REPO / "models" / "meinst_nucleus" / "model.pt",
    "embedmask": REPO / "models" / "embedmask_nucleus" / "model.pt",
}
CUDA_TEST_FILES = ["tests/test_torch_runtime.py", "tests/test_training.py", "tests/test_tensorrt.py"]


@dataclass(frozen=True)
class Plan:
    """Sizes and counts: the GPU run's, or the dry run's tiny ones."""

    dry_run: bool
    latency_size: tuple[int, int]
    latency_batches: tuple[int, ...]
    precisions: tuple[str, ...]
    warmup: int
    repeats: int
    train_batch: int
    train_rounds: int
    train_min_size: int | None  # None: each recipe's own training resize
    parity_images: int | None  # None: the whole validation set
    serve_concurrency: tuple[int, ...]
    serve_requests: int | None  # per concurrency level; None: bench.serve's max(40, 10 x concurrency)
    serve_buckets: list[str] | None

    @classmethod
    def make(cls, dry_run: bool) -> Plan:
        if dry_run:
            return cls(
                dry_run=True,
                latency_size=(64, 96),
                latency_batches=(1,),
                precisions=("fp32",),
                warmup=0,
                repeats=1,
                train_batch=2,
                train_rounds=1,
                train_min_size=64,
                parity_images=2,
                serve_concurrency=(1, 2),
                serve_requests=4,
                serve_buckets=["256x256"],
            )
        return cls(
            dry_run=False,
            latency_size=(800, 1344),
            latency_batches=(1, 8),
            precisions=("fp32", "fp16", "bf16"),
            warmup=3,
            repeats=20,
            train_batch=8,
            train_rounds=24,
            train_min_size=None,
            parity_images=None,
            serve_concurrency=(1, 16, 64),
            serve_requests=None,
            serve_buckets=None,
        )


class Part:
    """One part's record, rewritten to ``OUT/<name>.json`` after every row, and its deadline."""

    def __init__(self, name: str, out: Path, budget: float, plan: Plan) -> None:
        self.path = out / f"{name}.json"
        self.deadline = time.monotonic() + budget
        self.record: dict[str, Any] = {
            "part": name,
            "dry_run": plan.dry_run,
            "status": "running",
            "rows": [],
            "skipped": [],
            "errors": [],
        }
        self.save()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)

    def add(self, row: dict[str, Any]) -> None:
        self.record["rows"].append(row)
        print(json.dumps(row, default=str), flush=True)
        self.save()

    def skip(self, what: str, why: str) -> None:
        self.record["skipped"].append({"what": what, "why": why})
        self.save()

    @contextlib.contextmanager
    def attempt(self, what: str, needs_s: float = 0.0) -> Iterator[bool]:
        """Yields False (and records a skip) when less than ``needs_s`` is left; records a failure instead of
        raising, so that one broken measurement does not cost the rest."""
        if self.left() < needs_s:
            self.skip(what, f"out of time ({self.left():.0f} s left, needs about {needs_s:.0f} s)")
            yield False
            return
        try:
            yield True
        except Exception as error:  # noqa: BLE001 (recorded, and the part goes on)
            self.record["errors"].append({"what": what, "error": f"{type(error).__name__}: {error}"})
            print(f"FAILED {what}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            self.save()


def device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_ms(run: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median wall time of ``run`` in ms, the device synchronised around each call."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cpu_cores": os.cpu_count(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            tf32_convolutions=torch.backends.cudnn.allow_tf32,
        )
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            info["nvidia_smi"] = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            ).stdout.strip()
    with contextlib.suppress(ImportError):
        import torchvision

        info["torchvision"] = torchvision.__version__
    with contextlib.suppress(ImportError):
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    return info


def nucleus_val(work: Path, plan: Plan) -> tuple[Path, Path]:
    """The bundled models' validation set (HeLa tiles of 256, split by position; the dry run: one frame,
    ``plan.parity_images`` tiles), built once under ``work``: (annotations, images)."""
    from training.nucleus import build

    root = work / "nucleus"
    if not (root / "val.json").is_file():
        build(str(root), tile=256, frames=1 if plan.dry_run else None)
    annotations = root / "val.json"
    if plan.parity_images is not None:  # the dry run's subset
        subset = json.loads(annotations.read_text())
        subset["images"] = subset["images"][: plan.parity_images]
        kept = {image["id"] for image in subset["images"]}
        subset["annotations"] = [a for a in subset["annotations"] if a["image_id"] in kept]
        annotations = root / "val_subset.json"
        annotations.write_text(json.dumps(subset))
    return annotations, root / "val"


# ---------------------------------------------------------------- tests
def run_tests(part: Part, plan: Plan, work: Path) -> None:
    """The tests that need a GPU: the ``cuda``-marked ones, then test_tensorrt.py's (which skip without TensorRT).

    pytest runs verbose into a log, so that a run cut off at the part's cap still shows which tests passed.
    """
    pytest = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider"]
    runs = (
        ("cuda-marked tests", [*pytest, "-m", "cuda", *CUDA_TEST_FILES[:2]], work / "junit_cuda.xml"),
        ("TensorRT tests", [*pytest, CUDA_TEST_FILES[2]], work / "junit_tensorrt.xml"),
    )
    if plan.dry_run:
        part.skip("TensorRT tests", "dry run: one pytest run proves the harness")
    for what, command, xml in runs[:1] if plan.dry_run else runs:
        with part.attempt(what, needs_s=5) as go:
            if not go:
                continue
            log = xml.with_suffix(".log")
            with log.open("w") as output:
                command += [f"--junitxml={xml}"]
                process = subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT)
                try:
                    process.wait(timeout=max(part.left() - 2, 5))
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
                    part.skip(what, "pytest ran past the part's cap: output_tail shows the tests it finished")
            part.record.setdefault("output_tail", {})[what] = log.read_text()[-4000:]
            for case in junit_cases(xml):
                part.add(case)


def junit_cases(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    cases = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome, message = ("failed" if tag != "skipped" else "skipped"), (found.get("message") or "")[:500]
        cases.append(
            {
                "test": f"{case.get('classname')}::{case.get('name')}",
                "outcome": outcome,
                "seconds": float(case.get("time") or 0),
                "message": message,
            }
        )
    return cases


# ---------------------------------------------------------------- parity
def run_parity(part: Part, plan: Plan, work: Path) -> None:
    from export.onnx_export import build_metadata, export_onnx
    from export.runtimes import OnnxRuntime
    from inference.predictor import Predictor
    from model.checkpoint import load_detector
    from model.runtime import TorchRuntime
    from training.evaluate import evaluate, load_coco

    annotations, images = nucleus_val(work, plan)
    coco = load_coco(annotations)
    target = device()
    for method, checkpoint in BUNDLED.items():
        model, cfg, metadata = load_detector(checkpoint)
        graph_metadata = build_metadata(cfg, metadata)
        graph = work / f"{method}.onnx"
        reference: dict[str, Any] | None = None
        runs = [("onnxruntime-cpu", "fp32")] + [("torch-" + target.type, p) for p in plan.precisions]
        for runtime_name, precision in runs:
            with part.attempt(f"{method} {runtime_name} {precision}", needs_s=5) as go:
                if not go:
                    continue
                if runtime_name == "onnxruntime-cpu":
                    if not graph.is_file():
                        export_onnx(load_detector(checkpoint)[0], cfg, metadata, graph)
                    runtime: Any = OnnxRuntime(graph, providers=["CPUExecutionProvider"])
                else:
                    runtime = TorchRuntime(
                        load_detector(checkpoint)[0], target, precision=precision, channels_last=target.type == "cuda"
                    )  # type: ignore[arg-type]
                started = time.perf_counter()
                metrics = evaluate(Predictor(runtime, graph_metadata), coco, images)
                row = {
                    "model": method,
                    "runtime": runtime_name,
                    "precision": precision,
                    "images": len(coco.getImgIds()),
                    "seconds": round(time.perf_counter() - started, 2),
                    "bbox_AP": metrics["bbox"]["AP"],
                    "segm_AP": metrics["segm"]["AP"],
                    "segm_AP50": metrics["segm"]["AP50"],
                }
                if reference is None:
                    reference = row
                else:
                    row["bbox_AP_delta"] = row["bbox_AP"] - reference["bbox_AP"]
                    row["segm_AP_delta"] = row["segm_AP"] - reference["segm_AP"]
                    row["within_bar"] = (
                        abs(row["bbox_AP_delta"]) <= PARITY_BAR_AP and abs(row["segm_AP_delta"]) <= PARITY_BAR_AP
                    )
                part.add(row)
        del model


# ---------------------------------------------------------------- latency
def latency_detector(backbone: str, method: str, plan: Plan) -> Any:
    from bench.latency import bench_detector
    from model.config import load_config

    cfg = load_config(
        REPO / LATENCY_BACKBONES[backbone].format(method=method),
        [f"model.method={method}", *NO_IMAGENET, "model.meinst.codec_path=null"],
    )
    # Calibrated at 512x512 as bench.latency does (the dry run: at its own tiny size).
    return bench_detector(cfg, calibration_size=plan.latency_size if plan.dry_run else (512, 512)), cfg


def run_latency(part: Part, plan: Plan, work: Path) -> None:
    from model.runtime import TorchRuntime

    target = device()
    rng = np.random.default_rng(0)
    height, width = plan.latency_size
    for backbone in ("r50", "mnv2"):  # the papers' backbone first
        for method in ("meinst", "embedmask"):
            with part.attempt(f"{backbone} {method}", needs_s=5) as go:
                if not go:
                    continue
                model, _ = latency_detector(backbone, method, plan)
                for precision in plan.precisions:
                    runtime = TorchRuntime(model, target, precision=precision, channels_last=target.type == "cuda")  # type: ignore[arg-type]
                    for batch in plan.latency_batches:
                        if part.left() < 3:
                            part.skip(f"{backbone} {method} {precision} batch {batch}", "out of time")
                            continue
                        images = rng.integers(0, 256, (batch, 3, height, width), dtype=np.uint8)
                        outputs = runtime.infer(images)
                        gpu_images = torch.from_numpy(images).to(target)
                        if runtime.channels_last:
                            gpu_images = gpu_images.contiguous(memory_format=torch.channels_last)
                        with torch.inference_mode():
                            network = median_ms(lambda: runtime._network(gpu_images), plan.warmup, plan.repeats)  # noqa: B023
                        infer = median_ms(lambda: runtime.infer(images), plan.warmup, plan.repeats)  # noqa: B023
                        row = {
                            "backbone": backbone,
                            "model": method,
                            "precision": precision,
                            "batch": batch,
                            "input": [height, width],
                            "infer_ms": infer,
                            "network_ms": network,
                            "images_per_s": 1e3 * batch / infer,
                            "detections_per_image": float(outputs["num_dets"].mean()),
                        }
                        published = PUBLISHED[method]
                        if backbone == published["backbone"] and batch == 1:
                            row["published"] = published
                            row["published_ms_over_ours"] = published["ms"] / infer
                        part.add(row)
                del model
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()


# ---------------------------------------------------------------- training
def training_batches(cfg: Any, plan: Plan, work: Path, count: int = 2) -> list[Any]:
    """``count`` batches of HeLa tiles at the recipe's training resize (or the dry run's size)."""
    from training.data import CocoInstanceDataset, collate

    annotations, images = nucleus_val(work, plan)
    min_sizes = [plan.train_min_size] if plan.train_min_size else list(cfg.data.min_size_train)
    max_size = plan.train_min_size or cfg.data.max_size_train
    with contextlib.redirect_stdout(sys.stderr):
        dataset = CocoInstanceDataset(str(annotations), str(images), min_sizes, max_size, 0.5, train=True, seed=0)
    pad = tuple(round(m) for m in cfg.model.pixel_mean)
    with_instances = [i for i in range(len(dataset)) if len(dataset[i].targets.boxes)]
    picks = [with_instances[i % len(with_instances)] for i in range(count * plan.train_batch)]
    return [
        collate(
            [dataset[i] for i in picks[b * plan.train_batch : (b + 1) * plan.train_batch]],
            cfg.data.size_divisibility,
            pad_value=pad,
        )
        for b in range(count)
    ]


def maskrcnn_peer(backbone: str, cfg: Any) -> Any:
    """torchvision's Mask R-CNN on the recipe's backbone family, on our pixels (no resize of its own)."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    from bench.accuracy import SizedInputTransform, build_maskrcnn

    if backbone == "mnv2":
        return build_maskrcnn(cfg, cfg.model.head.channels, imagenet=False)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=cfg.model.num_classes + 1)
    model.transform = SizedInputTransform.from_config(cfg)
    return model


def run_training(part: Part, plan: Plan, work: Path) -> None:
    from bench.accuracy import to_torchvision
    from model.config import load_config
    from model.detector import OneStageDetector
    from training.solver import build_optimizer
    from training.train import _to_device

    target = device()
    amp = target.type == "cuda"
    for backbone, template in BACKBONES.items():
        with part.attempt(f"{backbone} training race", needs_s=10) as go:
            if not go:
                continue
            overrides = [*NO_IMAGENET, "model.num_classes=1", "model.meinst.codec_path=null", "data.num_workers=0"]
            configs = {m: load_config(REPO / template.format(method=m), overrides) for m in ("meinst", "embedmask")}
            models: dict[str, Any] = {"maskrcnn": maskrcnn_peer(backbone, configs["meinst"])}
            for method, cfg in configs.items():
                torch.manual_seed(0)
                models[method] = OneStageDetector(cfg.model)
                if method == "meinst":
                    models[method].mask_method.codec.load_npz(str(CODEC))
            batches = training_batches(configs["meinst"], plan, work)

            def ours(model: Any, batch: Any) -> dict[str, torch.Tensor]:
                return model(batch.images.to(target), _to_device(batch.targets, target))

            def peer(model: Any, batch: Any) -> dict[str, torch.Tensor]:
                images, targets = to_torchvision(batch)
                return model([i.to(target) for i in images], [{k: v.to(target) for k, v in t.items()} for t in targets])

            steppers = {}
            for name, model in models.items():
                model.to(target).train()
                steppers[name] = (
                    model,
                    build_optimizer(model, configs["meinst"].solver),
                    torch.amp.GradScaler("cuda", enabled=amp),
                    peer if name == "maskrcnn" else ours,
                )
            times: dict[str, list[float]] = {name: [] for name in steppers}
            names = list(steppers)
            warmup = 2 if not plan.dry_run else 1
            for round_index in range(warmup + plan.train_rounds):
                if part.left() < 5:
                    part.skip(f"{backbone} rounds after {round_index}", "out of time")
                    break
                batch = batches[round_index % len(batches)]
                for name in names[round_index % 3 :] + names[: round_index % 3]:
                    model, optimizer, scaler, forward = steppers[name]
                    sync()
                    started = time.perf_counter()
                    with torch.autocast(target.type, dtype=torch.float16, enabled=amp):
                        losses = forward(model, batch)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(sum(losses.values())).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    sync()
                    if round_index >= warmup:
                        times[name].append(time.perf_counter() - started)
            shape = list(batches[0].images.shape)
            peer_s = statistics.median(times["maskrcnn"]) / plan.train_batch if times["maskrcnn"] else None
            for name, seconds in times.items():
                if not seconds:
                    continue
                per_image = statistics.median(seconds) / plan.train_batch
                part.add(
                    {
                        "backbone": backbone,
                        "model": name,
                        "amp": amp,
                        "batch": plan.train_batch,
                        "input": shape[2:],
                        "steps": len(seconds),
                        "seconds_per_image": per_image,
                        "images_per_s": 1 / per_image,
                        "speed_vs_maskrcnn": peer_s / per_image if peer_s else None,
                    }
                )
            del models, steppers
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


# ---------------------------------------------------------------- serve
def run_serve(part: Part, plan: Plan, work: Path) -> None:
    from bench import serve
    from service.settings import bundled_models

    _, images = nucleus_val(work, plan)
    image = min(images.glob("*.png"))
    data = image.read_bytes()
    specs = bundled_models()
    if plan.serve_buckets:
        specs = [spec.model_copy(update={"buckets": plan.serve_buckets}) for spec in specs]
    (work / "serve").mkdir(parents=True, exist_ok=True)
    for max_batch_size in (8, 1):
        with part.attempt(f"service batch<={max_batch_size}", needs_s=20) as go:
            if not go:
                continue
            args = argparse.Namespace(
                work=work / "serve",
                cache_dir=work / "cache",
                max_delay_ms=0.0,
                concurrency=list(plan.serve_concurrency),
                requests=plan.serve_requests,
                service_args="--runtime.engine torch",
                max_batch_size=max_batch_size,
                scale="1",  # the model's own, as bench.serve's default
            )
            for row in serve.serve_runs(args, specs, data, max_batch_size):
                part.add({**row, "runtime": "torch", "batching": max_batch_size > 1, "image": image.name})
    rows = part.record["rows"]
    for model in {row["model"] for row in rows}:
        for concurrency in plan.serve_concurrency:
            on = [r for r in rows if r["model"] == model and r["concurrency"] == concurrency and r["batching"]]
            off = [r for r in rows if r["model"] == model and r["concurrency"] == concurrency and not r["batching"]]
            if on and off:
                part.record.setdefault("batching_on_vs_off", {})[f"{model}_c{concurrency}"] = (
                    on[0]["throughput_rps"] / off[0]["throughput_rps"]
                )
    part.save()


# ---------------------------------------------------------------- graphs
def run_graphs(part: Part, plan: Plan, work: Path) -> None:
    """Eager and CUDA graphs on both backbones first (captures are cheap), then the compiled variants."""
    from model.runtime import TorchRuntime

    target = device()
    cuda = target.type == "cuda"
    if not cuda:
        part.skip("CUDA graphs", "no CUDA device")
        part.skip(
            "torch.compile",
            "dry run: inductor's CPU build takes minutes on a small CPU (the suite's CUDA tests cover it on a GPU)",
        )
    height, width = plan.latency_size
    images = np.random.default_rng(0).integers(0, 256, (1, 3, height, width), dtype=np.uint8)
    precision = "fp16" if cuda else "fp32"
    models = {backbone: latency_detector(backbone, "embedmask", plan)[0] for backbone in BACKBONES}
    variants = [("eager", {}), ("cuda_graphs", {"cuda_graphs": True})] if cuda else [("eager", {})]
    rounds = [variants] + (
        [[("compile", {"compile": True}), ("compile+cuda_graphs", {"compile": True, "cuda_graphs": True})]]
        if cuda
        else []
    )
    eager_ms: dict[str, float] = {}
    for round_variants in rounds:
        for backbone, model in models.items():
            for name, options in round_variants:
                with part.attempt(f"{backbone} {name}", needs_s=30 if "compile" in name else 5) as go:
                    if not go:
                        continue
                    torch._dynamo.reset()
                    runtime = TorchRuntime(
                        copy.deepcopy(model), target, precision=precision, channels_last=cuda, **options
                    )  # type: ignore[arg-type]
                    started = time.perf_counter()
                    runtime.infer(images)  # compiles and/or captures
                    first_s = time.perf_counter() - started
                    infer = median_ms(lambda: runtime.infer(images), plan.warmup, plan.repeats)  # noqa: B023 (called here)
                    if name == "eager":
                        eager_ms[backbone] = infer
                    part.add(
                        {
                            "backbone": backbone,
                            "model": "embedmask",
                            "variant": name,
                            "precision": precision,
                            "batch": 1,
                            "input": [height, width],
                            "first_call_s": first_s,
                            "infer_ms": infer,
                            "speedup_vs_eager": eager_ms[backbone] / infer if backbone in eager_ms else None,
                        }
                    )


RUNNERS: dict[str, Callable[[Part, Plan, Path], None]] = {
    "tests": run_tests,
    "parity": run_parity,
    "latency": run_latency,
    "training": run_training,
    "serve": run_serve,
    "graphs": run_graphs,
}


def run_part(name: str, out: Path, work: Path, plan: Plan, budget: float) -> None:
    part = Part(name, out, budget, plan)
    if plan.dry_run and name in ("parity", "latency"):
        part.skip("fp16 and bf16", "dry run: CPU autocast convolutions take minutes (the suite covers bf16 there)")
    if plan.dry_run and name == "tests":
        part.skip("CUDA tests", "no CUDA device: they skip here; the run below only proves the harness")
    RUNNERS[name](part, plan, work)
    part.record["status"] = "done"
    part.save()


def part_environment(plan: Plan) -> dict[str, str]:
    """The dry run's parts (and their pytest and service children) use one thread each: on a small shared CPU,
    OpenMP threads spinning for a core they cannot get made it ten times slower."""
    return {**os.environ, **({"OMP_NUM_THREADS": "1"} if plan.dry_run else {})}


def orchestrate(out: Path, plan: Plan, parts: list[str], work: Path) -> dict[str, Any]:
    budgets = DRY_BUDGETS if plan.dry_run else BUDGETS
    summary: dict[str, Any] = {
        "dry_run": plan.dry_run,
        "machine": machine(),
        "plan": {k: v for k, v in asdict(plan).items() if not callable(v)},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "parts": {},
    }
    if plan.dry_run:
        summary["not_measured"] = "dry run on the CPU: tiny sizes and counts; no figure here is a GPU measurement"
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    for name in parts:
        started = time.perf_counter()
        command = [
            sys.executable,
            "-m",
            "bench.gpu_check",
            str(out),
            "--part",
            name,
            "--work",
            str(work),
            "--budget",
            str(budgets[name]),
            *(["--dry-run"] if plan.dry_run else []),
        ]
        print(f"== {name} (budget {budgets[name]} s)", flush=True)
        # A session of its own, so that a part killed at its cap takes its children (service processes) along;
        # so does a SIGTERM to this process (the shell script's backstop timeout).
        process = subprocess.Popen(command, cwd=REPO, start_new_session=True, env=part_environment(plan))
        signal.signal(signal.SIGTERM, lambda *_: (os.killpg(process.pid, signal.SIGKILL), sys.exit(143)))  # noqa: B023
        try:
            code = process.wait(timeout=budgets[name] + KILL_GRACE_S)
            status = "done" if code == 0 else f"exit code {code}"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = "killed at its time cap (its JSON holds what it measured)"
        record = json.loads((out / f"{name}.json").read_text()) if (out / f"{name}.json").is_file() else {}
        if status == "done" and record.get("status") != "done":
            status = "ended without finishing its record"
        summary["parts"][name] = {
            "status": status,
            "seconds": round(time.perf_counter() - started, 1),
            "rows": len(record.get("rows", [])),
            "skipped": record.get("skipped", []),
            "errors": record.get("errors", []),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    summary["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for the JSON results (created)")
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny sizes on the CPU (also chosen when torch sees no CUDA device)"
    )
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # one part, in this process
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    plan = Plan.make(args.dry_run or not torch.cuda.is_available())
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part:
        run_part(args.part, args.out, args.work, plan, args.budget)
        return
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        summary = orchestrate(args.out, plan, args.parts, Path(work))
    for name, record in summary["parts"].items():
        counts = f"rows {record['rows']:3d}  skipped {len(record['skipped'])}  errors {len(record['errors'])}"
        print(f"{name:9s} {record['status']:12s} {record['seconds']:6.1f} s  {counts}")


if __name__ == "__main__":
    main()
