"""Train MEInst, EmbedMask or plain FCOS on any COCO-format dataset.

    python -m training.train --config CONFIG [key.sub=value ...] [--resume]
    torchrun --nproc-per-node N -m training.train --config CONFIG ...

Classes come from the training annotations: ``model.class_names`` is filled from them when empty and
must equal them when given; ``model.num_classes`` must equal their number (set it on the command line
for a new dataset). MEInst needs a PCA codec: ``model.meinst.codec_path``, or, when that is null, one is
fitted on the training annotations and written to ``<output_dir>/codec.npz``.

Long runs: ``<output_dir>/last.pt`` is written atomically every ``solver.checkpoint_period`` iterations
and at the end, ``model_best.pt`` (weights and metadata only) whenever validation segm AP (bbox AP for
FCOS) improves, and ``metrics.jsonl`` gets one JSON line every ``LOG_PERIOD`` iterations (losses, lr,
images/s, ETA) and one per evaluation.
``--resume`` continues from ``last.pt`` on the same schedule, optimizer state and data stream: the
sampler restarts at the number of samples consumed and every iteration seeds torch's RNG from
``(seed, iteration, rank)``, so a killed and resumed run repeats exactly what an uninterrupted one does.
The solver and data sections come from the command line (a run can be extended), the model section must
equal the checkpoint's; with no ``last.pt`` yet, ``--resume`` starts from scratch.

Distributed: under torchrun each rank takes ``solver.ims_per_batch / WORLD_SIZE`` images per iteration;
the learning rate is the one configured for the global batch. Rank 0 writes checkpoints and logs and
runs validation while the other ranks wait.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from export.onnx_export import build_metadata
from inference.predictor import Predictor
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import Config, load_config
from model.detector import OneStageDetector
from model.fcos_outputs import InstanceTargets
from model.input_contract import InputContract
from model.meinst.method import MEInst
from model.runtime import TorchRuntime
from training.data import Batch, CocoInstanceDataset, TrainingSampler, collate
from training.evaluate import evaluate, load_coco
from training.fit_codec import fit_codec
from training.solver import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)

LOG_PERIOD = 20
# Rank 0 validates while the others wait in a barrier; give that barrier room for a full val pass.
PROCESS_GROUP_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


@dataclass
class TrainResult:
    model: OneStageDetector  # the unwrapped network, on its training device
    iteration: int
    metrics: dict[str, Any] = field(default_factory=dict)  # the last validation result


def setup_distributed() -> tuple[Distributed, bool]:
    """Join the torchrun process group from the environment (nccl on CUDA, gloo on CPU).

    Returns the rank info and whether this call created the group (and so must destroy it).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    created = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
        created = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Distributed(rank, dist.get_world_size() if dist.is_initialized() else 1, device), created


def iteration_seed(seed: int, iteration: int, rank: int) -> int:
    """Torch RNG seed of one iteration on one rank (MEInst draws its label-smoothing eps from it)."""
    return int(np.random.SeedSequence([seed, iteration, rank]).generate_state(1)[0])


def check_classes(cfg: Config, dataset: CocoInstanceDataset) -> None:
    """Fill ``model.class_names`` from the dataset, or fail clearly when the config disagrees with it."""
    names = dataset.class_names
    if cfg.model.num_classes != len(names):
        raise ValueError(
            f"{cfg.data.train_annotations} has {len(names)} categories but model.num_classes="
            f"{cfg.model.num_classes}: set model.num_classes={len(names)}"
        )
    if not cfg.model.class_names:
        cfg.model.class_names = list(names)
    elif list(cfg.model.class_names) != list(names):
        raise ValueError(f"model.class_names {cfg.model.class_names} differ from the dataset's categories {names}")


def _prepare_codec(model: OneStageDetector, cfg: Config, env: Distributed) -> None:
    """Load MEInst's codec from ``codec_path``, fitting it on the training annotations first when unset."""
    meinst, method = cfg.model.meinst, model.mask_method
    if not isinstance(method, MEInst):
        raise TypeError(f"a PCA codec belongs to MEInst, not to {type(method).__name__}")
    if meinst.codec_path is None:
        path = Path(cfg.output_dir) / "codec.npz"
        if env.is_main:
            if cfg.data.train_annotations is None:
                raise ValueError("data.train_annotations is required: MEInst's codec is fitted on them")
            codec, ratio, summary = fit_codec(
                cfg.data.train_annotations, meinst.num_components, meinst.mask_size, seed=cfg.seed
            )
            codec.save_npz(path, ratio)
            logger.info("fitted the MEInst codec on the training set: %s", json.dumps(summary))
        env.barrier()
        meinst.codec_path = str(path)
    method.codec.load_npz(meinst.codec_path)


