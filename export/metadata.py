"""The metadata record that travels with an exported graph (ONNX ``metadata_props``, engine sidecar, Triton).

A runtime needs more than the graph to turn its outputs into instances: the method and mask kind (how to
finish masks), the thresholds, the class names and dataset ids, and the input contract
(``model.input_contract.InputContract``: uint8 RGB NCHW, the resize rule, H and W multiples of 32 and the
padding value). One JSON record carries all of it (docs/graph-contract.md, Metadata); it is built at export
(``export.onnx_export.build_metadata``) and read here without torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import onnx
from pydantic import BaseModel, ConfigDict

from model.input_contract import InputContract
from model.mask_contract import MaskKind

METADATA_KEY = "onestage"
FORMAT_VERSION = 1
INPUT_NAME = "images"
DETECTION_OUTPUTS = ("num_dets", "boxes", "scores", "classes")
MASK_OUTPUT = "masks"
# Node names carry the module path under this attribute of ``export.onnx_export.GraphModule`` ("/model/backbone/...").
WRAPPED_NAME = "model"
# What a graph computes in on a CPU with bf16 (OpenVINO), from the fastest to the most exact: every operation
# the CPU plugin lowers in bf16; bf16 but the mask decode in fp32 (the operations only the masks output needs,
# after the last convolution: EmbedMask's embeddings, coupling and log-probabilities, MEInst's codec); bf16 but
# the whole mask branch in fp32 (its convolutions too); fp32 throughout. ``export.openvino_runtime`` applies it.
CpuPrecision = Literal["bf16", "bf16+fp32_mask_decode", "bf16+fp32_mask_branch", "fp32"]
CPU_PRECISIONS: tuple[CpuPrecision, ...] = ("bf16", "bf16+fp32_mask_decode", "bf16+fp32_mask_branch", "fp32")


class GraphMetadata(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    method: Literal["fcos", "meinst", "embedmask"]
    mask_kind: MaskKind | None  # None: boxes only (plain FCOS)
    class_names: list[str]
    category_ids: list[int]  # dataset id of each contiguous class index
    score_threshold: float  # the graph's candidate threshold (what it returns at all)
    # The threshold answers default to, chosen on the validation split (best F1); None in graphs exported before
    # checkpoints recorded one (callers then use inference.pipeline.FALLBACK_SCORE_THRESHOLD).
    recommended_score_threshold: float | None = None
    # Objects per input megapixel of the training images (95th percentile, at the contract's size), for the
    # answers' density warning; None in graphs exported before.
    object_density: float | None = None
    # The precision chosen for this model on a bf16 CPU by a measured check on its validation split
    # (``training.precision``); None: not measured (the runtime's default applies).
    cpu_precision: CpuPrecision | None = None
    nms_threshold: float
    max_detections: int
    pre_nms_topk: int  # candidates per FPN level before NMS
    strides: list[int]  # FPN levels
    mask_threshold: float | None  # probability; EmbedMask compares log p with log(threshold)
    mask_size: int | None = None  # MEInst box-relative mask side (28)
    mask_stride: int | None = None  # EmbedMask map stride (4)
    box_padding: int | None = None  # EmbedMask crop around each box, in stride-4 cells
    input: InputContract  # the field name of graphs already exported
    input_name: str = INPUT_NAME
    output_names: list[str]

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> GraphMetadata:
        return cls.model_validate_json(text)


def embed_onnx_metadata(model: onnx.ModelProto, metadata: GraphMetadata) -> None:
    """Store the record as one JSON entry of ``metadata_props`` (replacing an earlier one)."""
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=METADATA_KEY, value=metadata.to_json())


def read_onnx_metadata(path: str | Path) -> GraphMetadata:
    """The record embedded in an exported ``.onnx`` file (weights are not loaded)."""
    model = onnx.load(str(path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return GraphMetadata.from_json(prop.value)
    raise ValueError(f"{path} carries no {METADATA_KEY!r} metadata: export it with `python -m export`")


def engine_sidecar_path(engine_path: str | Path) -> Path:
    """``model.plan`` -> ``model.plan.json``: the record beside a TensorRT engine (engines hold no metadata)."""
    return Path(f"{engine_path}.json")


def write_engine_sidecar(engine_path: str | Path, metadata: GraphMetadata, build_info: dict[str, Any]) -> Path:
    """Write the record and how the engine was built (TensorRT version, GPU, profile, precision)."""
    path = engine_sidecar_path(engine_path)
    path.write_text(json.dumps({"metadata": metadata.model_dump(), "tensorrt": build_info}, indent=2))
    return path


def read_engine_sidecar(engine_path: str | Path) -> tuple[GraphMetadata, dict[str, Any]]:
    path = engine_sidecar_path(engine_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: build engines with `python -m export --format tensorrt`")
    record = json.loads(path.read_text())
    return GraphMetadata.model_validate(record["metadata"]), record["tensorrt"]
