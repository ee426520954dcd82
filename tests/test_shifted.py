"""The CHO test set and the val tuning sets from other microscopes (training.shifted)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from pycocotools import mask as mask_utils

from training import nucleus, shifted

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def test_cho_test_set(tmp_path: Path) -> None:
    summary = shifted.build_cho(str(tmp_path))
    data = json.loads((tmp_path / "cho.json").read_text())
    assert summary == {"images": 5, "instances": len(data["annotations"])} and 40 <= summary["instances"] <= 60
    assert [(i["frame"], i["z"], i["height"], i["width"]) for i in data["images"]] == [
        (t, 2, 443, 512) for t in (0, 4, 8, 12, 16)
    ]
    source = tifffile.imread(nucleus.resource(shifted.CHO_IMAGES))
    sides = []
    for info in data["images"]:
        plane = tifffile.imread(tmp_path / "cho" / info["file_name"])
        assert plane.dtype == np.uint8 and np.array_equal(plane, source[info["frame"], 2])  # as the microscope wrote it
        masks = [mask_utils.decode(a["segmentation"]) for a in data["annotations"] if a["image_id"] == info["id"]]
        # The labels belong to this plane: nuclei are several times brighter than the background.
        foreground = np.any(masks, axis=0)
        assert plane[foreground].mean() > 4 * plane[~foreground].mean()
        sides += [np.sqrt(a["bbox"][2] * a["bbox"][3]) for a in data["annotations"] if a["image_id"] == info["id"]]
    assert 60 < np.median(sides) < 80  # CHO nuclei are about 69 px across
    with pytest.raises(ValueError, match="z-planes"):
        shifted.middle_planes(np.zeros((5, 20, 4, 4)), np.zeros((5, 20, 4, 4)), (0,))


def test_val_tuning_sets(tmp_path: Path) -> None:
    nucleus.build(str(tmp_path / "nucleus"), tile=128, frames=1, band=96)
    fields = tmp_path / "nucleus" / "val_fields.json"
    names = ("x0.5", "x3", "blur2", "uint8", "x0.5_poisson100")
    sets = tuple(s for s in shifted.DEFAULT_SETS if s.name in names)
    summary = shifted.build_shifted(str(fields), str(tmp_path / "out"), sets)
    assert set(summary) == set(names)
    source = json.loads(fields.read_text())
    raw = tifffile.imread(tmp_path / "nucleus" / "val_fields" / source["images"][0]["file_name"])
    for spec in sets:
        data = json.loads((tmp_path / "out" / f"{spec.name}.json").read_text())
        info = data["images"][0]
        pixels = tifffile.imread(tmp_path / "out" / spec.name / info["file_name"])
        expected = (round(96 * spec.magnification), round(1100 * spec.magnification))
        assert pixels.shape == (info["height"], info["width"]) == expected
        assert pixels.dtype == (np.uint8 if spec.uint8 else np.uint16)
        assert summary[spec.name]["instances"] == len(data["annotations"]) > 0.9 * len(source["annotations"])
        for ann in data["annotations"]:
            mask = mask_utils.decode(ann["segmentation"])
            assert mask.shape == expected and mask.sum() == ann["area"] > 0
    blurred = tifffile.imread(tmp_path / "out" / "blur2" / source["images"][0]["file_name"])
    assert blurred.dtype == raw.dtype and blurred.astype(float).std() < raw.astype(float).std()
    recorded = json.loads((tmp_path / "out" / "sets.json").read_text())
    assert [s["name"] for s in recorded["sets"]] == list(names)
    with pytest.raises(SystemExit):
        shifted.main(["val", "--fields", str(tmp_path / "nucleus" / "test_fields.json"), "--out", str(tmp_path / "t")])
