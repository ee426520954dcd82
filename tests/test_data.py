"""COCO loader, collation, training sampler and the nucleus dataset builder."""

from __future__ import annotations

import itertools
import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from model.config import DataConfig, PhotometricConfig, load_config
from model.input_contract import resized_shape
from training import nucleus
from training.data import (
    CROP_STREAM,
    MIN_VISIBLE_AREA,
    CocoInstanceDataset,
    SampleKey,
    TrainingSampler,
    collate,
    crop_window,
)

# pycocotools 2.0.x calls np.array(copy=False) under numpy 2; harmless, and not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LABELME_COCO = Path("/usr/share/doc/labelme-examples/examples/instance_segmentation/data_dataset_coco")


def _rle_mask(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return np.asfortranarray(mask)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Image 1 (40x60 RGB): polygon, compressed RLE, uncompressed RLE, crowd, degenerate box.
    Image 2 (30x20 16-bit grey): no annotations at all."""
    root = tmp_path_factory.mktemp("tiny")
    rgb = np.zeros((40, 60, 3), dtype=np.uint8)
    rgb[:, :, 0] = np.arange(60, dtype=np.uint8)[None, :] * 4
    rgb[:, :, 1] = np.arange(40, dtype=np.uint8)[:, None] * 6
    Image.fromarray(rgb).save(root / "a.png")
    grey16 = np.full((30, 20), 0x8080, dtype=np.uint16)
    grey16[0, 0] = 65535
    Image.fromarray(grey16).save(root / "b.png")

    compressed = mask_utils.encode(_rle_mask(40, 60, 20, 30, 30, 50))  # box [30, 20, 20, 10]
    compressed["counts"] = compressed["counts"].decode("ascii")
    # Uncompressed RLE counts run down columns (Fortran order): rows 2..5 of columns 0..3.
    uncompressed = {"size": [40, 60], "counts": [2, 4] + [36, 4] * 3 + [34 + 40 * 56]}
    crowd = mask_utils.encode(_rle_mask(40, 60, 0, 10, 40, 50))
    crowd["counts"] = crowd["counts"].decode("ascii")
    annotations = [
        {
            "id": 1,
            "image_id": 1,
            "category_id": 7,
            "iscrowd": 0,
            "area": 200.0,
            "bbox": [4, 8, 20, 10],
            "segmentation": [[4, 8, 24, 8, 24, 18, 4, 18]],
        },
        {
            "id": 2,
            "image_id": 1,
            "category_id": 3,
            "iscrowd": 0,
            "area": 200.0,
            "bbox": [30, 20, 20, 10],
            "segmentation": compressed,
        },
        {
            "id": 3,
            "image_id": 1,
            "category_id": 7,
            "iscrowd": 0,
            "area": 16.0,
            "bbox": [0, 2, 4, 4],
            "segmentation": uncompressed,
        },
        {
            "id": 4,
            "image_id": 1,
            "category_id": 3,
            "iscrowd": 1,
            "area": 100.0,
            "bbox": [40, 0, 10, 10],
            "segmentation": crowd,
        },
        {
            "id": 5,
            "image_id": 1,
            "category_id": 7,
            "iscrowd": 0,
            "area": 0.5,
            "bbox": [10, 30, 0.5, 5],
            "segmentation": [[10, 30, 10.5, 30, 10.5, 35, 10, 35]],
        },
    ]
    coco = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": 40, "width": 60},
            {"id": 2, "file_name": "b.png", "height": 30, "width": 20},
        ],
        "annotations": annotations,
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}, {"id": 9, "name": "unused"}],
    }
    path = root / "annotations.json"
    path.write_text(json.dumps(coco))
    return str(path), str(root)


def _dataset(tiny: tuple[str, str], **kwargs) -> CocoInstanceDataset:
    options = {"min_sizes": [80], "max_size": 1000, "hflip_prob": 0.0, "train": False} | kwargs
    return CocoInstanceDataset(tiny[0], tiny[1], **options)


def test_categories_contiguous_in_sorted_id_order(tiny):
    ds = _dataset(tiny)
    assert ds.category_ids == [3, 7, 9]
    assert ds.class_names == ["three", "seven", "unused"]
    assert len(ds) == 2  # the image without instances is kept


def test_resize_scales_boxes_and_masks_and_drops_crowd_and_degenerate(tiny):
    sample = _dataset(tiny)[0]
    assert sample.original_size == (40, 60) and sample.input_size == (80, 120)
    assert sample.image.dtype == torch.uint8 and sample.image.shape == (3, 80, 120)
    t = sample.targets
    assert t.labels.tolist() == [1, 0, 1]  # polygon (7), compressed RLE (3), uncompressed RLE (7)
    assert t.boxes.dtype == torch.float32 and t.labels.dtype == torch.int64
    torch.testing.assert_close(t.boxes, 2 * torch.tensor([[4, 8, 24, 18], [30, 20, 50, 30], [0, 2, 4, 6]]).float())
    assert t.masks.dtype == torch.uint8 and t.masks.shape == (3, 80, 120)
    # Exact 2x upsampling: every original mask pixel becomes four.
    assert t.masks[1].sum() == 4 * 200 and t.masks[2].sum() == 4 * 16
    assert t.masks[2, 4:12, 0:8].all()
    polygon_area = int(mask_utils.area(mask_utils.frPyObjects([[4, 8, 24, 8, 24, 18, 4, 18]], 40, 60))[0])
    assert t.masks[0].sum() == 4 * polygon_area
    for box, mask in zip(t.boxes, t.masks):  # masks lie inside their boxes
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert xs.min() >= box[0] and xs.max() < box[2] and ys.min() >= box[1] and ys.max() < box[3]


def test_max_size_caps_longer_side(tiny):
    sample = _dataset(tiny, max_size=90)[0]
    assert sample.input_size == (60, 90)
    assert resized_shape(480, 640, 800, 1333) == (800, 1067)
    assert resized_shape(427, 640, 800, 1333) == (800, 1199)
    assert resized_shape(100, 1000, 800, 1333) == (133, 1333)


def test_horizontal_flip(tiny):
    plain = _dataset(tiny, min_sizes=[40], train=True)[0]
    flipped = _dataset(tiny, min_sizes=[40], train=True, hflip_prob=1.0)[0]
    w = plain.input_size[1]
    assert w == 60
    torch.testing.assert_close(flipped.image, plain.image.flip(-1))
    torch.testing.assert_close(flipped.targets.masks, plain.targets.masks.flip(-1))
    b = plain.targets.boxes
    torch.testing.assert_close(flipped.targets.boxes, torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1))
    assert flipped.targets.boxes[1].tolist() == [10.0, 20.0, 30.0, 30.0]


def test_augmentation_reproducible_per_key(tiny):
    options = {"min_sizes": [32, 40, 48, 56], "train": True, "hflip_prob": 0.5, "seed": 3}
    first, second = _dataset(tiny, **options), _dataset(tiny, **options)
    draws = []
    for epoch in range(12):
        a, b = first[SampleKey(0, epoch)], second[SampleKey(0, epoch)]
        assert a.input_size == b.input_size
        torch.testing.assert_close(a.image, b.image)
        torch.testing.assert_close(a.targets.boxes, b.targets.boxes)
        draws.append((a.input_size, a.targets.boxes[1, 0].item() < a.input_size[1] / 2))
    assert len({size for size, _ in draws}) > 1 and len({flip for _, flip in draws}) == 2


def test_negative_image_and_16bit_grey(tiny):
    sample = _dataset(tiny, min_sizes=[20])[1]
    assert sample.input_size == (30, 20) and sample.image.shape == (3, 30, 20)
    assert sample.targets.boxes.shape == (0, 4) and sample.targets.labels.shape == (0,)
    assert sample.targets.masks.shape == (0, 30, 20)
    assert sample.image[:, 0, 0].tolist() == [255, 255, 255]
    assert sample.image[:, 5, 5].tolist() == [128, 128, 128]


def test_exif_orientation_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    Image.new("RGB", (20, 10), (200, 50, 50)).save(tmp_path / "r.jpg", exif=exif)
    coco = {
        "images": [{"id": 5, "file_name": "r.jpg", "height": 20, "width": 10}],
        "annotations": [],
        "categories": [{"id": 1, "name": "x"}],
    }
    (tmp_path / "a.json").write_text(json.dumps(coco))
    sample = CocoInstanceDataset(str(tmp_path / "a.json"), str(tmp_path), [10], 100, 0.0, False)[0]
    assert sample.original_size == (20, 10) and sample.image_id == 5


def test_collate_pads_to_multiple_of_32_with_pad_value(tiny):
    ds = _dataset(tiny, min_sizes=[33])
    samples = [ds[0], ds[1]]  # (33, 50) and (50, 33)
    batch = collate(samples, 32, pad_value=(124, 116, 104))
    assert batch.images.shape == (2, 3, 64, 64) and batch.images.dtype == torch.uint8
    for i, s in enumerate(samples):
        h, w = s.input_size
        torch.testing.assert_close(batch.images[i, :, :h, :w], s.image)
        padded = batch.images[i].clone()
        padded[:, :h, :w] = 0
        assert (padded[:, h:, :] == torch.tensor([124, 116, 104]).view(3, 1, 1)).all()
        assert (padded[:, :, w:] == torch.tensor([124, 116, 104]).view(3, 1, 1)).all()
    assert batch.image_ids == [1, 2] and batch.input_sizes == [(33, 50), (50, 33)]
    assert batch.original_sizes == [(40, 60), (30, 20)] and batch.targets[0] is samples[0].targets


def _take(sampler: TrainingSampler, n: int) -> list[SampleKey]:
    return list(itertools.islice(iter(sampler), n))


def test_sampler_reproducible_shuffled_per_epoch():
    keys = _take(TrainingSampler(7, seed=5), 28)
    assert keys == _take(TrainingSampler(7, seed=5), 28)
    assert keys != _take(TrainingSampler(7, seed=6), 28)
    epochs = [[k.dataset_index for k in keys[e * 7 : (e + 1) * 7]] for e in range(4)]
    assert all(sorted(order) == list(range(7)) for order in epochs)
    assert len({tuple(order) for order in epochs}) > 1
    assert [k.epoch for k in keys] == [e for e in range(4) for _ in range(7)]


def test_sampler_rank_split_and_resume():
    stream = _take(TrainingSampler(5, seed=1), 40)
    ranks = [_take(TrainingSampler(5, seed=1, rank=r, world_size=2), 20) for r in range(2)]
    assert [k for pair in zip(*ranks) for k in pair] == stream
    assert _take(TrainingSampler(5, seed=1, start=13), 27) == stream[13:]
    resumed = [_take(TrainingSampler(5, seed=1, rank=r, world_size=2, start=12), 14) for r in range(2)]
    assert [k for pair in zip(*resumed) for k in pair] == stream[12:]


def test_dataloader_end_to_end(tiny):
    ds = _dataset(tiny, min_sizes=[32, 48], train=True, hflip_prob=0.5)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=2, sampler=TrainingSampler(len(ds), seed=0), collate_fn=partial(collate, pad_value=(1, 2, 3))
    )
    batch = next(iter(loader))
    assert batch.images.shape[0] == 2 and batch.images.shape[2] % 32 == 0 and batch.images.shape[3] % 32 == 0
    assert sorted(batch.image_ids) == [1, 2]


def test_nucleus_builder_split_by_position(tmp_path, capsys):
    nucleus.main(["--out", str(tmp_path), "--tile", "128", "--frames", "2", "--band", "96"])
    printed = capsys.readouterr().out
    assert "split rule" in printed
    splits = {
        s: json.loads((tmp_path / f"{s}.json").read_text())
        for s in ("train", "val", "test", "val_fields", "test_fields")
    }
    rows = {
        s: (min(i["tile_y"] for i in d["images"]), max(i["tile_y"] + i["height"] for i in d["images"]))
        for s, d in splits.items()
    }
    assert rows["train"] == (0, 700 - 2 * 96) and rows["val"] == rows["val_fields"] == (700 - 2 * 96, 700 - 96)
    assert rows["test"] == rows["test_fields"] == (700 - 96, 700)  # no pixel row of one split is in another
    assert {i["frame"] for d in splits.values() for i in d["images"]} == {0, 1}
    for split in ("val_fields", "test_fields"):  # whole-width fields, one per frame, as the microscope wrote them
        assert [(i["width"], i["height"]) for i in splits[split]["images"]] == [(1100, 96)] * 2
        raw = tifffile.imread(tmp_path / split / splits[split]["images"][0]["file_name"])
        assert raw.dtype == np.uint16 and raw.shape == (96, 1100) and raw.min() > 30000
    for split, data in splits.items():
        assert data["categories"] == [{"id": 1, "name": "nucleus", "supercategory": "cell"}]
        assert len(data["annotations"]) > 20
        info = data["images"][0]
        with Image.open(tmp_path / split / info["file_name"]) as im:
            assert im.size == (info["width"], info["height"]) and im.mode in ("I;16", "I;16B", "I;16L")
        for ann in data["annotations"][:50]:
            mask = mask_utils.decode(ann["segmentation"])
            ys, xs = np.nonzero(mask)
            assert mask.sum() == ann["area"] >= 10
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    sample = CocoInstanceDataset(str(tmp_path / "val.json"), str(tmp_path / "val"), [128], 1333, 0.0, False)[0]
    assert sample.targets.masks.shape[0] == len(sample.targets.labels) > 0
    assert (sample.targets.masks.flatten(1).sum(1) > 0).all()


@pytest.mark.skipif(not LABELME_COCO.is_dir(), reason="Debian package labelme-examples not installed")
def test_labelme_voc_photos():
    ds = CocoInstanceDataset(str(LABELME_COCO / "annotations.json"), str(LABELME_COCO), [200], 400, 0.0, False)
    assert len(ds) == 3 and ds.class_names[0] == "_background_" and "person" in ds.class_names
    total = 0
    for i in range(len(ds)):
        sample = ds[i]
        h, w = sample.input_size
        assert min(h, w) == 200 and sample.image.shape == (3, h, w)
        t = sample.targets
        assert t.masks.shape == (len(t.labels), h, w)
        areas = t.masks.flatten(1).sum(1).float()
        box_areas = (t.boxes[:, 2] - t.boxes[:, 0]) * (t.boxes[:, 3] - t.boxes[:, 1])
        assert (areas > 0).all() and (areas <= box_areas * 1.1).all()
        total += len(t.labels)
    assert total == 12


def test_microscopy_augmentation_keeps_boxes_on_their_masks(tmp_path):
    """Scale jitter, percentile jitter, flips and quarter turns on non-square raw 16-bit tiles: every box is
    still its mask's bounding box (within the resize rounding), and a quarter turn swaps the sides."""
    nucleus.build(str(tmp_path), tile=128, frames=1, band=96)
    dataset = CocoInstanceDataset(
        str(tmp_path / "val_fields.json"),
        str(tmp_path / "val_fields"),
        [96],
        1100,
        0.5,
        True,
        resize="scale",
        scales=(0.5, 2.0),
        intensity="percentile",
        percentile_low_train=(0.2, 3.0),
        percentile_high_train=(99.0, 99.95),
        vflip_prob=0.5,
        rot90_prob=0.5,
    )
    shapes = set()
    for epoch in range(8):
        sample = dataset[(0, epoch)]
        h, w = sample.input_size
        shapes.add(h > w)
        assert sample.image.shape == (3, h, w) and sample.targets.masks.shape[1:] == (h, w)
        assert 0.5 * 96 - 1 <= min(h, w) <= 2 * 96 + 1 and 0.5 * 1100 - 1 <= max(h, w) <= 2 * 1100 + 1
        for mask, box in zip(sample.targets.masks, sample.targets.boxes):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            if len(ys):
                from_mask = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
                assert (from_mask - box).abs().max() <= 2.5
    assert shapes == {True, False}  # some samples were turned a quarter


def test_scale_rule_at_test_time_keeps_native_size(tmp_path):
    nucleus.build(str(tmp_path), tile=128, frames=1, band=96)
    dataset = CocoInstanceDataset(
        str(tmp_path / "test_fields.json"),
        str(tmp_path / "test_fields"),
        [256],
        512,
        0.0,
        False,
        resize="scale",
        scales=(1.0, 1.0),
        intensity="percentile",
    )
    sample = dataset[0]
    assert sample.input_size == sample.original_size == (96, 1100)  # no shrinking to a short side of 256
    assert dataset.median_object_size() == pytest.approx(30, abs=8)  # HeLa nuclei are ~30 px across


@pytest.fixture(scope="module")
def fields(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """One frame's raw 16-bit val field (96x1100) with its nuclei."""
    root = tmp_path_factory.mktemp("fields")
    nucleus.build(str(root), tile=128, frames=1, band=96)
    return str(root / "val_fields.json"), str(root / "val_fields")


def _fields_dataset(fields: tuple[str, str], **kwargs) -> CocoInstanceDataset:
    options = {"resize": "scale", "intensity": "percentile"} | kwargs
    return CocoInstanceDataset(fields[0], fields[1], [96], 1100, 0.0, True, seed=4, **options)


def test_training_crop_is_the_window_of_the_whole_resize(fields):
    """A cropped sample is the same window of the sample resized whole: pixels within one grey level (PIL's
    rounding), masks exactly; boxes of instances the window cuts come from their visible part, and parts
    below MIN_VISIBLE_AREA image pixels are gone."""
    whole, cropped = (
        _fields_dataset(fields, scales=(3.0, 3.0)),
        _fields_dataset(fields, scales=(3.0, 3.0), crop_size=160),
    )
    kept = 0
    for epoch in range(8):
        full, part = whole[(0, epoch)], cropped[(0, epoch)]
        assert full.input_size == (288, 3300) and part.input_size == (160, 160)
        y0, x0, h, w = crop_window(288, 3300, 160, cropped._stream(0, epoch, CROP_STREAM))
        assert (part.image.int() - full.image[:, y0 : y0 + h, x0 : x0 + w].int()).abs().max() <= 1
        windows = full.targets.masks[:, y0 : y0 + h, x0 : x0 + w]
        visible = windows.flatten(1).sum(1) >= MIN_VISIBLE_AREA * 9
        assert torch.equal(part.targets.masks, windows[visible])
        assert len(part.targets.labels) == len(part.targets.boxes) == int(visible.sum())
        kept += len(part.targets.labels)
        for mask, box in zip(part.targets.masks, part.targets.boxes):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            from_mask = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
            assert (from_mask - box).abs().max() <= 1.5  # exact where cut, the resized annotation box elsewhere
            assert 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h
    assert kept > 0


def test_crop_and_photometric_off_leave_samples_as_they_were(fields):
    """A crop larger than every input and photometric changes of probability 0 draw from their own streams:
    every sample is bit-identical to the recipe without them; turning photometric changes on leaves the
    geometry (size, flips, masks) as it was."""
    geometry = {"scales": (0.5, 2.0), "vflip_prob": 0.5, "rot90_prob": 0.5, "percentile_low_train": (0.2, 3.0)}
    plain = _fields_dataset(fields, **geometry)
    inert = _fields_dataset(fields, crop_size=4096, photometric=PhotometricConfig(gamma=(0.5, 2.0)), **geometry)
    changed = _fields_dataset(fields, photometric=PhotometricConfig(noise_prob=1.0, gamma_prob=1.0), **geometry)
    for epoch in range(4):
        a, b, c = plain[(0, epoch)], inert[(0, epoch)], changed[(0, epoch)]
        assert torch.equal(a.image, b.image) and torch.equal(a.targets.boxes, b.targets.boxes)
        assert torch.equal(a.targets.masks, b.targets.masks)
        assert c.input_size == a.input_size and torch.equal(c.targets.masks, a.targets.masks)
        assert not torch.equal(c.image, a.image)


def test_wide_scale_mixture(fields):
    """With probability scales_wide_prob a factor comes from the wide range: here exactly 1x or 3x, both seen,
    the same for the same key."""
    options = {"scales": (1.0, 1.0), "scales_wide": (3.0, 3.0), "scales_wide_prob": 0.5}
    first, second = _fields_dataset(fields, **options), _fields_dataset(fields, **options)
    sizes = [first[(0, epoch)].input_size for epoch in range(16)]
    assert set(sizes) == {(96, 1100), (288, 3300)}
    assert sizes == [second[(0, epoch)].input_size for epoch in range(16)]
    with pytest.raises(ValueError, match="scales_wide"):
        _fields_dataset(fields, scales_wide_prob=0.5)


def test_new_recipe_keeps_boxes_on_masks_and_bounds_the_input(fields):
    """The nucleus recipe's wide scale jitter, 512-pixel crop and photometric changes on raw 16-bit fields:
    inputs at most 512 a side, every box its mask's bounding box, no empty mask, uint8 images."""
    data = load_config(CONFIGS / "meinst_MNV2_nucleus.yaml").data
    dataset = CocoInstanceDataset.from_config(data, *fields, train=True, seed=1)
    for epoch in range(12):
        sample = dataset[(epoch % len(dataset), epoch)]
        h, w = sample.input_size
        assert sample.image.dtype == torch.uint8 and sample.image.shape == (3, h, w) and max(h, w) <= 512
        assert sample.targets.masks.shape[1:] == (h, w)
        for mask, box in zip(sample.targets.masks, sample.targets.boxes):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert len(ys) > 0
            from_mask = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
            assert (from_mask - box).abs().max() <= 2.5


def test_old_configs_load_without_the_new_keys():
    """A checkpoint's config from before the wide jitter, crop and photometric keys validates to a recipe
    without them; the new keys are checked."""
    old = {"resize": "scale", "scale_train": [1.0, 2.25], "scale_test": 1.75, "intensity": "percentile"}
    data = DataConfig.model_validate(old)
    assert data.scale_train_wide_prob == 0.0 and data.crop_size_train is None and not data.photometric.enabled
    with pytest.raises(ValueError, match="scale_train_wide"):
        DataConfig.model_validate(old | {"scale_train_wide_prob": 0.5})
    with pytest.raises(ValueError, match="percentile"):
        DataConfig.model_validate({"photometric": {"gamma_prob": 0.5, "gamma": [0.5, 2.0]}})
    with pytest.raises(ValueError, match="gamma"):
        PhotometricConfig(gamma=(0.0, 2.0))
    with pytest.raises(ValueError, match="blur_prob"):
        PhotometricConfig(blur_prob=1.5)
