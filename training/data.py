"""COCO instance-segmentation data: dataset with resize/flip, batch collation, training sampler.

Augmentation randomness comes from a key ``(index, epoch)`` that the sampler yields, never from global
random state, so a resumed run (or a DataLoader worker) draws exactly the same augmentation.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools.coco import COCO

from model.config import DataConfig
from model.fcos_outputs import InstanceTargets
from model.input_contract import resize_rgb, resized_shape, scaled_shape
from model.intensity import DEFAULT_PERCENTILES, IntensityRule, decode_rgb8


class SampleKey(NamedTuple):
    """What the training sampler yields: the dataset index and the epoch that seeds its augmentation."""

    index: int
    epoch: int


@dataclass
class Sample:
    image: torch.Tensor  # [3, h, w] uint8 RGB at the resized size
    targets: InstanceTargets
    image_id: int
    original_size: tuple[int, int]  # (H, W) of the decoded file
    input_size: tuple[int, int]  # (h, w) after resize


@dataclass
class Batch:
    images: torch.Tensor  # [B, 3, Hp, Wp] uint8, padded at bottom/right
    targets: list[InstanceTargets]
    image_ids: list[int]
    original_sizes: list[tuple[int, int]]
    input_sizes: list[tuple[int, int]]


class CocoInstanceDataset(torch.utils.data.Dataset):
    """Any COCO instance-segmentation dataset, with crowd regions ignored and empty images kept."""

    def __init__(
        self,
        annotations: str,
        images: str,
        min_sizes: list[float],
        max_size: float,
        hflip_prob: float,
        train: bool,
        seed: int = 0,
        *,
        resize: Literal["shortest_edge", "scale"] = "shortest_edge",
        scales: tuple[float, float] = (1.0, 1.0),
        intensity: IntensityRule = "rgb8",
        percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
        percentile_low_train: tuple[float, float] | None = None,
        percentile_high_train: tuple[float, float] | None = None,
        vflip_prob: float = 0.0,
        rot90_prob: float = 0.0,
    ) -> None:
        """``min_sizes``/``max_size`` size images by the "shortest_edge" rule (one size drawn per training
        image, the first at test time); the "scale" rule multiplies them by a factor drawn log-uniformly
        from ``scales`` (training) or by ``scales[0]`` (test). Pixels become 8-bit RGB by the ``intensity``
        rule (``model.intensity``), with each training image's percentiles drawn from the ``*_train``
        ranges when given."""
        self.coco = COCO(annotations)
        self.images = images
        self.min_sizes = list(min_sizes)
        self.max_size = max_size
        self.hflip_prob = hflip_prob
        self.train = train
        self.seed = seed
        self.resize = resize
        self.scales = scales
        self.intensity = intensity
        self.percentiles = percentiles
        self.percentile_ranges = (percentile_low_train, percentile_high_train)
        self.vflip_prob = vflip_prob
        self.rot90_prob = rot90_prob
        self.category_ids: list[int] = sorted(self.coco.getCatIds())
        self.class_names: list[str] = [self.coco.cats[c]["name"] for c in self.category_ids]
        self.label_of = {cat: label for label, cat in enumerate(self.category_ids)}
        self.image_ids: list[int] = sorted(self.coco.getImgIds())

    @classmethod
    def from_config(
        cls, data: DataConfig, annotations: str, images: str, train: bool, seed: int = 0
    ) -> CocoInstanceDataset:
        """The dataset sized and normalised as the recipe ``data`` says (training draws, or the test rule)."""
        sizes, max_size = (
            (data.min_size_train, data.max_size_train) if train else ([data.min_size_test], data.max_size_test)
        )
        return cls(
            annotations,
            images,
            sizes,
            max_size,
            data.hflip_prob if train else 0.0,
            train,
            seed,
            resize=data.resize,
            scales=data.scale_train if train else (data.scale_test, data.scale_test),
            intensity=data.intensity,
            percentiles=data.percentiles,
            percentile_low_train=data.percentile_low_train,
            percentile_high_train=data.percentile_high_train,
            vflip_prob=data.vflip_prob if train else 0.0,
            rot90_prob=data.rot90_prob if train else 0.0,
        )

    def median_object_size(self, factor: float = 1.0) -> float | None:
        """The median box side ``sqrt(w * h)`` of the non-crowd instances, in pixels times ``factor``."""
        sides = [np.sqrt(a["bbox"][2] * a["bbox"][3]) for a in self.coco.anns.values() if not a.get("iscrowd", 0)]
        return float(np.median(sides)) * factor if sides else None

    def _percentiles(self, rng: np.random.Generator) -> tuple[float, float]:
        if not self.train:
            return self.percentiles
        return tuple(  # type: ignore[return-value]
            float(rng.uniform(*drawn)) if drawn is not None else fixed
            for drawn, fixed in zip(self.percentile_ranges, self.percentiles)
        )

    def _input_size(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int]:
        if self.resize == "scale":
            low, high = self.scales
            factor = float(np.exp(rng.uniform(np.log(low), np.log(high)))) if self.train and high > low else low
            return scaled_shape(height, width, factor)
        short_edge = int(rng.choice(self.min_sizes)) if self.train else self.min_sizes[0]
        return resized_shape(height, width, short_edge, self.max_size)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, key: int | SampleKey | tuple[int, int]) -> Sample:
        index, epoch = (int(key), 0) if isinstance(key, (int, np.integer)) else key
        rng = np.random.default_rng([self.seed, epoch, index])
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        with open(os.path.join(self.images, info["file_name"]), "rb") as f:
            data = f.read()
        percentiles = self._percentiles(rng)
        image = decode_rgb8(data, self.intensity, percentiles)
        height, width = image.shape[:2]
        if (height, width) != (info["height"], info["width"]):
            raise ValueError(
                f"{info['file_name']}: decoded size {(height, width)} differs from annotated "
                f"{(info['height'], info['width'])}"
            )
        boxes, labels, masks = self._instances(image_id, height, width)

        new_h, new_w = self._input_size(height, width, rng)
        pixels = torch.from_numpy(resize_rgb(image, (new_h, new_w)))
        boxes = boxes * torch.tensor([new_w / width, new_h / height] * 2)
        masks = (
            F.interpolate(masks[None], size=(new_h, new_w), mode="nearest-exact")[0]
            if len(masks)
            else masks.new_zeros((0, new_h, new_w))
        )

        if self.train and rng.random() < self.hflip_prob:
            pixels, masks = pixels.flip(-1), masks.flip(-1)
            boxes = torch.stack([new_w - boxes[:, 2], boxes[:, 1], new_w - boxes[:, 0], boxes[:, 3]], dim=1)
        if self.train and self.vflip_prob > 0 and rng.random() < self.vflip_prob:
            pixels, masks = pixels.flip(-2), masks.flip(-2)
            boxes = torch.stack([boxes[:, 0], new_h - boxes[:, 3], boxes[:, 2], new_h - boxes[:, 1]], dim=1)
        if self.train and self.rot90_prob > 0 and rng.random() < self.rot90_prob:
            # A quarter turn counter-clockwise (image x -> y, y -> w - x); a vertical flip before it makes the
            # clockwise turn, so with vflip_prob 0.5 both directions are equally likely.
            pixels, masks = pixels.rot90(1, (-2, -1)), masks.rot90(1, (-2, -1))
            boxes = torch.stack([boxes[:, 1], new_w - boxes[:, 2], boxes[:, 3], new_w - boxes[:, 0]], dim=1)
            new_h, new_w, height, width = new_w, new_h, width, height

        return Sample(
            image=pixels,
            targets=InstanceTargets(boxes=boxes, labels=labels, masks=masks),
            image_id=image_id,
            original_size=(height, width),
            input_size=(new_h, new_w),
        )

    def _instances(self, image_id: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Non-crowd instances with a box of at least one pixel each way (clipped to the image) and a mask."""
        boxes, labels, masks = [], [], []
        for ann in self.coco.imgToAnns[image_id]:
            if ann.get("iscrowd", 0) or not _has_segmentation(ann):
                continue
            x, y, w, h = ann["bbox"]
            x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
            x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
            if x1 - x0 < 1 or y1 - y0 < 1:
                continue
            boxes.append([x0, y0, x1, y1])
            labels.append(self.label_of[ann["category_id"]])
            masks.append(torch.from_numpy(self.coco.annToMask(ann)))
        return (
            torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            torch.tensor(labels, dtype=torch.int64),
            torch.stack(masks) if masks else torch.zeros((0, height, width), dtype=torch.uint8),
        )


