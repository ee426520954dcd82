"""The HTTP routes: ``POST /segment``, ``POST /display``, KServe v2 health and model metadata, ``/models`` and
``/metrics``.

Every route gets the app's ``SegmentService`` through the ``get_service`` dependency (FastAPI ``Depends``);
the routes only parse parameters and shape answers, the service does the work. Three routers, so that the
app can put API keys (``service.security``) on the ones that use or describe the models (``protected``) and,
by a setting of its own, on ``/metrics`` (``metrics_router``), while probes stay open (``router``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from inference.pipeline import DEFAULT_SCALE_HELP, SegmentOptions
from model.input_contract import parse_scale
from service.body import Body
from service.kserve import model_metadata as describe
from service.models import ModelEntry
from service.schemas import (
    AnswerMaskFormat,
    ErrorResponse,
    LabelFormat,
    Liveness,
    ModelList,
    ModelMetadata,
    Readiness,
    Render,
    SegmentResponse,
)
from service.segment_service import SegmentRequest, SegmentService

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "corrupt or truncated image, or a malformed body",
        401: "missing or invalid API key (when keys are configured; see WWW-Authenticate)",
        404: "unknown model",
        413: "body over max_body_bytes, or image over max_image_pixels",
        415: "not a JPEG, PNG, WebP, BMP or TIFF image",
        422: "invalid query parameter, render=overlay with mask_format polygon or label, label_format without "
        "mask_format=label, scale=auto or a diameter for a model without a recorded object size, scale and "
        "diameter together, or pixels the model cannot read (a stack, a missing channel)",
        500: "the runtime failed",
        503: "queue full or model not ready (see Retry-After)",
        504: "the request waited past its deadline",
    }.items()
}
IMAGE_BODY = {"schema": {"type": "string", "format": "binary"}}
SEGMENT_BODY = {
    "requestBody": {
        "required": True,
        "description": "the image as the raw body, or as the multipart field `file`",
        "content": {
            **{t: IMAGE_BODY for t in ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/tiff")},
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": IMAGE_BODY}, "required": ["file"]}
            },
        },
    }
}

SEGMENT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "JSON (default); with `render=overlay` the image with the instances drawn (PNG, 8-bit "
        "RGB); with `mask_format=label` a greyscale label image (0 background, instance i = i in score order, the "
        "higher score keeps overlapping pixels): a 16-bit PNG, or with `label_format=tiff` a TIFF (16-bit, 32-bit "
        "above 65535 instances). Picture answers carry the instance count in `X-Instances`.",
        "content": {"image/png": IMAGE_BODY, "image/tiff": IMAGE_BODY},
        "headers": {
            "X-Instances": {"description": "number of instances (picture answers)", "schema": {"type": "integer"}}
        },
    },
    **ERROR_RESPONSES,
}
DISPLAY_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the image as the model reads it, at its own size: an 8-bit PNG, grey for microscopy "
        "models (their percentile and channel rule), RGB for photo models",
        "content": {"image/png": IMAGE_BODY},
    },
    **{status: ERROR_RESPONSES[status] for status in (400, 401, 404, 413, 415, 422, 503)},
}

router = APIRouter()  # open: health and readiness probes
protected = APIRouter()  # behind API keys when keys are configured
metrics_router = APIRouter()  # behind API keys when metrics_require_key is set too


def get_service(request: Request) -> SegmentService:
    """The app's service (created by ``service.app.create_app``)."""
    return request.app.state.service


Service = Annotated[SegmentService, Depends(get_service)]


def entry_or_404(service: Service, name: str) -> ModelEntry:
    """The configured model ``name`` (the path parameter), or 404."""
    entry = service.registry.entries.get(name)
    if entry is None:
        raise StarletteHTTPException(404, f"unknown model {name!r}")
    return entry


Entry = Annotated[ModelEntry, Depends(entry_or_404)]


ModelQuery = Annotated[str | None, Query(description="model name (GET /models); default: the first configured")]
ChannelQuery = Annotated[
    int | None,
    Query(
        ge=0,
        le=3,
        description="microscopy models: the channel of a multi-channel image to segment "
        "(default: the mean of its colour channels)",
    ),
]


def scale_query(text: str | None) -> float | Literal["auto"] | None:
    """The ``scale`` query parameter (``parse_scale``); a 422 that says why for anything else."""
    if text is None:
        return None
    try:
        return parse_scale(text)
    except ValueError as error:
        raise RequestValidationError([{"loc": ("query", "scale"), "msg": str(error), "type": "value_error"}]) from None


