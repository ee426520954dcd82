"""Response bodies of the HTTP API (pydantic; they make the OpenAPI schema at /docs)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Literal

from pydantic import BaseModel, Field

from export.metadata import GraphMetadata
from inference.measure import Measurement
from inference.pipeline import Segmentation
from model.finishing import Instance as FinishedInstance
from model.input_contract import InputContract
from model.mask_contract import MaskFormat

# The forms of an answer's masks: the finishing formats, or "label" (a label image instead of JSON).
AnswerMaskFormat = Literal[MaskFormat, "label"]
# The file a label image comes as: a 16-bit PNG, or a TIFF (16-bit, or 32-bit above 65535 instances).
LabelFormat = Literal["png", "tiff"]
Render = Literal["json", "overlay"]


class RLE(BaseModel):
    """COCO compressed RLE; ``pycocotools.mask.decode`` gives an [H, W] mask of the original image."""

    size: tuple[int, int] = Field(description="[height, width] of the original image")
    counts: str


class Measurements(BaseModel):
    """One instance's measurements (scikit-image's regionprops on its mask and the original image's values)."""

    area: int = Field(description="mask pixels")
    centroid_x: float = Field(description="mask centroid, original image pixels (x right)")
    centroid_y: float = Field(description="mask centroid, original image pixels (y down)")
    perimeter: float = Field(description="contour length in pixels")
    eccentricity: float = Field(description="of the ellipse with the mask's second moments: 0 a circle, towards 1 long")
    mean_intensity: float = Field(description="mean of the original image's values under the mask (raw counts)")
    max_intensity: float = Field(description="max of the original image's values under the mask")


class Instance(BaseModel):
    bbox: tuple[float, float, float, float] = Field(description="[x, y, width, height] in original image pixels")
    score: float
    category_id: int = Field(description="the training dataset's category id")
    category_name: str
    area: int | None = Field(description="mask pixels; null when mask_format=none")
    segmentation: RLE | list[list[float]] | None = Field(
        description="COCO RLE (mask_format=rle), COCO polygons [[x0, y0, x1, y1, ...], ...] (polygon), or null (none)"
    )
    measurements: Measurements | None = Field(None, description="with measure=true")


class SegmentResponse(BaseModel):
    model: str
    version: str
    width: int = Field(description="original image width, after EXIF orientation")
    height: int = Field(description="original image height, after EXIF orientation")
    scale: float = Field(
        description="the factor on the model's own input size this image ran at (the request's, the one its "
        "diameter asked for, or the one scale=auto chose)"
    )
    resize_factor: float = Field(
        description="input pixels per image pixel actually applied: the model's own scale times `scale`"
    )
    diameter: float | None = Field(
        description="the object diameter (image pixels) that scale assumes: the size the model was trained on, "
        "in this image's pixels; null for models that record no object size"
    )
    score_threshold: float = Field(description="detections scoring below this were dropped")
    instances: list[Instance] = Field(description="in descending score order")
    warnings: list[str] = Field(
        default_factory=list, description="why the answer may not be what was asked or expected, in words"
    )

    @classmethod
    def from_segmentation(
        cls, segmentation: Segmentation, model: str, version: str, metadata: GraphMetadata
    ) -> SegmentResponse:
        """The answer to one image: ``segmentation``'s instances with the model's category ids and names."""
        names, ids = metadata.class_names, metadata.category_ids
        measured = segmentation.measurements or [None] * len(segmentation.instances)

        def encode(instance: FinishedInstance, measurement: Measurement | None) -> Instance:
            x0, y0, x1, y1 = instance.box
            return Instance(
                bbox=(x0, y0, x1 - x0, y1 - y0),
                score=instance.score,
                category_id=ids[instance.class_index],
                category_name=names[instance.class_index],
                area=instance.area,
                segmentation=RLE(**instance.rle) if instance.rle is not None else instance.polygons,
                measurements=Measurements(**asdict(measurement)) if measurement is not None else None,
            )

        height, width = segmentation.image_size
        return cls(
            model=model,
            version=version,
            width=width,
            height=height,
            scale=segmentation.scale,
            resize_factor=segmentation.resize_factor,
            diameter=segmentation.diameter,
            score_threshold=segmentation.score_threshold,
            instances=[encode(i, m) for i, m in zip(segmentation.instances, measured)],
            warnings=segmentation.warnings,
        )


class ErrorResponse(BaseModel):
    error: str


class TensorInfo(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    """KServe v2 model metadata plus what a client needs to read the answers."""

    name: str
    versions: list[str]
    platform: str | None
    state: Literal["loading", "ready", "failed"]
    error: str | None = None
    runtime: str | None = Field(None, description="the engine that runs the model")
    precision: str | None = Field(None, description="what the engine computes in")
    providers: list[str] = []
    method: str | None = None
    mask_kind: str | None = None
    class_names: list[str] = []
    category_ids: list[int] = []
    score_threshold: float | None = Field(None, description="the graph's candidate threshold")
    recommended_score_threshold: float | None = Field(
        None, description="what /segment's score_threshold defaults to: chosen on the model's validation split"
    )
    expected_diameter: float | None = Field(
        None,
        description="the object diameter (image pixels) the model expects at its own scale: images whose objects "
        "differ need scale=auto, a diameter, or a scale",
    )
    object_density: float | None = Field(None, description="objects per input megapixel of its training images")
    mask_threshold: float | None = None
    max_detections: int | None = None
    min_size: int | None = Field(None, description="shorter side after resize")
    max_size: int | None = Field(None, description="longer side at most")
    buckets: list[tuple[int, int]] = Field([], description="padded input shapes [H, W] that batches run at")
    input: InputContract | None = Field(
        None, description="how the model reads an image: its intensity rule, size rule (and scale), padding"
    )
    inputs: list[TensorInfo] = []
    outputs: list[TensorInfo] = []


class ModelList(BaseModel):
    models: list[ModelMetadata]


class Liveness(BaseModel):
    live: bool


class Readiness(BaseModel):
    ready: bool
    models: dict[str, Literal["loading", "ready", "failed"]] = Field(description="state of each model")
