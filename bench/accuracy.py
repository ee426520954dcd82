"""A fair peer: torchvision's Mask R-CNN on our backbone, data, schedule and input contract, beside our models.

    python -m bench.accuracy [--config CONFIG] [key=value ...] [--iterations N] [--output-dir DIR]
        [--resume | --skip-train] [--ours CHECKPOINT ...] [--data data/nucleus] [--scales 1 1.25 1.5 ...]
        [--race-rounds 8] [--output JSON]

The peer is ``torchvision.models.detection.MaskRCNN`` with torchvision's default RPN, box and mask heads
(two classes: background + nucleus), its mask head narrowed to our head width (``head.channels``, 64 in
the CPU recipe, as our recipe narrows our heads; ``--mask-head-channels 256`` gives torchvision's), on:

- the same backbone as ours: torchvision's MobileNetV2 features with FrozenBatchNorm, the ImageNet weights
  read by ``model.backbone.load_imagenet_state`` from the config's file (sha256-checked, no download), the
  same early blocks frozen (``backbone.freeze_at``), and an FPN of our width (``fpn.out_channels``). As
  Mask R-CNN is designed, the FPN takes C2-C5 (strides 4-32) and adds a max-pooled P6;
- the same data: ``CocoInstanceDataset.from_config`` exactly as ``training.train`` builds it (the recipe's
  size rule and scale jitter, percentile intensity with its jitter, flips and quarter turns),
  ``TrainingSampler`` with the config's seed, ``collate``; the padded batch is cut back to each image's size
  and Mask R-CNN's own resize is disabled, so it trains and tests on exactly our pixels, normalised with our
  pixel mean/std;
- the same solver: ``training.solver`` SGD and warmup/step schedule from the config, the same batch.

The default config and overrides are those of our nucleus runs (configs/meinst_MNV2_nucleus.yaml
solver.max_iter=400 solver.steps=[300,370] solver.warmup_iters=50); ``--iterations`` stops earlier on
that schedule (a smoke test). ``<output-dir>/model.pt`` is written atomically every 50 iterations and at
the end; ``--resume`` continues a killed run from it, ``--skip-train`` evaluates it as it is.

Evaluation, the same for the peer and for each of our checkpoints (``--ours``): the test scale (input
pixels per image pixel; ``/segment?scale=`` takes it relative to the recipe's own) is chosen per model among
``--scales`` by segm AP on the whole raw val fields, and the model is then scored at that scale on the test
tiles and the whole raw test fields of ``--data`` (``python -m training.nucleus``). Ours run their fused
graph in onnxruntime by ``training.evaluate``'s path (fields larger than the largest shape bucket are
tiled); the peer runs every image whole, its masks pasted in the original frame by torchvision and
thresholded at 0.5. Both are COCO-RLE encoded and scored with ``training.evaluate.coco_metrics``.

Speed: the runs' logged seconds per iteration were taken under different load, so the table's speed is a
race (``--race-rounds``, default 8; data loading is outside it): Mask R-CNN, MEInst and EmbedMask, each built
from its config with its optimizer, take training steps (forward, backward, SGD step) on in-memory batches
of the data pipeline each was trained with (the peer's config is the one stored in its checkpoint; our two
recipes share one), interleaved step by step in one process and in rotating order, so that load on a
shared machine hits all three alike; the first round is a warm-up. Training wall-clock is that speed times
each run's iterations. The table is printed and saved, with machine info, to ``bench/results/accuracy.json``.
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
from collections.abc import Callable
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

from inference.predictor import Predictor, in_process_options
from model.backbone import load_imagenet_state
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import Config, load_config
from model.detector import OneStageDetector
from model.input_contract import InputContract
from training.data import Batch, CocoInstanceDataset, TrainingSampler, collate
from training.evaluate import coco_metrics, evaluate, load_coco
from training.solver import build_optimizer, build_scheduler
from training.train import iteration_seed

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/meinst_MNV2_nucleus.yaml"
DEFAULT_OVERRIDES = ["solver.max_iter=400", "solver.steps=[300,370]", "solver.warmup_iters=50"]
DEFAULT_OURS = ["models/meinst_nucleus/model.pt", "models/embedmask_nucleus/model.pt"]  # the bundled models
DEFAULT_DATA = "data/nucleus"
# Test scales (input pixels per image pixel) tried on the val fields; each model is tested at its best.
DEFAULT_SCALES = [1.0, 1.25, 1.5, 1.75, 2.0, 2.25]
TUNING_SPLIT = "val_fields"  # whole raw fields of the val band
TEST_SPLITS = ("test", "test_fields")  # test tiles and whole raw test fields
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

    @classmethod
    def from_config(cls, cfg: Config) -> SizedInputTransform:
        """Our pixel mean/std and padding divisibility (the sizes only matter to the disabled resize)."""
        return cls(
            min_size=cfg.data.min_size_test,
            max_size=cfg.data.max_size_test,
            image_mean=cfg.model.pixel_mean,
            image_std=cfg.model.pixel_std,
            size_divisible=cfg.data.size_divisibility,
        )


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
    model.transform = SizedInputTransform.from_config(cfg)
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
    """Our training data stream (dataset, sampler, collate) from the config, from ``start_iter`` on: the same
    ``CocoInstanceDataset.from_config`` and padding as ``training.train``, so the peer sees our pixels."""
    with contextlib.redirect_stdout(sys.stderr):
        dataset = CocoInstanceDataset.from_config(
            cfg.data, cfg.data.train_annotations, cfg.data.train_images, train=True, seed=cfg.seed
        )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.solver.ims_per_batch,
        sampler=TrainingSampler(len(dataset), cfg.seed, start=start_iter * cfg.solver.ims_per_batch),
        collate_fn=partial(
            collate,
            size_divisibility=cfg.data.size_divisibility,
            pad_value=tuple(InputContract.from_config(cfg).pad_value),
        ),
        num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0,
    )


def speed_race(cfg: Config, mask_head_channels: int, rounds: int, overrides: list[str]) -> dict[str, list[float]]:
    """Seconds per training step of the peer (on batches of its config ``cfg``) and of our two recipes (on
    batches of theirs, the same for both), interleaved in one process (see the module docstring). Returns each
    model's step times after the warm-up round."""
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
    # MEInst's and EmbedMask's recipes share their data section, so one of their loaders feeds both.
    peer_batches, our_batches = iter(train_loader(cfg)), iter(train_loader(ours_cfg))
    times: dict[str, list[float]] = {name: [] for name in steppers}
    names = list(steppers)
    for round_index in range(rounds + 1):
        batches = {PEER: next(peer_batches), "ours": next(our_batches)}
        for name in names[round_index % len(names) :] + names[: round_index % len(names)]:
            model, optimizer, forward = steppers[name]
            torch.manual_seed(iteration_seed(cfg.seed, round_index, 0))
            start = time.perf_counter()
            losses = forward(model, batches[PEER if name == PEER else "ours"])
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
    """COCO result records in original pixels: GeneralizedRCNN.forward with the original frame as target size.
    Every image runs whole (a 160x1100 field at scale 2 is still small for it): the peer's best case."""
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