@protected.post("/segment", response_model=SegmentResponse, responses=SEGMENT_RESPONSES, openapi_extra=SEGMENT_BODY)
async def segment(
    body: Body,
    service: Service,
    model: ModelQuery = None,
    score_threshold: Annotated[
        float | None,
        Query(
            ge=0,
            le=1,
            description="drop detections scoring below this (default: the model's recommended_score_threshold, "
            "GET /v2/models/{name})",
        ),
    ] = None,
    max_detections: Annotated[
        int | None, Query(ge=1, le=10000, description="keep at most this many (highest scores)")
    ] = None,
    mask_format: Annotated[
        AnswerMaskFormat,
        Query(description="rle (COCO compressed), polygon, none (boxes only), or label (answer a label image)"),
    ] = "rle",
    label_format: Annotated[
        LabelFormat,
        Query(
            description="with mask_format=label: png (16-bit) or tiff (16-bit, 32-bit above 65535 instances), "
            "both read by Fiji, napari and scikit-image"
        ),
    ] = "png",
    timeout_ms: Annotated[
        float | None, Query(gt=0, description="a deadline shorter than the server's request_timeout_s")
    ] = None,
    render: Annotated[
        Render, Query(description="json, or overlay: answer the image with the instances drawn (PNG)")
    ] = "json",
    scale: Annotated[
        str | None,
        Query(
            description=(
                f"a factor on the model's own input size, 0.1 to 10 (e.g. 0.5 for images at twice the training "
                "magnification), or 'auto' to estimate it from a first pass (models that record their training "
                f"object size); default {DEFAULT_SCALE_HELP}, unless a diameter is given"
            ),
            examples=["1", "0.5", "auto"],
        ),
    ] = None,
    diameter: Annotated[
        float | None,
        Query(
            gt=0,
            description="instead of a scale: the typical object diameter in this image's pixels; the model is "
            "run at the scale that brings it to the size it was trained on (its expected_diameter, "
            "GET /v2/models/{name})",
        ),
    ] = None,
    measure: Annotated[
        bool,
        Query(
            description="per-instance measurements in the JSON: area, centroid, perimeter, eccentricity, mean and "
            "max intensity of the original image"
        ),
    ] = False,
    channel: ChannelQuery = None,
) -> Response:
    """Segment one image: instances with boxes, scores, categories and masks in original image pixels, as
    JSON, as a label image or drawn over the image."""
    limit = service.settings.request_timeout_s
    timeout_s = limit if timeout_ms is None else min(timeout_ms / 1000, limit)
    options = SegmentOptions(
        score_threshold=score_threshold,
        max_detections=max_detections,
        mask_format="rle" if mask_format == "label" else mask_format,  # labels are painted from RLE
        scale=scale_query(scale),
        diameter=diameter,
        channel=channel,
        measure=measure,
    )
    request = SegmentRequest(options, mask_format, timeout_s, render, label_format)
    return await service.segment(body, model, request)


@protected.post("/display", response_class=Response, responses=DISPLAY_RESPONSES, openapi_extra=SEGMENT_BODY)
async def display(body: Body, service: Service, model: ModelQuery = None, channel: ChannelQuery = None) -> Response:
    """The image as the model reads it (its intensity rule: a raw 16-bit, 12-bit or float microscopy field
    stretched by its percentiles; its channel rule; EXIF orientation), as an 8-bit PNG at the image's own size,
    so that a page can draw what the model saw under the masks `POST /segment` answers. Nothing is segmented."""
    return await service.display(body, model, channel)


@router.get("/v2/health/live", response_model=Liveness)
async def live() -> Liveness:
    return Liveness(live=True)


@router.get("/v2/health/ready", response_model=Readiness, responses={503: {"model": Readiness}})
async def ready(service: Service) -> JSONResponse:
    """200 only when every configured model is loaded and warmed up, and the server neither drains nor stops."""
    states = {name: entry.state for name, entry in service.registry.entries.items()}
    body = Readiness(ready=service.ready, models=states).model_dump()
    return JSONResponse(body, status_code=200 if service.ready else 503)


@protected.get("/v2/models/{name}", response_model=ModelMetadata, responses={404: {"model": ErrorResponse}})
async def model_metadata(service: Service, entry: Entry) -> ModelMetadata:
    return describe(entry)


@router.get(
    "/v2/models/{name}/ready",
    response_model=Readiness,
    responses={404: {"model": ErrorResponse}, 503: {"model": Readiness}},
)
async def model_ready(service: Service, entry: Entry) -> JSONResponse:
    is_ready = entry.state == "ready" and service.accepting
    body = Readiness(ready=is_ready, models={entry.spec.name: entry.state}).model_dump()
    return JSONResponse(body, status_code=200 if is_ready else 503)


@protected.get("/models", response_model=ModelList)
async def models(service: Service) -> ModelList:
    return ModelList(models=[describe(entry) for entry in service.registry.entries.values()])


@metrics_router.get("/metrics", response_class=Response)
async def metrics(service: Service) -> Response:
    """Prometheus exposition (text format)."""
    return Response(service.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
