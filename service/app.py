"""The FastAPI app: the routes of ``service.routes`` on one ``SegmentService``, started and stopped with the app,
and the web page at ``/`` (``service.web``).

Errors of every kind (unknown paths, invalid parameters, anything unexpected) answer JSON ``{"error": ...}``
with their status, as the request steps of ``service.segment_service`` do; an exception that escapes
them all is answered (500) and logged by ``service.request_log.RequestLogMiddleware``, which also gives every
answer its ``X-Request-ID``. API keys (``service.security``) guard the ``protected`` routes when configured.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import error_response
from service.metrics import UNKNOWN_MODEL
from service.request_log import RequestLogMiddleware
from service.routes import metrics_router, protected, router
from service.security import Authenticator, add_cors, require_api_key
from service.segment_service import SegmentService
from service.settings import Settings
from service.web import mount_page


def create_app(settings: Settings) -> FastAPI:
    """The app for ``settings``; models load in the background once it starts (see ``/v2/health/ready``).

    Raises KeyFileError when the API key file cannot be read or has a bad line."""
    service = SegmentService(settings)
    authenticator = Authenticator.from_settings(settings, service.metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        authenticator.announce(settings)
        authenticator.watch_sighup()
        await service.start()
        yield
        authenticator.unwatch_sighup()
        await service.stop()

    app = FastAPI(
        title="OneStage instance segmentation",
        version="0.1.0",
        description='MEInst and EmbedMask instance segmentation; masks as COCO RLE. Errors are JSON `{"error": ...}`.',
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.authenticator = authenticator
    install_error_handlers(app, service)
    add_cors(app, settings.cors_origins)
    app.add_middleware(RequestLogMiddleware, access_log=settings.access_log)  # outermost: preflights get ids too
    # No dependency at all without keys, so that /docs shows a security scheme only where one applies.
    guard = [Depends(require_api_key)] if authenticator.enabled else []
    app.include_router(router)
    app.include_router(protected, dependencies=guard)
    app.include_router(metrics_router, dependencies=guard if settings.metrics_require_key else [])
    mount_page(app)
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
