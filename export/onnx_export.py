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

from export.metadata import DETECTION_OUTPUTS, INPUT_NAME, MASK_OUTPUT, GraphMetadata, embed_onnx_metadata
from model.config import Config
from model.detector import OneStageDetector
from model.input_contract import InputContract
from model.methods import mask_method_class

DEFAULT_OPSET = 17


def build_metadata(cfg: Config, checkpoint_metadata: dict[str, Any]) -> GraphMetadata:
    """The record for a model built from ``cfg``; class names and category ids come from the checkpoint.

    Missing names fall back to the config's, then to ``class_<i>``; missing ids to ``1..C`` (COCO style).
    """
    model = cfg.model
    num_classes = model.num_classes
    class_names = list(
        checkpoint_metadata.get("class_names") or model.class_names or [f"class_{i}" for i in range(num_classes)]
    )
    category_ids = [int(c) for c in (checkpoint_metadata.get("category_ids") or range(1, num_classes + 1))]
    if len(class_names) != num_classes or len(category_ids) != num_classes:
        raise ValueError(
            f"{len(class_names)} class names and {len(category_ids)} category ids for a model of {num_classes} classes"
        )
    method = mask_method_class(model.method)
    mask_fields = method.graph_fields(model) if method is not None else {"mask_kind": None, "mask_threshold": None}
    outputs = [*DETECTION_OUTPUTS, *([MASK_OUTPUT] if method is not None else [])]
    return GraphMetadata(
        method=model.method,
        class_names=class_names,
        category_ids=category_ids,
        score_threshold=model.head.score_threshold,
        recommended_score_threshold=checkpoint_metadata.get("recommended_score_threshold"),
        object_density=checkpoint_metadata.get("object_density"),
        cpu_precision=checkpoint_metadata.get("cpu_precision"),
        nms_threshold=model.head.nms_threshold,
        max_detections=model.head.max_detections,
        pre_nms_topk=model.head.pre_nms_topk,
        strides=list(model.head.strides),
        input=InputContract.from_config(cfg, checkpoint_metadata.get("object_size")),
        output_names=outputs,
        **mask_fields,
    )


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
    """B, H, W on the input; every output follows B, and the masks whatever their method says."""
    axes: dict[str, dict[int, str]] = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}}
    axes.update({name: {0: "batch"} for name in DETECTION_OUTPUTS})
    if model.mask_method is not None:
        axes[MASK_OUTPUT] = model.mask_method.mask_axes(model.cfg).dynamic
    return axes


def _set_static_dims(graph: onnx.GraphProto, model: OneStageDetector) -> None:
    """Write the fixed output dims the tracer could not infer (K, boxes' 4, the masks' fixed axes)."""
    k = model.cfg.head.max_detections
    static = {"boxes": {1: k, 2: 4}, "scores": {1: k}, "classes": {1: k}}
    if model.mask_method is not None:
        static[MASK_OUTPUT] = model.mask_method.mask_axes(model.cfg).static
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
    if model.mask_method is not None:
        model.mask_method.check_exportable()
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
