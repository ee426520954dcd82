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
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model.config import Config, load_config
from model.detector import OneStageDetector
from model.fcos_outputs import InstanceTargets
from model.runtime import TorchRuntime
from model.checkpoint import load_checkpoint, save_checkpoint
from training.data import Batch, CocoInstanceDataset, TrainingSampler, collate
from training.evaluate import EvalSpec, eval_dataset, evaluate
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
    meinst = cfg.model.meinst
    if meinst.codec_path is None:
        path = Path(cfg.output_dir) / "codec.npz"
        if env.is_main:
            codec, ratio, summary = fit_codec(cfg.data.train_annotations, meinst.num_components, meinst.mask_size, seed=cfg.seed)
            codec.save_npz(path, ratio)
            logger.info("fitted the MEInst codec on the training set: %s", json.dumps(summary))
        env.barrier()
        meinst.codec_path = str(path)
    model.mask_method.codec.load_npz(meinst.codec_path)


def _datasets(cfg: Config, env: Distributed) -> tuple[CocoInstanceDataset, CocoInstanceDataset | None]:
    data = cfg.data
    if not data.train_annotations or not data.train_images:
        raise ValueError("data.train_annotations and data.train_images are required")
    with contextlib.redirect_stdout(sys.stderr):  # pycocotools' loading chatter
        train_set = CocoInstanceDataset(
            data.train_annotations, data.train_images, data.min_size_train, data.max_size_train,
            data.hflip_prob, train=True, seed=cfg.seed,
        )
    val_set = None
    if env.is_main and data.val_annotations and data.val_images:
        val_set = eval_dataset(data.val_annotations, data.val_images, EvalSpec.from_config(cfg, train_set.category_ids))
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
            pad_value=tuple(round(m) for m in cfg.model.pixel_mean),
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
        ours, theirs = _network_sections(cfg.model.model_dump(mode="json")), _network_sections(checkpoint["config"]["model"])
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


def _train(cfg: Config, resume: bool, env: Distributed) -> TrainResult:
    solver = cfg.solver
    if solver.ims_per_batch % env.world_size:
        raise ValueError(f"solver.ims_per_batch={solver.ims_per_batch} is not divisible by the {env.world_size} ranks")
    output_dir = Path(cfg.output_dir)
    last_path, metrics_path = output_dir / "last.pt", output_dir / "metrics.jsonl"
    if last_path.exists() and not resume:
        raise FileExistsError(f"{last_path} exists: pass --resume to continue that run, or choose another output_dir")
    if env.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)

    train_set, val_set = _datasets(cfg, env)
    check_classes(cfg, train_set)
    checkpoint = load_checkpoint(last_path) if resume and last_path.exists() else None
    if resume and checkpoint is None:
        logger.info("--resume: no %s yet, starting from scratch", last_path)
    model = _build_model(cfg, env, checkpoint)
    ddp = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None) if env.world_size > 1 else model
    optimizer = build_optimizer(model, solver)
    scheduler = build_scheduler(optimizer, solver)
    use_amp = solver.amp and env.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    state = RunState()
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["grad_scaler"])
        state = RunState(checkpoint["iteration"], checkpoint["samples_consumed"], checkpoint["best_metric"], checkpoint["metrics"])
        logger.info("resumed from %s at iteration %d", last_path, state.iteration)

    def save(path: Path, resumable: bool) -> None:
        payload = {
            "model": model.state_dict(),
            "config": cfg.model_dump(mode="json"),
            "class_names": list(cfg.model.class_names),
            "category_ids": list(train_set.category_ids),
            **asdict(state),
        }
        if resumable:
            payload.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), grad_scaler=scaler.state_dict())
        save_checkpoint(payload, path)

    eval_spec = EvalSpec.from_config(cfg, train_set.category_ids)
    batches = _batches(cfg, train_set, env, state.samples_consumed)
    start_iter = state.iteration
    progress = tqdm(total=solver.max_iter, initial=start_iter, desc="train", disable=not env.is_main, file=sys.stderr, dynamic_ncols=True)
    window_start, window_iters = time.perf_counter(), 0
    for iteration in range(start_iter, solver.max_iter):
        torch.manual_seed(iteration_seed(cfg.seed, iteration, env.rank))
        batch = next(batches)
        with torch.autocast(device_type=env.device.type, dtype=torch.float16, enabled=use_amp):
            losses = ddp(batch.images.to(env.device, non_blocking=True), _to_device(batch.targets, env.device))
        total = sum(losses.values())
        if not torch.isfinite(total):
            raise FloatingPointError(f"loss is {total.item()} at iteration {iteration + 1}: { {k: v.item() for k, v in losses.items()} }")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        if solver.clip_grad_norm is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), solver.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        state.iteration, state.samples_consumed = iteration + 1, state.samples_consumed + solver.ims_per_batch
        done, final = state.iteration, state.iteration == solver.max_iter
        window_iters += 1
        progress.update(1)

        if done % LOG_PERIOD == 0 or final or done == start_iter + 1:
            logged = _reduce_losses(losses, env)
            seconds = (time.perf_counter() - window_start) / window_iters
            window_start, window_iters = time.perf_counter(), 0
            record = {
                "iteration": done,
                "lr": optimizer.param_groups[0]["lr"],
                "loss": sum(logged.values()),
                **logged,
                "seconds_per_iter": seconds,
                "images_per_s": solver.ims_per_batch / seconds,
                "eta_s": seconds * (solver.max_iter - done),
            }
            if env.is_main:
                _append_jsonl(metrics_path, record)
                losses_shown = {k.removeprefix("loss_"): f"{v:.3f}" for k, v in logged.items()}
                progress.set_postfix(loss=f"{record['loss']:.3f}", **losses_shown, lr=f"{record['lr']:.2e}", img_s=f"{record['images_per_s']:.1f}")

        evaluation_due = final or (solver.eval_period > 0 and done % solver.eval_period == 0)
        if evaluation_due and val_set is not None:
            state.metrics = evaluate(TorchRuntime(model, env.device), val_set, eval_spec)
            _append_jsonl(metrics_path, {"iteration": done, "eval": state.metrics})
            logger.info("iteration %d: validation %s", done, json.dumps(state.metrics))
            score = validation_score(state.metrics, cfg.model.method)
            if state.best_metric is None or score > state.best_metric:
                state.best_metric = score
                save(output_dir / "model_best.pt", resumable=False)
            window_start = time.perf_counter()
        if env.is_main and (final or done % solver.checkpoint_period == 0):
            save(last_path, resumable=True)
        if evaluation_due:  # the other ranks wait for rank 0's validation and checkpoint
            env.barrier()
    progress.close()
    return TrainResult(model=model, iteration=state.iteration, metrics=state.metrics)


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
