"""A fair peer: torchvision's Mask R-CNN on our backbone, data, schedule and input sizes, beside our runs.

    python -m bench.accuracy [--config CONFIG] [key=value ...] [--iterations N] [--output-dir DIR]
        [--resume | --skip-train] [--ours models/meinst_nucleus models/embedmask_nucleus] [--race-rounds 8]
        [--output JSON]

The peer is ``torchvision.models.detection.MaskRCNN`` with torchvision's default RPN, box and mask heads
(two classes: background + nucleus), its mask head narrowed to our head width (``head.channels``, 64 in
the CPU recipe, as our recipe narrows our heads; ``--mask-head-channels 256`` gives torchvision's), on:

- the same backbone as ours: torchvision's MobileNetV2 features with FrozenBatchNorm, the ImageNet weights
  read by ``model.backbone.load_imagenet_state`` from the config's file (sha256-checked, no download), the
  same early blocks frozen (``backbone.freeze_at``), and an FPN of our width (``fpn.out_channels``). As
  Mask R-CNN is designed, the FPN takes C2-C5 (strides 4-32) and adds a max-pooled P6;
- the same data: ``CocoInstanceDataset`` with its resize (shorter side drawn from ``data.min_size_train``,
  longer side capped) and flip, ``TrainingSampler`` with the config's seed, ``collate``; the padded batch
  is cut back to each image's size and Mask R-CNN's own resize is disabled, so it trains and tests on
  exactly our pixels, normalised with our pixel mean/std;
- the same solver: ``training.solver`` SGD and warmup/step schedule from the config, the same batch.

The default config and overrides are those of our nucleus runs (configs/meinst_MNV2_nucleus.yaml
solver.max_iter=400 solver.steps=[300,370] solver.warmup_iters=50); ``--iterations`` stops earlier on
that schedule (a smoke test). ``<output-dir>/model.pt`` is written atomically every 50 iterations and at
the end; ``--resume`` continues a killed run from it, ``--skip-train`` evaluates it as it is. The logged
seconds per iteration (``logged_seconds_per_iter`` in the JSON) cover data loading, forward, backward and
the step, as our training logs' do: the peer's median over iterations after the first, ours the median of
the logged 20-iteration windows after the first iteration. Validation runs at ``data.min_size_test``;
Mask R-CNN's masks are pasted in the original image frame by torchvision and thresholded at 0.5, then
COCO-RLE encoded and scored with COCOeval (``training.evaluate.coco_metrics``, the function our runs use).

Our runs' numbers come from their ``metrics.jsonl`` (the evaluation at their last iteration). Their logged
speeds were taken under different load (our two runs shared the cores; the peer ran beside other work), so
the table's speed is a race instead (``--race-rounds``, default 8; data loading is outside it): Mask R-CNN,
MEInst and EmbedMask, each built from its config with its optimizer, take training steps (forward,
backward, SGD step) on the same in-memory batches of our loader, interleaved step by step in one process
and in rotating order, so that load on a shared machine hits all three alike; the first round is a
warm-up. The table is printed and saved, with machine info, to ``bench/results/accuracy.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from pycocotools import mask as mask_util
from torchvision.models import mobilenet_v2
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d

from model.backbone import load_imagenet_state
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import Config, load_config
from model.detector import OneStageDetector
from training.data import Batch, CocoInstanceDataset, TrainingSampler, collate
from training.evaluate import EvalSpec, coco_metrics, eval_dataset
from training.solver import build_optimizer, build_scheduler
from training.train import iteration_seed

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/meinst_MNV2_nucleus.yaml"
DEFAULT_OVERRIDES = ["solver.max_iter=400", "solver.steps=[300,370]", "solver.warmup_iters=50"]
DEFAULT_OURS = ["models/meinst_nucleus", "models/embedmask_nucleus"]  # the bundled runs (their training logs)
# Our two recipes for the speed race; MEInst takes the bundled codec (the codec does not change the speed).
RACE_CONFIGS = {"meinst_nucleus": DEFAULT_CONFIG, "embedmask_nucleus": "configs/embedmask_MNV2_nucleus.yaml"}
RACE_CODEC = "models/meinst_nucleus/codec.npz"
PEER = "maskrcnn_mnv2_fpn"
MASK_THRESHOLD = 0.5
LOG_PERIOD = 10
CHECKPOINT_PERIOD = 50
# MobileNetV2 feature blocks ending at strides 4, 8, 16, 32 (channels 24, 32, 96, 320); block 18 (1280-channel
# classifier conv) is dropped, as in model/backbone.py.
RETURN_LAYERS = {"3": "0", "6": "1", "13": "2", "17": "3"}
IN_CHANNELS = [24, 32, 96, 320]
# freeze_at as in model/backbone.py: number of leading feature blocks frozen.
FROZEN_BLOCKS = (0, 1, 4, 7)


class SizedInputTransform(GeneralizedRCNNTransform):
    """Normalise and batch only: the images already come resized by our data pipeline."""

    def resize(self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None):  # type: ignore[override]
        return image, target


def build_maskrcnn(cfg: Config, mask_head_channels: int, imagenet: bool = True) -> MaskRCNN:
    """Mask R-CNN on our MobileNetV2 (ImageNet weights, frozen BN, frozen early blocks) with a C2-C5 FPN,
    its four-conv mask head ``mask_head_channels`` wide (torchvision's default is 256). ``imagenet=False``
    keeps the random initialisation (speed measurements on hosts without the weights package)."""
    features = mobilenet_v2(norm_layer=FrozenBatchNorm2d).features
    if imagenet:
        state = load_imagenet_state(cfg.model.backbone)
        if state is None:
            raise ValueError("the peer needs the config's ImageNet backbone weights (model.backbone.weights)")
        features.load_state_dict({k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")})
    for block in features[: FROZEN_BLOCKS[min(cfg.model.backbone.freeze_at, 3)]]:
        block.requires_grad_(False)
    backbone = BackboneWithFPN(features[:18], RETURN_LAYERS, IN_CHANNELS, cfg.model.fpn.out_channels)
    num_classes = cfg.model.num_classes + 1
    # torchvision's default box head (TwoMLPHead, 1024 wide); the predictors are given, so num_classes is not.
    model = MaskRCNN(
        backbone,
        box_predictor=FastRCNNPredictor(1024, num_classes),
        box_detections_per_img=cfg.model.head.max_detections,
        mask_head=MaskRCNNHeads(backbone.out_channels, [mask_head_channels] * 4, dilation=1),
        mask_predictor=MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes),
    )
    model.transform = SizedInputTransform(
        min_size=cfg.data.min_size_test,
        max_size=cfg.data.max_size_test,
        image_mean=cfg.model.pixel_mean,
        image_std=cfg.model.pixel_std,
        size_divisible=cfg.data.size_divisibility,
    )
    return model


def to_torchvision(batch: Batch) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Our padded batch as torchvision wants it: unpadded float images (0-255) and 1-based labels."""
    images, targets = [], []
    for image, target, (h, w) in zip(batch.images, batch.targets, batch.input_sizes):
        images.append(image[:, :h, :w].float())
        targets.append({"boxes": target.boxes, "labels": target.labels + 1, "masks": target.masks})
    return images, targets


def train_maskrcnn(model: MaskRCNN, cfg: Config, iterations: int, checkpoint_path: Path, resume: bool) -> list[float]:
    """Train on our sampler and schedule; returns the seconds of each iteration.

    Every ``CHECKPOINT_PERIOD`` iterations and at the end the weights, optimizer, schedule and timings go
    atomically to ``checkpoint_path``; with ``resume`` a run continues from there on the same data stream
    and per-iteration seeds, so a killed run still ends as an uninterrupted one would.
    """
    solver = cfg.solver
    optimizer = build_optimizer(model, solver)
    scheduler = build_scheduler(optimizer, solver)
    start_iter, seconds = 0, []
    if resume and checkpoint_path.exists():
        checkpoint = load_checkpoint(checkpoint_path)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        start_iter, seconds = checkpoint["iteration"], list(checkpoint["seconds_per_iter"])
        print(f"resumed from {checkpoint_path} at iteration {start_iter}", file=sys.stderr, flush=True)
    model.train()
    batches = iter(train_loader(cfg, start_iter))
    for iteration in range(start_iter, iterations):
        start = time.perf_counter()
        torch.manual_seed(iteration_seed(cfg.seed, iteration, 0))
        images, targets = to_torchvision(next(batches))
        losses = model(images, targets)
        total = sum(losses.values())
        if not torch.isfinite(total):
            raise FloatingPointError(f"loss is {total.item()} at iteration {iteration + 1}")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        scheduler.step()
        seconds.append(time.perf_counter() - start)
        done = iteration + 1
        if done % LOG_PERIOD == 0 or done in (start_iter + 1, iterations):
            recent = statistics.median(seconds[-LOG_PERIOD:])
            parts = " ".join(f"{k.removeprefix('loss_')}={v.item():.3f}" for k, v in losses.items())
            print(
                f"iter {done}/{iterations} loss={total.item():.3f} {parts} lr={optimizer.param_groups[0]['lr']:.2e} "
                f"s/iter={recent:.2f} eta={recent * (iterations - done) / 60:.1f}min",
                file=sys.stderr,
                flush=True,
            )
        if done % CHECKPOINT_PERIOD == 0 or done == iterations:
            save_checkpoint(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "iteration": done,
                    "seconds_per_iter": seconds,
                    "config": cfg.model_dump(mode="json"),
                },
                checkpoint_path,
            )
    return seconds