@dataclass(frozen=True)
class ValidationSet:
    """The validation split: its annotations and the folder of its image files (read as users send them)."""

    coco: COCO
    images: str


def _datasets(cfg: Config, env: Distributed) -> tuple[CocoInstanceDataset, ValidationSet | None]:
    data = cfg.data
    if not data.train_annotations or not data.train_images:
        raise ValueError("data.train_annotations and data.train_images are required")
    with contextlib.redirect_stdout(sys.stderr):  # pycocotools' loading chatter
        train_set = CocoInstanceDataset.from_config(
            data, data.train_annotations, data.train_images, train=True, seed=cfg.seed
        )
    val_set = None
    if env.is_main and data.val_annotations and data.val_images:
        val_set = ValidationSet(load_coco(data.val_annotations), data.val_images)
    return train_set, val_set


def _batches(cfg: Config, dataset: CocoInstanceDataset, env: Distributed, start: int) -> Iterator[Batch]:
    sampler = TrainingSampler(len(dataset), cfg.seed, env.rank, env.world_size, start=start)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.solver.ims_per_batch // env.world_size,
        sampler=sampler,
        collate_fn=partial(
            collate,
            size_divisibility=cfg.data.size_divisibility,
            pad_value=InputContract.from_config(cfg).pad_rgb,
        ),
        num_workers=cfg.data.num_workers,
        pin_memory=env.device.type == "cuda",
        persistent_workers=cfg.data.num_workers > 0,
    )
    return iter(loader)


def _to_device(targets: list[InstanceTargets], device: torch.device) -> list[InstanceTargets]:
    return [
        InstanceTargets(
            t.boxes.to(device, non_blocking=True),
            t.labels.to(device, non_blocking=True),
            t.masks.to(device, non_blocking=True) if t.masks is not None else None,
        )
        for t in targets
    ]


def _reduce_losses(losses: dict[str, torch.Tensor], env: Distributed) -> dict[str, float]:
    """Mean over ranks of each detached loss, for logging."""
    names = sorted(losses)
    values = torch.stack([losses[n].detach().float() for n in names])
    if env.world_size > 1:
        dist.all_reduce(values)
        values /= env.world_size
    return dict(zip(names, values.tolist()))


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _network_sections(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """The model config without ``meinst.codec_path`` (where a codec came from; the codec itself is in the weights)."""
    sections = json.loads(json.dumps(model_cfg))
    sections["meinst"].pop("codec_path", None)
    return sections


def validation_score(metrics: dict[str, Any], method: str) -> float:
    """The number model_best.pt is chosen by: segm AP for mask methods, bbox AP for FCOS."""
    return metrics["bbox" if method == "fcos" else "segm"]["AP"]


@dataclass
class RunState:
    """What a checkpoint must carry, besides weights and optimizer, for a resumed run to repeat exactly."""

    iteration: int = 0
    samples_consumed: int = 0
    best_metric: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


def _build_model(cfg: Config, env: Distributed, checkpoint: dict[str, Any] | None) -> OneStageDetector:
    """The network from the config (all ranks identical), with the checkpoint's weights or a ready MEInst codec."""
    torch.manual_seed(cfg.seed)
    model = OneStageDetector(cfg.model)
    if checkpoint is not None:
        ours, theirs = (
            _network_sections(cfg.model.model_dump(mode="json")),
            _network_sections(checkpoint["config"]["model"]),
        )
        differences = sorted(key for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key))
        if differences:
            raise ValueError(f"--resume: model.{differences} differ from the config stored in the checkpoint")
        model.load_state_dict(checkpoint["model"])
    elif cfg.model.method == "meinst":
        _prepare_codec(model, cfg, env)
    return model.to(env.device).train()


def train(cfg: Config, resume: bool = False) -> TrainResult:
    env, created_group = setup_distributed()
    try:
        return _train(cfg, resume, env)
    finally:
        if created_group:
            dist.destroy_process_group()


def last_checkpoint_path(cfg: Config) -> Path:
    """The resumable checkpoint of the run ``cfg`` describes."""
    return Path(cfg.output_dir) / "last.pt"