def _has_segmentation(ann: dict) -> bool:
    """Polygons need at least one ring of three points; RLE is a dict with counts."""
    segmentation = ann.get("segmentation")
    if isinstance(segmentation, dict):
        return "counts" in segmentation
    return isinstance(segmentation, list) and any(len(ring) >= 6 for ring in segmentation)


def collate(samples: list[Sample], size_divisibility: int = 32, *, pad_value: tuple[int, int, int]) -> Batch:
    """Pad every image at bottom/right to a shared size divisible by ``size_divisibility``.

    ``pad_value`` is the rounded pixel mean, so padding normalises to about zero.
    """
    max_h = max(s.image.shape[1] for s in samples)
    max_w = max(s.image.shape[2] for s in samples)
    pad_h = -(-max_h // size_divisibility) * size_divisibility
    pad_w = -(-max_w // size_divisibility) * size_divisibility
    images = torch.tensor(pad_value, dtype=torch.uint8).view(1, 3, 1, 1).repeat(len(samples), 1, pad_h, pad_w)
    for i, s in enumerate(samples):
        images[i, :, : s.image.shape[1], : s.image.shape[2]] = s.image
    return Batch(
        images=images,
        targets=[s.targets for s in samples],
        image_ids=[s.image_id for s in samples],
        original_sizes=[s.original_size for s in samples],
        input_sizes=[s.input_size for s in samples],
    )


class TrainingSampler(torch.utils.data.Sampler[SampleKey]):
    """Infinite stream of ``SampleKey``s, reshuffled every epoch from ``seed``.

    The global stream is the concatenation of per-epoch permutations. Rank ``r`` of ``world_size`` takes
    positions ``start + r, start + r + world_size, ...``, so with ``start`` = samples already consumed by
    all ranks together a resumed run continues the very same stream, whatever the number of ranks.
    """

    def __init__(self, size: int, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0) -> None:
        if size <= 0:
            raise ValueError("TrainingSampler needs a non-empty dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.size = size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def __iter__(self) -> Iterator[SampleKey]:
        position = self.start + self.rank
        epoch, order = -1, np.empty(0, dtype=np.int64)
        while True:
            if position // self.size != epoch:
                epoch = position // self.size
                order = self._order(epoch)
            yield SampleKey(int(order[position % self.size]), epoch)
            position += self.world_size