Metrics = dict[str, dict[str, float | None]]
# (split name, input pixels per image pixel) -> bbox/segm metrics
Evaluator = Callable[[str, float], Metrics]


def peer_dataset(cfg: Config, annotations: str, images: str, scale: float) -> CocoInstanceDataset:
    """A split at the recipe's test size times ``scale``, decoded by its intensity rule: the peer's input."""
    contract = InputContract.from_config(cfg)
    with contextlib.redirect_stdout(sys.stderr):
        return CocoInstanceDataset(
            annotations,
            images,
            [contract.min_size * scale],
            contract.max_size * scale,
            0.0,
            train=False,
            resize=contract.resize,
            scales=(contract.scale * scale,) * 2,
            intensity=contract.intensity,
            percentiles=contract.percentiles,
        )


def peer_evaluator(model: MaskRCNN, cfg: Config, data_dir: Path) -> Evaluator:
    """The peer on a split of ``data_dir`` at a pixel scale, sized and normalised by the recipe's input contract."""

    def run(split: str, pixel_scale: float) -> Metrics:
        scale = pixel_scale / cfg.data.scale_test
        dataset = peer_dataset(cfg, str(data_dir / f"{split}.json"), str(data_dir / split), scale)
        results = predict_maskrcnn(model, dataset)
        return {iou_type: coco_metrics(dataset.coco, results, iou_type) for iou_type in ("bbox", "segm")}

    return run


def ours_evaluator(checkpoint: str, data_dir: Path, cache_dir: Path | None) -> Evaluator:
    """Our checkpoint's fused graph in onnxruntime on a split at a pixel scale, through ``inference.Predictor``
    (what the service answers: images larger than the largest shape bucket are tiled); a checkpoint is exported
    into ``cache_dir`` (None: the service's)."""
    predictor = Predictor.open(checkpoint, in_process_options(engine="onnxruntime"), cache_dir=cache_dir)

    def run(split: str, pixel_scale: float) -> Metrics:
        scale = pixel_scale / predictor.metadata.input.scale
        return evaluate(predictor, load_coco(data_dir / f"{split}.json"), data_dir / split, scale=scale)

    return run


def tuned_row(method: str, run: Evaluator, scales: list[float]) -> dict[str, Any]:
    """The model's metrics on the test splits at the pixel scale that gives the best segm AP on the val fields."""
    tuning = {}
    for scale in scales:
        tuning[scale] = run(TUNING_SPLIT, scale)
        print(
            f"{method} {TUNING_SPLIT} scale {scale}: segm AP {tuning[scale]['segm']['AP']:.1f} "
            f"bbox AP {tuning[scale]['bbox']['AP']:.1f}",
            file=sys.stderr,
            flush=True,
        )
    best = max(scales, key=lambda scale: tuning[scale]["segm"]["AP"] or 0.0)
    row: dict[str, Any] = {
        "method": method,
        "scale": best,
        "tuning": {str(scale): metrics for scale, metrics in tuning.items()},
    }
    for split in TEST_SPLITS:
        row[split] = run(split, best)
        print(f"{method} {split} scale {best}: segm AP {row[split]['segm']['AP']:.1f}", file=sys.stderr, flush=True)
    return row


