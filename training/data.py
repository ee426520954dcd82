"""COCO instance-segmentation data: dataset with resize/crop/flip and photometric changes, batch collation,
training sampler.

Augmentation randomness comes from a key ``(index, epoch)`` that the sampler yields, never from global
random state, so a resumed run (or a DataLoader worker) draws exactly the same augmentation. The scale
mixture, the crop and the photometric changes each draw from their own stream of that key, so turning one on
leaves every other draw (and a recipe without them) exactly as it was.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools.coco import COCO

from model.config import DataConfig, PhotometricConfig
from model.fcos_outputs import InstanceTargets
from model.input_contract import resize_rgb, resized_shape, scaled_shape
from model.intensity import DEFAULT_PERCENTILES, IntensityRule, decode_rgb8, grey_plane, read_pixels, to_rgb8
from training.photometric import apply_change, draw_change

# Streams of a sample's key besides the main one (percentiles, size, flips): one per optional augmentation.
SCALE_RANGE_STREAM, CROP_STREAM, PHOTOMETRIC_STREAM = 1, 2, 3
# An instance cut by the training crop keeps its visible part when that covers at least this many image
# pixels (the nucleus builder's default --min-area for parts cut by a tile border).
MIN_VISIBLE_AREA = 10


class SampleKey(NamedTuple):
    """What the training sampler yields: the dataset index and the epoch that seeds its augmentation."""

    dataset_index: int  # (not ``index``: a tuple's method of that name)
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
        min_sizes: Sequence[float],
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
        scales_wide: tuple[float, float] | None = None,
        scales_wide_prob: float = 0.0,
        crop_size: int | None = None,
        photometric: PhotometricConfig | None = None,
    ) -> None:
        """``min_sizes``/``max_size`` size images by the "shortest_edge" rule (one size drawn per training
        image, the first at test time); the "scale" rule multiplies them by a factor drawn log-uniformly
        from ``scales`` (training; with probability ``scales_wide_prob`` from ``scales_wide`` instead) or by
        ``scales[0]`` (test). A training input larger than ``crop_size`` a side is then cut to it at a random
        place. Pixels become 8-bit RGB by the ``intensity`` rule (``model.intensity``), with each training
        image's percentiles drawn from the ``*_train`` ranges when given, after the ``photometric`` changes
        (training only) to its raw values."""
        if scales_wide_prob > 0 and scales_wide is None:
            raise ValueError("scales_wide_prob > 0 needs a scales_wide range")
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
        self.scales_wide = scales_wide
        self.scales_wide_prob = scales_wide_prob
        self.crop_size = crop_size
        self.photometric = photometric if photometric is not None and photometric.enabled else None
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
            scales_wide=data.scale_train_wide if train else None,
            scales_wide_prob=data.scale_train_wide_prob if train else 0.0,
            crop_size=data.crop_size_train if train else None,
            photometric=data.photometric if train else None,
        )

    def median_object_size(self, factor: float = 1.0) -> float | None:
        """The median box side ``sqrt(w * h)`` of the non-crowd instances, in pixels times ``factor``."""
        sides = [np.sqrt(a["bbox"][2] * a["bbox"][3]) for a in self.coco.anns.values() if not a.get("iscrowd", 0)]
        return float(np.median(sides)) * factor if sides else None

    def object_density(self, factor: float = 1.0) -> float | None:
        """Objects per megapixel of the images resized by ``factor`` (non-crowd instances per image area, the
        95th percentile over the images that hold any): how crowded the densest typical image is."""
        counts = {image_id: 0 for image_id in self.image_ids}
        for annotation in self.coco.anns.values():
            if not annotation.get("iscrowd", 0):
                counts[annotation["image_id"]] += 1
        densities = [
            count / (self.coco.imgs[image_id]["height"] * self.coco.imgs[image_id]["width"] * factor**2 / 1e6)
            for image_id, count in counts.items()
            if count
        ]
        return float(np.percentile(densities, 95)) if densities else None

    def _percentiles(self, rng: np.random.Generator) -> tuple[float, float]:
        if not self.train:
            return self.percentiles
        return tuple(  # type: ignore[return-value]
            float(rng.uniform(*drawn)) if drawn is not None else fixed
            for drawn, fixed in zip(self.percentile_ranges, self.percentiles)
        )

    def _stream(self, index: int, epoch: int, stream: int) -> np.random.Generator:
        """The sample's own generator for one optional augmentation (``*_STREAM``)."""
        return np.random.default_rng([self.seed, epoch, index, stream])

    def _input_size(self, height: int, width: int, rng: np.random.Generator, wide: bool) -> tuple[int, int]:
        if self.resize == "scale":
            low, high = self.scales_wide if wide and self.scales_wide is not None else self.scales
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
        if self.train and self.photometric is not None:
            photometric_rng = self._stream(index, epoch, PHOTOMETRIC_STREAM)
            change = draw_change(self.photometric, photometric_rng)
            plane = apply_change(grey_plane(read_pixels(data)), change, photometric_rng)
            image = to_rgb8(plane, self.intensity, percentiles)
        else:
            image = decode_rgb8(data, self.intensity, percentiles)
        height, width = image.shape[:2]
        if (height, width) != (info["height"], info["width"]):
            raise ValueError(
                f"{info['file_name']}: decoded size {(height, width)} differs from annotated "
                f"{(info['height'], info['width'])}"
            )
        boxes, labels, masks = self._instances(image_id, height, width)

        wide = (
            self.train
            and self.scales_wide_prob > 0
            and self._stream(index, epoch, SCALE_RANGE_STREAM).random() < self.scales_wide_prob
        )
        new_h, new_w = self._input_size(height, width, rng, wide)
        boxes = boxes * torch.tensor([new_w / width, new_h / height] * 2)
        if self.train and self.crop_size is not None and max(new_h, new_w) > self.crop_size:
            window = crop_window(new_h, new_w, self.crop_size, self._stream(index, epoch, CROP_STREAM))
            pixels, boxes, labels, masks = _resized_crop(image, boxes, labels, masks, (new_h, new_w), window)
            new_h, new_w = window[2:]
        else:
            pixels = torch.from_numpy(resize_rgb(image, (new_h, new_w)))
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


