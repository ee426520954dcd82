"""The FastAPI app: the routes of ``service.routes`` on one ``SegmentService``, started and stopped with the app.

Errors of every kind (unknown paths, invalid parameters, anything unexpected) answer JSON ``{"error": ...}``
with their status, as the request steps of ``service.segment_service`` do.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.metrics import UNKNOWN_MODEL
from service.routes import router
from service.segment_service import SegmentService, error_response
from service.settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> FastAPI:
    """The app for ``settings``; models load in the background once it starts (see ``/v2/health/ready``)."""
    service = SegmentService(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        yield
        await service.stop()

    app = FastAPI(
        title="OneStage instance segmentation",
        version="0.1.0",
        description='MEInst and EmbedMask instance segmentation; masks as COCO RLE. Errors are JSON `{"error": ...}`.',
        lifespan=lifespan,
    )
    app.state.service = service
    install_error_handlers(app, service)
    app.include_router(router)
    return app


def install_error_handlers(app: FastAPI, service: SegmentService) -> None:
    """Answer framework errors as JSON ``{"error": ...}``; invalid /segment requests count as failures."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail), getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
        if request.url.path == "/segment":
            name = request.query_params.get("model")
            service.metrics.fail(name if name in service.registry.entries else UNKNOWN_MODEL, "bad_input")
        return error_response(422, f"invalid request: {problems}")

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal server error")
