"""The one input contract: graphs and checkpoints made before it existed still read, and it rejects nonsense."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from export.metadata import GraphMetadata
from model.checkpoint import load_checkpoint
from model.config import Config
from model.input_contract import InputContract, load_rgb
from training.evaluate import EvalSpec

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
    assert EvalSpec.from_config(cfg, checkpoint["category_ids"]).input == contract


def test_resize_keeps_the_short_side_rule_and_the_pixels() -> None:
    contract = InputContract(size_divisibility=32, min_size=256, max_size=512, pad_value=[0, 0, 0])
    image = Image.new("RGB", (1000, 100), (10, 200, 30))  # wide: the long side cap wins over the short side
    pixels = contract.resize(image)
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