def crop_window(height: int, width: int, size: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """``(y0, x0, h, w)``: a window of at most ``size`` a side, placed uniformly inside ``height`` x ``width``."""
    crop_h, crop_w = min(height, size), min(width, size)
    y0, x0 = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
    return y0, x0, crop_h, crop_w


def nearest_exact_index(start: int, length: int, source: int, resized: int) -> torch.Tensor:
    """Source indices of resized pixels ``start .. start + length - 1`` when ``source`` pixels are resized to
    ``resized`` by torch's "nearest-exact" rule (the pixel whose centre is nearest: ``floor((i + 0.5) *
    source / resized)``), so that a window of the resized masks is gathered without resizing them whole."""
    # ATen's own arithmetic (float32 scale, float64 product, float32 floor), so that the indices agree with
    # F.interpolate's even where a centre falls on a pixel boundary.
    scale = float(np.float32(source) / np.float32(resized))
    positions = (torch.arange(start, start + length, dtype=torch.float64) + 0.5) * scale
    return positions.float().floor().long().clamp_(max=source - 1)


def _resized_crop(
    image: np.ndarray,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    masks: torch.Tensor,
    size: tuple[int, int],
    window: tuple[int, int, int, int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``window`` ``(y0, x0, h, w)`` of the image, boxes and masks resized to ``size``, computed from the
    source pixels the window needs (PIL's resize of a box of the source, the same sampling positions as a whole
    resize; the masks' nearest-exact pixels gathered directly). ``boxes`` are already at ``size``.

    Instances the window cuts keep their visible part, their box recomputed from it; a part smaller than
    ``MIN_VISIBLE_AREA`` image pixels (or less than a pixel wide) is dropped, as the nucleus builder drops the
    parts cut by a tile border."""
    (new_h, new_w), (y0, x0, crop_h, crop_w) = size, window
    height, width = image.shape[:2]
    sx, sy = width / new_w, height / new_h
    source_box = (x0 * sx, y0 * sy, (x0 + crop_w) * sx, (y0 + crop_h) * sy)
    resized = Image.fromarray(image).resize((crop_w, crop_h), Image.Resampling.BILINEAR, box=source_box)
    pixels = torch.from_numpy(np.ascontiguousarray(np.asarray(resized).transpose(2, 0, 1)))
    rows, cols = nearest_exact_index(y0, crop_h, height, new_h), nearest_exact_index(x0, crop_w, width, new_w)
    masks = masks[:, rows][:, :, cols]

    moved = boxes - torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype)
    clipped = torch.stack(
        [
            moved[:, 0].clamp(0, crop_w),
            moved[:, 1].clamp(0, crop_h),
            moved[:, 2].clamp(0, crop_w),
            moved[:, 3].clamp(0, crop_h),
        ],
        dim=1,
    )
    cut = (clipped != moved).any(dim=1)
    min_area = MIN_VISIBLE_AREA * (new_h / height) * (new_w / width)
    keep = torch.ones(len(boxes), dtype=torch.bool)
    for i in torch.nonzero(cut).flatten().tolist():
        ys, xs = torch.nonzero(masks[i], as_tuple=True)
        if len(ys) < min_area or len(ys) == 0:
            keep[i] = False
            continue
        clipped[i] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=clipped.dtype)
    keep &= (clipped[:, 2] - clipped[:, 0] >= 1) & (clipped[:, 3] - clipped[:, 1] >= 1)
    return pixels, clipped[keep], labels[keep], masks[keep]


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
