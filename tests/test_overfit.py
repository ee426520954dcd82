"""Short overfit runs on one real image: each method must learn to find (and segment) its objects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torchvision.ops import box_iou

from model.finishing import finish_image
from tests.conftest import cpu_config, overfit
from training.data import CocoInstanceDataset


def test_fcos_learns_the_boxes_of_a_voc_photo(voc_dataset: CocoInstanceDataset) -> None:
    cfg = cpu_config(f"model.num_classes={len(voc_dataset.class_names)}")
    model, batch = overfit(cfg, voc_dataset, index=1, iterations=60)  # two buses and a car
    with torch.no_grad():
        detections = model(batch.images)
    count = int(detections.num_dets[0])
    gt = batch.targets[0]
    assert count > 0
    iou = box_iou(gt.boxes, detections.boxes[0, :count])
    best = iou.argmax(dim=1)
    assert bool((iou.max(dim=1).values > 0.7).all()), iou.max(dim=1).values
    assert detections.classes[0, best].tolist() == gt.labels.tolist()


MIN_WHOLE_AREA = 100  # pixels; HeLa nuclei here cover 350-750


def _mask_ious(method: str, nucleus_root: Path, codec: Path | None) -> np.ndarray:
    dataset = CocoInstanceDataset(
        str(nucleus_root / "val.json"),
        str(nucleus_root / "val"),
        min_sizes=[128],
        max_size=128,
        hflip_prob=0.0,
        train=False,
        intensity="percentile",
    )

    # The tile with the most nuclei, none of them a sliver cut by the tile border (a few pixels that no detector
    # learns in 80 iterations): the test is about learning masks, not about slivers.
    def nuclei(i: int) -> list[dict]:
        return dataset.coco.loadAnns(dataset.coco.getAnnIds(imgIds=dataset.image_ids[i]))

    whole = [i for i in range(len(dataset)) if all(a["area"] >= MIN_WHOLE_AREA for a in nuclei(i))]
    index = max(whole, key=lambda i: len(nuclei(i)))
    overrides = [f"model.method={method}", "model.num_classes=1"]
    if codec is not None:
        overrides.append("model.meinst.num_components=16")
    cfg = cpu_config(*overrides)
    model, batch = overfit(cfg, dataset, index=index, iterations=80, codec=codec)
    with torch.no_grad():
        outputs = model(batch.images)
    mask_kind = "box28" if method == "meinst" else "logprob_s4"
    instances = finish_image(
        num_dets=int(outputs.num_dets[0]),
        boxes=outputs.boxes[0].numpy(),
        scores=outputs.scores[0].numpy(),
        classes=outputs.classes[0].numpy(),
        masks=outputs.masks[0].numpy(),
        mask_kind=mask_kind,
        input_size=batch.input_sizes[0],
        image_size=batch.original_sizes[0],
        mask_threshold=cfg.model.meinst.mask_threshold if method == "meinst" else cfg.model.embedmask.mask_threshold,
        score_threshold=0.3,
    )
    assert instances, "no detections after overfitting"
    gt_rles = [
        dataset.coco.annToRLE(a) for a in dataset.coco.loadAnns(dataset.coco.getAnnIds(imgIds=dataset.image_ids[index]))
    ]
    iou = mask_utils.iou([inst.rle for inst in instances], gt_rles, [0] * len(gt_rles))
    return np.asarray(iou).max(axis=0)


@pytest.fixture(scope="module")
def nucleus_codec(nucleus_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.fit_codec import main as fit_codec

    out = tmp_path_factory.mktemp("codec") / "codec.npz"
    fit_codec(["--annotations", str(nucleus_root / "train.json"), "--out", str(out), "--components", "16"])
    return out


def test_meinst_learns_the_masks_of_a_nucleus_tile(nucleus_root: Path, nucleus_codec: Path) -> None:
    ious = _mask_ious("meinst", nucleus_root, nucleus_codec)
    assert ious.mean() > 0.6, ious


def test_embedmask_learns_the_masks_of_a_nucleus_tile(nucleus_root: Path) -> None:
    ious = _mask_ious("embedmask", nucleus_root, None)
    assert ious.mean() > 0.6, ious
