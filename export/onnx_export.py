"""Lower an eager detector to one fused ONNX graph: pixels in, padded detections and masks out.

The detector's inference path (``model.inference`` and the methods' ``masks``) is already written as dense
tensor ops, so the legacy TorchScript exporter traces it whole; torchvision's ``nms`` becomes ONNX
``NonMaxSuppression`` (the dynamo exporter cannot lower it). Only B, H and W are dynamic.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from export.metadata import DETECTION_OUTPUTS, INPUT_NAME, MASK_OUTPUT, GraphMetadata, build_metadata, embed_onnx_metadata
from model.config import Config
from model.detector import OneStageDetector

DEFAULT_OPSET = 17


class GraphModule(nn.Module):
    """The detector with the graph contract's outputs as a tuple (num_dets, boxes, scores, classes[, masks])."""

    def __init__(self, model: OneStageDetector) -> None:
        super().__init__()
        self.model = model
        self.with_masks = model.mask_method is not None

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        detections = self.model(images)
        outputs = (detections.num_dets, detections.boxes, detections.scores, detections.classes)
        return (*outputs, detections.masks) if self.with_masks else outputs


def _dynamic_axes(model: OneStageDetector) -> dict[str, dict[int, str]]:
    """B, H, W on the input; every output follows B, EmbedMask's masks also H/4 and W/4."""
    axes: dict[str, dict[int, str]] = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}}
    axes.update({name: {0: "batch"} for name in DETECTION_OUTPUTS})
    if model.cfg.method == "meinst":
        axes[MASK_OUTPUT] = {0: "batch"}
    elif model.cfg.method == "embedmask":
        axes[MASK_OUTPUT] = {0: "batch", 2: "height_4", 3: "width_4"}
    return axes


def _set_static_dims(graph: onnx.GraphProto, model: OneStageDetector) -> None:
    """Write the fixed output dims the tracer could not infer (boxes' 4, MEInst's mask size)."""
    k = model.cfg.head.max_detections
    static = {"boxes": {1: k, 2: 4}, "scores": {1: k}, "classes": {1: k}}
    if model.cfg.method == "meinst":
        size = model.cfg.meinst.mask_size
        static[MASK_OUTPUT] = {1: k, 2: size, 3: size}
    elif model.cfg.method == "embedmask":
        static[MASK_OUTPUT] = {1: k}
    for output in graph.output:
        for axis, value in static.get(output.name, {}).items():
            output.type.tensor_type.shape.dim[axis].dim_value = value


def export_onnx(
    model: OneStageDetector,
    cfg: Config,
    checkpoint_metadata: dict[str, Any],
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    sample_shape: tuple[int, int, int, int] = (2, 3, 128, 160),
) -> GraphMetadata:
    """Export ``model`` to ``path`` with the metadata record embedded; returns the record.

    The model is moved to the CPU and put in eval mode (tracing runs there). ``sample_shape`` is only the
    tracing input: the graph takes any B and any H, W multiples of 32.
    """
    if cfg.model.method == "meinst":
        model.mask_method.codec.require_fitted()
    metadata = build_metadata(cfg, checkpoint_metadata)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = GraphModule(model).cpu().eval()
    sample = torch.randint(0, 256, sample_shape, dtype=torch.uint8)
    with torch.no_grad(), warnings.catch_warnings():
        # The legacy exporter is chosen on purpose: it lowers torchvision's nms to NonMaxSuppression.
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message="The feature will be removed")
        # F.group_norm's eager-only batch-size check; the graph does not depend on it.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module="torch.nn.functional")
        torch.onnx.export(
            wrapper,
            (sample,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=metadata.output_names,
            dynamic_axes=_dynamic_axes(model),
        )
    graph = onnx.load(str(path))
    _set_static_dims(graph.graph, model)
    embed_onnx_metadata(graph, metadata)
    onnx.checker.check_model(graph, full_check=True)
    onnx.save(graph, str(path))
    return metadata
