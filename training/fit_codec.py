"""Fit MEInst's mask codec (class-agnostic whitened PCA of 28x28 box crops) on a COCO-format dataset.

    python -m training.fit_codec --annotations train.json --out codec.npz [--components 60]
        [--mask-size 28] [--batch-size 1024] [--seed 0]

Every non-crowd instance with a segmentation is cropped to its COCO box (polygons or RLE), turned into
eps-smoothed logits (eps in [0.01, 0.05], docs/methods.md, MEInst: codec) and fed to ``IncrementalPCA.partial_fit``
batch by batch, so memory is one batch, whatever the dataset size. A second streaming pass measures the
reconstruction (encode -> decode -> sigmoid -> >= 0.5) with the saved codec itself, eps drawn at random as
in the reference ``LME/mask_evaluation.py`` (seeded, so the numbers are reproducible). Reported:
- ``miou``: the reference's number (paper Figure 5): 2-class (background, foreground) IoU from one confusion
  matrix pooled over all pixels of all instances, averaged over the two classes;
- ``foreground_iou``: the foreground class of that pooled matrix alone;
- ``instance_miou``: the mean over instances of each instance's foreground IoU (1 when both are empty),
  the strictest of the three, since small instances count as much as large ones.
The last stdout line is a JSON summary; progress and pycocotools' chatter go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from sklearn.decomposition import IncrementalPCA
from tqdm import tqdm

from model.meinst.codec import PCAMaskCodec, smoothed_logits
from training.mask_crops import box_crop_masks


@dataclass(frozen=True)
class Instance:
    segmentation: list[list[float]] | dict[str, Any]
    bbox: list[float]
    height: int
    width: int


def load_instances(annotations: str | Path) -> list[Instance]:
    """Non-crowd annotations that carry a segmentation, with their image size from the json."""
    with contextlib.redirect_stdout(sys.stderr):
        coco = COCO(str(annotations))
    instances = []
    for ann in coco.dataset.get("annotations", []):
        if ann.get("iscrowd", 0) or not ann.get("segmentation"):
            continue
        image = coco.imgs[ann["image_id"]]
        instances.append(Instance(ann["segmentation"], ann["bbox"], image["height"], image["width"]))
    return instances


def batch_bounds(n: int, batch_size: int, min_rows: int) -> list[tuple[int, int]]:
    """[start, stop) batches of ``batch_size``; a last batch shorter than ``min_rows`` joins the one before,
    because ``IncrementalPCA.partial_fit`` needs at least n_components rows per call."""
    bounds = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < min_rows:
        last_stop = bounds.pop()[1]
        bounds[-1] = (bounds[-1][0], last_stop)
    return bounds


def iter_mask_batches(
    instances: Sequence[Instance], bounds: list[tuple[int, int]], mask_size: int, desc: str
) -> Iterator[np.ndarray]:
    """Binary crops, one uint8 [B, S*S] array per batch, rasterised on the fly."""
    with tqdm(total=len(instances), desc=desc, unit="inst", file=sys.stderr) as progress:
        for start, stop in bounds:
            crops = [
                box_crop_masks(inst.segmentation, inst.bbox, inst.height, inst.width, mask_size).reshape(-1)
                for inst in instances[start:stop]
            ]
            progress.update(stop - start)
            yield np.stack(crops)


def fit_pca(batches: Iterator[np.ndarray], num_components: int, generator: torch.Generator) -> IncrementalPCA:
    pca = IncrementalPCA(n_components=num_components, whiten=True)
    for masks in batches:
        logits = smoothed_logits(torch.from_numpy(masks), generator)
        pca.partial_fit(logits.double().numpy())
    return pca


def evaluate_reconstruction(
    codec: PCAMaskCodec, batches: Iterator[np.ndarray], generator: torch.Generator
) -> dict[str, float]:
    """Reconstruction IoUs of encode -> decode -> sigmoid -> >= 0.5 against the binary crops (see module doc)."""
    tp = fp = fn = tn = 0.0
    instance_iou_sum, count = 0.0, 0
    with torch.no_grad():
        for masks in batches:
            target = torch.from_numpy(masks).bool()
            recon = codec.decode(codec.encode(target, generator)).flatten(1) >= 0.5
            inter = (recon & target).sum(1)
            union = (recon | target).sum(1)
            instance_iou_sum += torch.where(union > 0, inter / union.clamp_min(1), 1.0).sum().item()
            count += len(masks)
            tp += inter.sum().item()
            fp += (recon & ~target).sum().item()
            fn += (~recon & target).sum().item()
            tn += (~recon & ~target).sum().item()
    foreground = tp / max(tp + fp + fn, 1)
    background = tn / max(tn + fp + fn, 1)
    return {
        "miou": (foreground + background) / 2,
        "foreground_iou": foreground,
        "instance_miou": instance_iou_sum / max(count, 1),
    }


def fit_codec(
    annotations: str | Path, num_components: int = 60, mask_size: int = 28, batch_size: int = 1024, seed: int = 0
) -> tuple[PCAMaskCodec, np.ndarray, dict[str, Any]]:
    """Fit and evaluate a codec; returns (codec, explained-variance ratio [K], summary)."""
    if batch_size < num_components:
        raise ValueError(f"--batch-size {batch_size} must be at least --components {num_components}")
    codec = PCAMaskCodec(num_components, mask_size)  # validates K against the mask dimension
    instances = load_instances(annotations)
    if len(instances) < num_components:
        raise ValueError(
            f"{annotations} has {len(instances)} non-crowd instances with a segmentation, fewer than the "
            f"{num_components} components asked for: use fewer --components or more data"
        )
    bounds = batch_bounds(len(instances), batch_size, num_components)
    generator = torch.Generator().manual_seed(seed)
    pca = fit_pca(iter_mask_batches(instances, bounds, mask_size, "fit PCA"), num_components, generator)
    codec.load_arrays(pca.components_, pca.explained_variance_, pca.mean_)
    report = evaluate_reconstruction(codec, iter_mask_batches(instances, bounds, mask_size, "mIoU"), generator)
    ratio = pca.explained_variance_ratio_.astype(np.float32)
    summary = {
        "instances": len(instances),
        "components": num_components,
        "mask_size": mask_size,
        "explained_variance_ratio_sum": float(ratio.sum()),
        **report,
    }
    return codec, ratio, summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", type=Path, required=True, help="COCO-format instances json")
    parser.add_argument("--out", type=Path, required=True, help="codec .npz to write (reference key format)")
    parser.add_argument("--components", type=int, default=60)
    parser.add_argument("--mask-size", type=int, default=28)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        codec, ratio, summary = fit_codec(args.annotations, args.components, args.mask_size, args.batch_size, args.seed)
    except ValueError as err:
        parser.error(str(err))
    codec.save_npz(args.out, ratio)
    print(json.dumps({**summary, "out": str(args.out)}))


if __name__ == "__main__":
    main()