def train_loader(cfg: Config, start_iter: int = 0) -> torch.utils.data.DataLoader:
    """Our training data stream (dataset, sampler, collate) from the config, from ``start_iter`` on."""
    with contextlib.redirect_stdout(sys.stderr):
        dataset = CocoInstanceDataset(
            cfg.data.train_annotations,
            cfg.data.train_images,
            cfg.data.min_size_train,
            cfg.data.max_size_train,
            cfg.data.hflip_prob,
            train=True,
            seed=cfg.seed,
        )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.solver.ims_per_batch,
        sampler=TrainingSampler(len(dataset), cfg.seed, start=start_iter * cfg.solver.ims_per_batch),
        collate_fn=partial(
            collate,
            size_divisibility=cfg.data.size_divisibility,
            pad_value=tuple(round(m) for m in cfg.model.pixel_mean),
        ),
        num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0,
    )


def speed_race(cfg: Config, mask_head_channels: int, rounds: int, overrides: list[str]) -> dict[str, list[float]]:
    """Seconds per training step of the peer and of our two recipes on the same batches, interleaved in one
    process (see the module docstring). Returns each model's step times after the warm-up round."""
    steppers: dict[str, Any] = {}
    torch.manual_seed(cfg.seed)
    peer = build_maskrcnn(cfg, mask_head_channels).train()
    steppers[PEER] = (peer, build_optimizer(peer, cfg.solver), lambda model, batch: model(*to_torchvision(batch)))
    for name, path in RACE_CONFIGS.items():
        ours_cfg = load_config(REPO / path, overrides)
        torch.manual_seed(ours_cfg.seed)
        model = OneStageDetector(ours_cfg.model)
        if ours_cfg.model.method == "meinst":
            model.mask_method.codec.load_npz(str(REPO / RACE_CODEC))
        steppers[name] = (
            model.train(),
            build_optimizer(model, ours_cfg.solver),
            lambda model, batch: model(batch.images, batch.targets),
        )
    batches = iter(train_loader(cfg))
    times: dict[str, list[float]] = {name: [] for name in steppers}
    names = list(steppers)
    for round_index in range(rounds + 1):
        batch = next(batches)
        for name in names[round_index % len(names) :] + names[: round_index % len(names)]:
            model, optimizer, forward = steppers[name]
            torch.manual_seed(iteration_seed(cfg.seed, round_index, 0))
            start = time.perf_counter()
            losses = forward(model, batch)
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizer.step()
            if round_index > 0:
                times[name].append(time.perf_counter() - start)
        shown = " ".join(f"{n}={times[n][-1]:.2f}s" for n in names) if round_index > 0 else "warm-up"
        print(f"race round {round_index}/{rounds}: {shown}", file=sys.stderr, flush=True)
    return times


