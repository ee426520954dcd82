"""The HTTP routes: ``POST /segment``, KServe v2 health and model metadata, ``/models`` and ``/metrics``.

Every route gets the app's ``SegmentService`` through the ``get_service`` dependency (FastAPI ``Depends``);
the routes only parse parameters and shape answers, the service does the work.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.mask_contract import MaskFormat
from service.models import ModelEntry
from service.schemas import ErrorResponse, Liveness, ModelList, ModelMetadata, Readiness, SegmentResponse
from service.segment_service import SegmentOptions, SegmentService

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "corrupt or truncated image, or a malformed body",
        404: "unknown model",
        413: "body over max_body_bytes, or image over max_image_pixels",
        415: "not a JPEG, PNG, WebP, BMP or TIFF image",
        422: "invalid query parameter",
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

router = APIRouter()


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


@router.post("/segment", response_model=SegmentResponse, responses=ERROR_RESPONSES, openapi_extra=SEGMENT_BODY)
async def segment(
    request: Request,
    service: Service,
    model: Annotated[str | None, Query(description="model name (GET /models); default: the first configured")] = None,
    score_threshold: Annotated[float, Query(ge=0, le=1, description="drop detections scoring below this")] = 0.0,
    max_detections: Annotated[
        int | None, Query(ge=1, le=10000, description="keep at most this many (highest scores)")
    ] = None,
    mask_format: Annotated[
        MaskFormat, Query(description="rle (COCO compressed), polygon, or none (boxes only)")
    ] = "rle",
    timeout_ms: Annotated[
        float | None, Query(gt=0, description="a deadline shorter than the server's request_timeout_s")
    ] = None,
) -> Response:
    """Segment one image: instances with boxes, scores, categories and masks in original image pixels."""
    limit = service.settings.request_timeout_s
    timeout_s = limit if timeout_ms is None else min(timeout_ms / 1000, limit)
    options = SegmentOptions(score_threshold, max_detections, mask_format, timeout_s)
    return await service.segment(request, model, options)


@router.get("/v2/health/live", response_model=Liveness)
async def live() -> Liveness:
    return Liveness(live=True)


@router.get("/v2/health/ready", response_model=Readiness, responses={503: {"model": Readiness}})
async def ready(service: Service) -> JSONResponse:
    """200 only when every configured model is loaded and warmed up (and the server is not stopping)."""
    states = {name: entry.state for name, entry in service.registry.entries.items()}
    body = Readiness(ready=service.ready, models=states).model_dump()
    return JSONResponse(body, status_code=200 if service.ready else 503)


@router.get("/v2/models/{name}", response_model=ModelMetadata, responses={404: {"model": ErrorResponse}})
async def model_metadata(service: Service, entry: Entry) -> ModelMetadata:
    return service.model_metadata(entry)


@router.get(
    "/v2/models/{name}/ready",
    response_model=Readiness,
    responses={404: {"model": ErrorResponse}, 503: {"model": Readiness}},
)
async def model_ready(service: Service, entry: Entry) -> JSONResponse:
    is_ready = entry.state == "ready" and not service.stopping
    body = Readiness(ready=is_ready, models={entry.spec.name: entry.state}).model_dump()
    return JSONResponse(body, status_code=200 if is_ready else 503)


@router.get("/models", response_model=ModelList)
async def models(service: Service) -> ModelList:
    return ModelList(models=[service.model_metadata(entry) for entry in service.registry.entries.values()])


@router.get("/metrics", response_class=Response)
async def metrics(service: Service) -> Response:
    """Prometheus exposition (text format)."""
    return Response(service.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