@dataclass
class Run:
    """One training run's objects: what ``_build`` makes and ``_resume`` restores, what ``_step`` and the
    periodic hooks use."""

    cfg: Config
    env: Distributed
    train_set: CocoInstanceDataset
    val_set: ValidationSet | None  # only on rank 0, which validates
    model: OneStageDetector  # the unwrapped network (what checkpoints hold)
    trained: nn.Module  # the module that runs the step: ``model``, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    use_amp: bool
    state: RunState = field(default_factory=RunState)

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def last_path(self) -> Path:
        return last_checkpoint_path(self.cfg)

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"

    @property
    def object_density(self) -> float | None:
        """Objects per input megapixel of the training images at the test scale (scale-rule recipes), for the
        answers' density warning."""
        data = self.cfg.data
        return self.train_set.object_density(data.scale_test) if data.resize == "scale" else None

    @property
    def object_size(self) -> float | None:
        """The training objects' median box side at the test scale (scale-rule recipes), for ``scale=auto``."""
        data = self.cfg.data
        return self.train_set.median_object_size(data.scale_test) if data.resize == "scale" else None

    def save(self, path: Path, resumable: bool) -> None:
        """A checkpoint (``model.checkpoint``): weights, config, classes, run state, and for a resumable one
        the optimizer, scheduler and grad scaler."""
        payload = {
            "model": self.model.state_dict(),
            "config": self.cfg.model_dump(mode="json"),
            "class_names": list(self.cfg.model.class_names),
            "category_ids": list(self.train_set.category_ids),
            "object_size": self.object_size,
            "object_density": self.object_density,
            # The best-F1 score threshold of the last validation: what answers default to.
            "recommended_score_threshold": self.state.metrics.get("f1", {}).get("threshold"),
            **asdict(self.state),
        }
        if resumable:
            payload.update(
                optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(),
                grad_scaler=self.scaler.state_dict(),
            )
        save_checkpoint(payload, path)


@dataclass
class ThroughputWindow:
    """Iterations since the last log line and the time they took (validation pauses excluded)."""

    started: float = field(default_factory=time.perf_counter)
    iterations: int = 0

    def seconds_per_iteration(self) -> float:
        """The window's mean, then a new window starts."""
        seconds = (time.perf_counter() - self.started) / self.iterations
        self.started, self.iterations = time.perf_counter(), 0
        return seconds

    def exclude_pause(self) -> None:
        self.started = time.perf_counter()


def _train(cfg: Config, resume: bool, env: Distributed) -> TrainResult:
    """Build (and resume), then step to ``solver.max_iter`` with the periodic hooks: log, evaluate, checkpoint."""
    solver = cfg.solver
    last_path = last_checkpoint_path(cfg)
    if last_path.exists() and not resume:
        raise FileExistsError(f"{last_path} exists: pass --resume to continue that run, or choose another output_dir")
    checkpoint = None
    if resume:
        checkpoint = load_checkpoint(last_path) if last_path.exists() else None
        if checkpoint is None:
            logger.info("--resume: no %s yet, starting from scratch", last_path)
    run = _build(cfg, env, checkpoint)
    if checkpoint is not None:
        _resume(run, checkpoint)
    batches = _batches(cfg, run.train_set, env, run.state.samples_consumed)
    start = run.state.iteration
    progress = tqdm(
        total=solver.max_iter, initial=start, desc="train", disable=not env.is_main, file=sys.stderr, dynamic_ncols=True
    )
    window = ThroughputWindow()
    for iteration in range(start, solver.max_iter):
        losses = _step(run, iteration, batches)
        window.iterations += 1
        progress.update(1)
        done, final = run.state.iteration, run.state.iteration == solver.max_iter
        if done % LOG_PERIOD == 0 or final or done == start + 1:
            _log(run, losses, window.seconds_per_iteration(), progress)
        evaluation_due = final or (solver.eval_period > 0 and done % solver.eval_period == 0)
        if evaluation_due and run.val_set is not None:
            _evaluate(run, run.val_set)
            window.exclude_pause()
        if env.is_main and (final or done % solver.checkpoint_period == 0):
            run.save(run.last_path, resumable=True)
        if evaluation_due:  # the other ranks wait for rank 0's validation and checkpoint
            env.barrier()
    progress.close()
    return TrainResult(model=run.model, iteration=run.state.iteration, metrics=run.state.metrics)