@torch.no_grad()
def predict_maskrcnn(model: MaskRCNN, dataset: CocoInstanceDataset) -> list[dict[str, Any]]:
    """COCO result records in original pixels: GeneralizedRCNN.forward with the original frame as target size."""
    model.eval()
    results = []
    for index in range(len(dataset)):
        sample = dataset[index]
        images: ImageList
        images, _ = model.transform([sample.image.float()])
        features = model.backbone(images.tensors)
        proposals, _ = model.rpn(images, features)
        detections, _ = model.roi_heads(features, proposals, images.image_sizes)
        (detection,) = model.transform.postprocess(detections, images.image_sizes, [sample.original_size])
        binary = (detection["masks"][:, 0] > MASK_THRESHOLD).numpy().astype(np.uint8)
        for box, score, label, mask in zip(
            detection["boxes"].tolist(), detection["scores"].tolist(), detection["labels"].tolist(), binary
        ):
            rle = mask_util.encode(np.asfortranarray(mask))
            rle["counts"] = rle["counts"].decode("ascii")
            x0, y0, x1, y1 = box
            results.append(
                {
                    "image_id": sample.image_id,
                    "category_id": dataset.category_ids[label - 1],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": score,
                    "segmentation": rle,
                }
            )
    return results


def ours_row(run_dir: Path) -> dict[str, Any]:
    """Our run's last evaluation and its median logged seconds per iteration (first-iteration record left out),
    from a run directory's ``metrics.jsonl`` or a bundled model's copy of it, ``train_log.jsonl``."""
    log_path = run_dir / "metrics.jsonl" if (run_dir / "metrics.jsonl").exists() else run_dir / "train_log.jsonl"
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    timings = [r for r in records if "seconds_per_iter" in r]
    evals = [r for r in records if "eval" in r]
    if not timings or not evals:
        raise ValueError(f"{log_path} has no timing or no evaluation record yet")
    last_eval = max(evals, key=lambda r: r["iteration"])
    steady = [r["seconds_per_iter"] for r in timings if r["iteration"] > 1] or [timings[0]["seconds_per_iter"]]
    iterations = max(r["iteration"] for r in timings)
    seconds = statistics.median(steady)
    batch = timings[0]["images_per_s"] * timings[0]["seconds_per_iter"]
    return metrics_row(run_dir.name, last_eval["eval"], seconds, round(batch), iterations, last_eval["iteration"])


