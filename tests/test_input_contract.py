"""The one input contract: graphs and checkpoints made before it existed still read, and it rejects nonsense."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from export.metadata import GraphMetadata
from export.onnx_export import build_metadata
from inference.pipeline import ImagePipeline, SegmentOptions
from inference.scale import estimate_scale
from model.checkpoint import load_checkpoint
from model.config import Config
from model.input_contract import InputContract, check_scale
from model.intensity import load_rgb
from tests.conftest import VOC_COCO

BUNDLED = Path(__file__).resolve().parent.parent / "models"
# The metadata record of an EmbedMask graph exported before the contract had its own type (format 1).
EXPORTED_BEFORE = (
    '{"format_version":1,"method":"embedmask","mask_kind":"logprob_s4","class_names":["nucleus"],'
    '"category_ids":[1],"score_threshold":0.05,"nms_threshold":0.6,"max_detections":100,"pre_nms_topk":1000,'
    '"strides":[8,16,32,64,128],"mask_threshold":0.53,"mask_size":null,"mask_stride":4,"box_padding":2,'
    '"input":{"layout":"NCHW","dtype":"uint8","color":"RGB","size_divisibility":32,"min_size":256,"max_size":512,'
    '"pad_value":[124,116,104]},"input_name":"images","output_names":["num_dets","boxes","scores","classes","masks"]}'
)


def test_metadata_exported_before_reads_with_the_same_contract() -> None:
    metadata = GraphMetadata.from_json(EXPORTED_BEFORE)
    contract = metadata.input
    assert isinstance(contract, InputContract)
    assert (contract.min_size, contract.max_size, contract.size_divisibility) == (256, 512, 32)
    assert contract.pad_value == [124, 116, 104]
    # Written again, the old fields keep their names and values, so older readers still read new graphs.
    assert GraphMetadata.from_json(metadata.to_json()) == metadata
    assert set(metadata.model_dump()["input"]) >= {"size_divisibility", "min_size", "max_size", "pad_value"}


@pytest.mark.parametrize("name", ["meinst_nucleus", "embedmask_nucleus"])
def test_bundled_checkpoints_give_their_config_test_size(name: str) -> None:
    """A checkpoint saved before the contract existed yields the contract its config describes."""
    checkpoint = load_checkpoint(BUNDLED / name / "model.pt")
    cfg = Config.model_validate(checkpoint["config"])
    contract = InputContract.from_config(cfg)
    assert (contract.min_size, contract.max_size, contract.size_divisibility) == (256, 512, 32)
    assert contract.pad_value == [round(m) for m in cfg.model.pixel_mean]
    assert build_metadata(cfg, checkpoint).input.model_copy(update={"object_size": None}) == contract


def test_resize_keeps_the_short_side_rule_and_the_pixels() -> None:
    contract = InputContract(size_divisibility=32, min_size=256, max_size=512, pad_value=[0, 0, 0])
    image = Image.new("RGB", (1000, 100), (10, 200, 30))  # wide: the long side cap wins over the short side
    pixels = contract.resize_image(image)
    assert pixels.shape == (3, 51, 512) and pixels.dtype == np.uint8
    assert contract.resized_shape(100, 1000) == (51, 512)
    assert (pixels[:, 25, 256] == [10, 200, 30]).all()


def test_sixteen_bit_grey_is_rescaled_not_clipped() -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4), 65535 // 2, dtype=np.uint16)).save(buffer, format="PNG")
    buffer.seek(0)
    rgb = load_rgb(buffer)
    assert rgb.mode == "RGB" and np.asarray(rgb)[0, 0].tolist() == [127, 127, 127]


@pytest.mark.parametrize(
    "fields",
    [
        {"pad_value": [124, 116]},  # not RGB
        {"size_divisibility": 0},
        {"min_szie": 256},  # a typo is an error, never silently ignored
    ],
)
def test_bad_contracts_are_rejected(fields: dict) -> None:
    valid = {"size_divisibility": 32, "min_size": 256, "max_size": 512, "pad_value": [124, 116, 104]}
    with pytest.raises(ValidationError):
        InputContract(**{**valid, **fields})


def microscopy_contract(**fields) -> InputContract:
    base = {
        "size_divisibility": 32,
        "min_size": 256,
        "max_size": 512,
        "pad_value": [124, 116, 104],
        "resize": "scale",
        "scale": 1.0,
        "intensity": "percentile",
        "object_size": 30.0,
    }
    return InputContract(**{**base, **fields})


def test_scale_rule_keeps_native_size_and_multiplies_by_the_callers_scale() -> None:
    contract = microscopy_contract()
    assert contract.resized_shape(700, 1100) == (700, 1100)  # a whole field is not shrunk to a short side of 256
    assert contract.resized_shape(700, 1100, scale=0.5) == (350, 550)
    assert microscopy_contract(scale=2.0).resized_shape(3, 5, scale=0.5) == (3, 5)
    assert contract.resized_shape(1, 1, scale=0.1) == (1, 1)  # never zero pixels
    photo = InputContract(size_divisibility=32, min_size=256, max_size=512, pad_value=[0, 0, 0])
    assert photo.resized_shape(100, 100, scale=2.0) == (512, 512)  # the photo rule's size times the scale
    pixels = contract.resize_image(np.zeros((7, 9, 3), np.uint8), scale=2.0)
    assert pixels.shape == (3, 14, 18)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf"), 0.05, 11.0])
def test_unusable_scales_are_refused_with_a_reason(scale: float) -> None:
    with pytest.raises(ValueError, match="scale must be a number from 0.1 to 10"):
        check_scale(scale)


def test_auto_scale_brings_the_median_object_to_the_training_size() -> None:
    """Nuclei twice as large as in training (60 px boxes, 2x magnification) ask for scale 0.5; too few
    confident detections, or a checkpoint without an object size, keep the caller's scale."""
    contract = microscopy_contract()
    boxes = np.array([[10, 10, 70, 70], [100, 100, 160, 160], [200, 10, 260, 70], [0, 0, 5, 5]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    assert estimate_scale(contract, boxes, scores, (400, 400)) == (pytest.approx(0.5), False)
    assert estimate_scale(contract, boxes[:2], scores[:2], (400, 400)) is None
    assert estimate_scale(microscopy_contract(object_size=None), boxes, scores, (400, 400)) is None
    tiny = np.array([[0, 0, 1, 1]] * 3, np.float32)
    assert estimate_scale(contract, tiny, np.ones(3), (400, 400)) == (10.0, True)  # clamped to the accepted range


def test_every_entry_point_sizes_images_by_the_contract_at_any_scale() -> None:
    """The pipeline (which the service, evaluation and the predict CLI all run) feeds the model the sizes the
    contract gives (no rounding of its own), here on the VOC photos at a scale whose short side is fractional
    (256 x 0.3 = 76.8), each padded into the smallest bucket that holds it."""
    contract = InputContract(size_divisibility=32, min_size=256, max_size=512, pad_value=[124, 116, 104])
    cfg = Config.model_validate(load_checkpoint(BUNDLED / "meinst_nucleus" / "model.pt")["config"])
    metadata = build_metadata(cfg, {"class_names": ["nucleus"], "category_ids": [1]}).model_copy(
        update={"input": contract}
    )
    pipeline = ImagePipeline(metadata)
    photos = sorted(VOC_COCO.glob("JPEGImages/*.jpg"))
    assert len(photos) == 3
    for path in photos:
        image = pipeline.decode(path.read_bytes()).rgb
        step = pipeline.plan(image, 0.3, SegmentOptions(scale=0.3), 0.0)
        size = contract.resized_shape(*image.shape[:2], scale=0.3)
        assert step.plan is None and step.inputs[0].shape[1:] == size
        assert step.bucket == min(
            (b for b in pipeline.buckets if b[0] >= size[0] and b[1] >= size[1]), key=lambda b: b[0] * b[1]
        )