def logged_seconds_per_iter(checkpoint: Path) -> float | None:
    """Median logged seconds per iteration (first record left out) of a run directory's ``metrics.jsonl`` or a
    bundled model's copy of it, ``train_log.jsonl``, next to the checkpoint; None when there is none."""
    for name in ("metrics.jsonl", "train_log.jsonl"):
        path = checkpoint.parent / name
        if path.exists():
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            steady = [r["seconds_per_iter"] for r in records if "seconds_per_iter" in r and r["iteration"] > 1]
            return statistics.median(steady) if steady else None
    return None


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
    print(
        "| method | test scale (val) | test tiles segm / bbox AP | test fields segm / bbox AP | images seen "
        "| s/iter (race) | training wall-clock at race speed | speed vs Mask R-CNN |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        tiles, fields = r["test"], r["test_fields"]
        ratio = f"{peer / r['seconds_per_iter']:.2f}x" if peer and r["seconds_per_iter"] else "-"
        speed = f"{r['seconds_per_iter']:.2f}" if r["seconds_per_iter"] else "-"
        wall = f"{r['seconds_per_iter'] * r['iterations'] / 60:.1f} min" if r["seconds_per_iter"] else "-"
        print(
            f"| {r['method']} | {r['scale']} | {tiles['segm']['AP']:.1f} / {tiles['bbox']['AP']:.1f} "
            f"| {fields['segm']['AP']:.1f} / {fields['bbox']['AP']:.1f} | {r['images_seen']} | {speed} | {wall} "
            f"| {ratio} |"
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
    parser.add_argument("--ours", nargs="*", default=DEFAULT_OURS, help="our checkpoints to evaluate beside it")
    parser.add_argument("--data", default=DEFAULT_DATA, help="the nucleus builder's output (val_fields, test, ...)")
    parser.add_argument(
        "--scales",
        type=float,
        nargs="+",
        default=DEFAULT_SCALES,
        help="test scales (input pixels per image pixel) tried on the val fields; each model is tested at its best",
    )
    parser.add_argument(
        "--race-rounds",
        type=int,
        default=8,
        help="timed rounds of the interleaved speed race (0: report logged speeds)",
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="where our checkpoints are exported (default: the service's)"
    )
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "accuracy.json"))
    args = parser.parse_args(argv)

    cfg = load_config(REPO / args.config if not Path(args.config).is_absolute() else args.config, args.overrides)
    iterations = args.iterations or cfg.solver.max_iter
    output_dir = Path(args.output_dir)
    checkpoint_path = output_dir / "model.pt"
    data_dir = Path(args.data)
    info = machine()

    torch.manual_seed(cfg.seed)
    mask_head_channels = args.mask_head_channels or cfg.model.head.channels
    model = build_maskrcnn(cfg, mask_head_channels)
    if args.skip_train:
        checkpoint = load_checkpoint(checkpoint_path)
        model.load_state_dict(checkpoint["model"])
        seconds, iterations = checkpoint["seconds_per_iter"], checkpoint["iteration"]
        cfg = Config.model_validate(checkpoint["config"])  # the data pipeline it was trained with
    else:
        seconds = train_maskrcnn(model, cfg, iterations, checkpoint_path, args.resume)

    peer_row = tuned_row(PEER, peer_evaluator(model, cfg, data_dir), args.scales)
    peer_seconds = statistics.median(seconds[1:] or seconds)
    peer_row |= {"iterations": iterations, "images_seen": iterations * cfg.solver.ims_per_batch}
    peer_row |= {"seconds_per_iter": peer_seconds, "logged_seconds_per_iter": peer_seconds}
    rows = [peer_row]
    for path in args.ours:
        checkpoint = load_checkpoint(path)
        row = tuned_row(Path(path).parent.name, ours_evaluator(path, data_dir, args.cache_dir), args.scales)
        logged = logged_seconds_per_iter(Path(path))
        # Checkpoints written outside training.train (random-weight ones) record no samples consumed.
        row |= {"iterations": checkpoint["iteration"], "images_seen": checkpoint.get("samples_consumed")}
        row |= {"seconds_per_iter": logged, "logged_seconds_per_iter": logged, "checkpoint": path}
        rows.append(row)

    race = speed_race(cfg, mask_head_channels, args.race_rounds, args.overrides) if args.race_rounds > 0 else {}
    for row in rows:
        if row["method"] in race:  # the race names our recipes as the bundled models' folders
            row["seconds_per_iter"] = statistics.median(race[row["method"]])
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
            "scale_train": cfg.data.scale_train,
            "checkpoint": str(checkpoint_path),
        },
        "scales_tried": args.scales,
        "tuning_split": TUNING_SPLIT,
        "speed": "race (interleaved training steps in one process)" if race else "logged by each run",
        "rows": rows,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print_table(rows)


if __name__ == "__main__":
    main()