def _build(cfg: Config, env: Distributed, checkpoint: dict[str, Any] | None) -> Run:
    """Datasets, network (with the checkpoint's weights, if any), optimizer, schedule and grad scaler."""
    solver = cfg.solver
    if solver.ims_per_batch % env.world_size:
        raise ValueError(f"solver.ims_per_batch={solver.ims_per_batch} is not divisible by the {env.world_size} ranks")
    if env.is_main:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    train_set, val_set = _datasets(cfg, env)
    check_classes(cfg, train_set)
    model = _build_model(cfg, env, checkpoint)
    devices = [env.device.index] if env.device.type == "cuda" else None
    trained = DistributedDataParallel(model, device_ids=devices) if env.world_size > 1 else model
    optimizer = build_optimizer(model, solver)
    use_amp = solver.amp and env.device.type == "cuda"
    return Run(
        cfg=cfg,
        env=env,
        train_set=train_set,
        val_set=val_set,
        model=model,
        trained=trained,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, solver),
        scaler=torch.amp.GradScaler("cuda", enabled=use_amp),
        use_amp=use_amp,
    )


def _resume(run: Run, checkpoint: dict[str, Any]) -> None:
    """Optimizer, schedule, grad scaler and run state as a resumable checkpoint saved them."""
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scheduler.load_state_dict(checkpoint["scheduler"])
    run.scaler.load_state_dict(checkpoint["grad_scaler"])
    run.state = RunState(
        checkpoint["iteration"], checkpoint["samples_consumed"], checkpoint["best_metric"], checkpoint["metrics"]
    )
    logger.info("resumed from %s at iteration %d", run.last_path, run.state.iteration)


def _step(run: Run, iteration: int, batches: Iterator[Batch]) -> dict[str, torch.Tensor]:
    """One optimizer step on the next batch; returns its losses. The iteration's seed is set first, so a
    resumed run draws exactly what an uninterrupted one does."""
    solver, device = run.cfg.solver, run.env.device
    torch.manual_seed(iteration_seed(run.cfg.seed, iteration, run.env.rank))
    batch = next(batches)
    with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=run.use_amp):
        losses = run.trained(batch.images.to(device, non_blocking=True), _to_device(batch.targets, device))
    total = sum(losses.values())
    if not torch.isfinite(total):
        values = {k: v.item() for k, v in losses.items()}
        raise FloatingPointError(f"loss is {total.item()} at iteration {iteration + 1}: {values}")
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(total).backward()
    if solver.clip_grad_norm is not None:
        run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.model.parameters(), solver.clip_grad_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.state.iteration, run.state.samples_consumed = iteration + 1, run.state.samples_consumed + solver.ims_per_batch
    return losses


def _log(run: Run, losses: dict[str, torch.Tensor], seconds_per_iteration: float, progress: tqdm) -> None:
    """Losses (mean over ranks), learning rate, speed and ETA: a ``metrics.jsonl`` line and the progress bar."""
    solver, done = run.cfg.solver, run.state.iteration
    logged = _reduce_losses(losses, run.env)
    record = {
        "iteration": done,
        "lr": run.optimizer.param_groups[0]["lr"],
        "loss": sum(logged.values()),
        **logged,
        "seconds_per_iter": seconds_per_iteration,
        "images_per_s": solver.ims_per_batch / seconds_per_iteration,
        "eta_s": seconds_per_iteration * (solver.max_iter - done),
    }
    if run.env.is_main:
        _append_jsonl(run.metrics_path, record)
        shown = {k.removeprefix("loss_"): f"{v:.3f}" for k, v in logged.items()}
        progress.set_postfix(
            loss=f"{record['loss']:.3f}", **shown, lr=f"{record['lr']:.2e}", img_s=f"{record['images_per_s']:.1f}"
        )


def _evaluate(run: Run, val_set: ValidationSet) -> None:
    """Validate (rank 0) through the service's pipeline on the model in training, log the metrics, and keep
    ``model_best.pt`` when the score improves."""
    recorded = {
        "class_names": run.cfg.model.class_names,
        "category_ids": run.train_set.category_ids,
        "object_size": run.object_size,
        "object_density": run.object_density,
    }
    metadata = build_metadata(run.cfg, recorded)
    predictor = Predictor(TorchRuntime(run.model, run.env.device), metadata)
    run.state.metrics = evaluate(predictor, val_set.coco, val_set.images)
    _append_jsonl(run.metrics_path, {"iteration": run.state.iteration, "eval": run.state.metrics})
    logger.info("iteration %d: validation %s", run.state.iteration, json.dumps(run.state.metrics))
    score = validation_score(run.state.metrics, run.cfg.model.method)
    if run.state.best_metric is None or score > run.state.best_metric:
        run.state.best_metric = score
        run.save(run.output_dir / "model_best.pt", resumable=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (may inherit through _base_)")
    parser.add_argument("--resume", action="store_true", help="continue from <output_dir>/last.pt")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    result = train(load_config(args.config, args.overrides), resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"iteration": result.iteration, "metrics": result.metrics}))


if __name__ == "__main__":
    main()
