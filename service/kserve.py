"""``GET /v2/models/{name}``: KServe v2 model metadata, plus what a client needs to read the answers (classes,
thresholds, the input contract, the shape buckets) and how the model runs (engine, precision, providers)."""

from __future__ import annotations

from service.models import ModelEntry
from service.schemas import ModelMetadata, TensorInfo

# The platform name Triton's model metadata gives each engine's models.
TRITON_PLATFORMS: dict[str, str] = {
    "onnxruntime": "onnxruntime_onnx",
    "openvino": "openvino_onnx",
    "tensorrt": "tensorrt_plan",
    "torch": "pytorch_libtorch",
}
FLOAT_OUTPUTS = ("boxes", "scores", "masks")


def model_metadata(entry: ModelEntry) -> ModelMetadata:
    """The metadata of a configured model; only its name and state while it loads or after it failed."""
    worker = entry.worker
    if worker is None:
        return ModelMetadata(name=entry.spec.name, versions=[], platform=None, state=entry.state, error=entry.error)
    opened, pipeline = worker.opened, worker.pipeline
    meta = opened.metadata
    shapes = {
        "num_dets": [-1],
        "boxes": [-1, meta.max_detections, 4],
        "scores": [-1, meta.max_detections],
        "classes": [-1, meta.max_detections],
        "masks": [-1, meta.max_detections, meta.mask_size or -1, meta.mask_size or -1],
    }
    return ModelMetadata(
        name=entry.spec.name,
        versions=[opened.version],
        platform=TRITON_PLATFORMS[opened.engine],
        state=entry.state,
        error=entry.error,
        runtime=opened.engine,
        precision=opened.precision,
        providers=opened.providers,
        method=meta.method,
        mask_kind=meta.mask_kind,
        class_names=meta.class_names,
        category_ids=meta.category_ids,
        score_threshold=meta.score_threshold,
        recommended_score_threshold=pipeline.score_threshold,
        expected_diameter=pipeline.expected_diameter,
        object_density=meta.object_density,
        mask_threshold=meta.mask_threshold,
        max_detections=meta.max_detections,
        min_size=meta.input.min_size,
        max_size=meta.input.max_size,
        input=meta.input,
        buckets=pipeline.buckets,
        inputs=[TensorInfo(name=meta.input_name, datatype="UINT8", shape=[-1, 3, -1, -1])],
        outputs=[
            TensorInfo(name=name, datatype="FP32" if name in FLOAT_OUTPUTS else "INT64", shape=shapes[name])
            for name in meta.output_names
        ],
    )