def metrics_row(
    method: str, metrics: dict[str, Any], seconds: float, batch: int, iterations: int, eval_iteration: int
) -> dict[str, Any]:
    return {
        "method": method,
        "bbox_AP": metrics["bbox"]["AP"],
        "segm_AP": metrics["segm"]["AP"],
        "segm_AP50": metrics["segm"]["AP50"],
        "bbox_AP50": metrics["bbox"]["AP50"],
        "seconds_per_iter": seconds,
        "images_per_s": batch / seconds,
        "iterations": iterations,
        "images_seen": iterations * batch,
        "eval_iteration": eval_iteration,
        "metrics": metrics,
    }


def machine() -> dict[str, Any]:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    return {
        "cpu": next(
            (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor()
        ),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "platform": platform.platform(),
        "load_average": list(os.getloadavg()),
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    """A markdown table (as BENCHMARKS.md shows it); speed relative to the peer's seconds per iteration."""
    peer = next((r["seconds_per_iter"] for r in rows if r["method"] == PEER), None)
    print("| method | bbox AP | segm AP | segm AP50 | s/iter | images/s | speed vs Mask R-CNN | images seen |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{peer / r['seconds_per_iter']:.2f}x" if peer else "-"
        print(
            f"| {r['method']} | {r['bbox_AP']:.1f} | {r['segm_AP']:.1f} | {r['segm_AP50']:.1f} | "
            f"{r['seconds_per_iter']:.2f} | {r['images_per_s']:.2f} | {ratio} | {r['images_seen']} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="our run's config (data, solver, backbone)")
    parser.add_argument(
        "overrides",
        nargs="*",
        default=DEFAULT_OVERRIDES,
        help=f"config overrides (default: {' '.join(DEFAULT_OVERRIDES)})",
    )
    parser.add_argument("--iterations", type=int, default=None, help="iterations to train (default: solver.max_iter)")
    parser.add_argument(
        "--output-dir", default="runs/maskrcnn_nucleus", help="where the peer's checkpoint and results go"
    )
    parser.add_argument("--skip-train", action="store_true", help="evaluate <output-dir>/model.pt instead of training")
    parser.add_argument("--resume", action="store_true", help="continue training from <output-dir>/model.pt")
    parser.add_argument(
        "--mask-head-channels",
        type=int,
        default=None,
        help=(
            "width of the mask head's convs (default: our head.channels, as our CPU recipe narrows its heads; "
            "256 = torchvision's)"
        ),
    )
    parser.add_argument(
        "--ours", nargs="*", default=DEFAULT_OURS, help="our run directories (metrics.jsonl or train_log.jsonl)"
    )
    parser.add_argument(
        "--race-rounds",
        type=int,
        default=8,
        help="timed rounds of the interleaved speed race (0: report logged speeds)",
    )
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "accuracy.json"))
    args = parser.parse_args(argv)

    cfg = load_config(REPO / args.config if not Path(args.config).is_absolute() else args.config, args.overrides)
    iterations = args.iterations or cfg.solver.max_iter
    output_dir = Path(args.output_dir)
    checkpoint_path = output_dir / "model.pt"
    info = machine()

    torch.manual_seed(cfg.seed)
    mask_head_channels = args.mask_head_channels or cfg.model.head.channels
    model = build_maskrcnn(cfg, mask_head_channels)
    if args.skip_train:
        checkpoint = load_checkpoint(checkpoint_path)
        model.load_state_dict(checkpoint["model"])
        seconds, iterations = checkpoint["seconds_per_iter"], checkpoint["iteration"]
    else:
        seconds = train_maskrcnn(model, cfg, iterations, checkpoint_path, args.resume)

    val_set = eval_dataset(cfg.data.val_annotations, cfg.data.val_images, EvalSpec.from_config(cfg, []))
    results = predict_maskrcnn(model, val_set)
    (output_dir / "val_results.json").write_text(json.dumps(results))
    metrics = {iou_type: coco_metrics(val_set, results, iou_type) for iou_type in ("bbox", "segm")}
    steady = seconds[1:] or seconds
    rows = [metrics_row(PEER, metrics, statistics.median(steady), cfg.solver.ims_per_batch, iterations, iterations)]

    missing = []
    for run in args.ours:
        try:
            rows.append(ours_row(Path(run)))
        except (OSError, ValueError) as error:
            missing.append(f"{run}: {error}")
            print(f"skipping {run}: {error}", file=sys.stderr)

    race = speed_race(cfg, mask_head_channels, args.race_rounds, args.overrides) if args.race_rounds > 0 else {}
    for row in rows:
        row["logged_seconds_per_iter"] = row["seconds_per_iter"]
        if row["method"] in race:
            row["seconds_per_iter"] = statistics.median(race[row["method"]])
            row["images_per_s"] = cfg.solver.ims_per_batch / row["seconds_per_iter"]
            row["race_seconds"] = race[row["method"]]

    info["load_average_at_end"] = list(os.getloadavg())
    report = {
        "machine": info,
        "config": args.config,
        "overrides": args.overrides,
        "peer": {
            "model": "torchvision MaskRCNN, MobileNetV2 (ImageNet, FrozenBN) + FPN C2-C5 + P6 max-pool",
            "fpn_channels": cfg.model.fpn.out_channels,
            "mask_head_channels": mask_head_channels,
            "iterations": iterations,
            "ims_per_batch": cfg.solver.ims_per_batch,
            "checkpoint": str(checkpoint_path),
        },
        "speed": "race (interleaved training steps in one process)" if race else "logged by each run",
        "rows": rows,
        "missing": missing,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print_table(rows)


if __name__ == "__main__":
    main()
