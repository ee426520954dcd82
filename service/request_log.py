"""Request ids, the access log, and the log format of the whole process.

``RequestLogMiddleware`` wraps the app outermost (outside CORS, so preflights count too): every response,
errors and 503 sheds included, carries ``X-Request-ID``: the client's, if it sent a sane one (at most
128 characters of ``A-Z a-z 0-9 . _ : + / = -``), else a fresh random one. The id lives in a contextvar for
the request's duration, so every log line written for the request (in the event loop or in the worker
threads that ``run_in_executor`` / ``to_thread`` start with a copy of the context) carries it through
``RequestIdFilter``. With ``access_log`` on, each request ends with one line on the ``service.access``
logger: method, route, model, status, latency, response bytes, client, key name and request id; with
``log_format=json`` every log line, access or not, is one JSON object.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from starlette.datastructures import Headers, MutableHeaders, QueryParams
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)
access_log = logging.getLogger("service.access")

REQUEST_ID_HEADER = "X-Request-ID"
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:+/=-]{1,128}")
_MAX_LOGGED_CHARS = 200  # of a client-chosen path or model name in a log line
NO_REQUEST = "-"  # the request_id of log lines written outside any request
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
LogFormat = Literal["text", "json"]


@dataclass
class RequestRecord:
    """What the access line says about a request beyond its HTTP exchange; filled in by the handlers."""

    request_id: str
    model: str | None = None
    key_name: str | None = None


_current: ContextVar[RequestRecord | None] = ContextVar("onestage_request", default=None)


def current_request_id() -> str:
    record = _current.get()
    return record.request_id if record is not None else NO_REQUEST


def note_model(name: str) -> None:
    """Name the model that served the request (when the client left it to the default)."""
    record = _current.get()
    if record is not None:
        record.model = name


def note_key_name(name: str | None) -> None:
    """Name the API key that the request authenticated with (its name only, never the key)."""
    record = _current.get()
    if record is not None:
        record.key_name = name


def request_id_from(headers: Headers) -> str:
    """The client's ``X-Request-ID`` if it is sane, else a new random one (32 hex digits)."""
    given = headers.get(REQUEST_ID_HEADER)
    return given if given is not None and _SANE_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_LOGGED_CHARS else text[:_MAX_LOGGED_CHARS] + "..."


class RequestLogMiddleware:
    """Pure ASGI middleware (no response buffering): request id in and out, and the access line.

    It also turns an exception that escapes the app into the service's JSON 500 (with the request id), so
    that the error is logged, answered and counted in the access log like any other."""

    def __init__(self, app: ASGIApp, *, access_log: bool) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = RequestRecord(request_id_from(Headers(scope=scope)))
        token = _current.set(record)
        started = time.perf_counter()
        status, sent_bytes, response_started = 500, 0, False

        async def send_with_id(message: Message) -> None:
            nonlocal status, sent_bytes, response_started
            if message["type"] == "http.response.start":
                response_started, status = True, message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = record.request_id
            elif message["type"] == "http.response.body":
                sent_bytes += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], _clip(scope["path"]))
            if response_started:
                raise  # the status line is out: only closing the connection is left (the server does)
            await JSONResponse({"error": "internal server error"}, status_code=500)(scope, receive, send_with_id)
        finally:
            if self.access_log:
                self._log_access(scope, record, status, sent_bytes, time.perf_counter() - started)
            _current.reset(token)

    @staticmethod
    def _log_access(scope: Scope, record: RequestRecord, status: int, sent_bytes: int, seconds: float) -> None:
        route = scope.get("route")
        path = getattr(route, "path", None) or _clip(scope["path"])  # the route's template: /v2/models/{name}
        model = (
            QueryParams(scope["query_string"]).get("model") or scope.get("path_params", {}).get("name") or record.model
        )
        client = scope.get("client")
        fields: dict[str, Any] = {
            "method": scope["method"],
            "route": path,
            "model": _clip(model) if model is not None else None,
            "status": status,
            "latency_ms": round(seconds * 1000, 2),
            "bytes": sent_bytes,
            "client": client[0] if client else None,
            "key_name": record.key_name,
        }
        message = " ".join(f"{name}={json.dumps(value)}" for name, value in fields.items() if value is not None)
        access_log.info(message, extra={"access": fields})


class RequestIdFilter(logging.Filter):
    """Gives every record ``request_id``: the current request's, or "-" outside requests."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (ISO 8601, UTC), level, logger, message, request_id, the access fields, the
    traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", NO_REQUEST),
            **getattr(record, "access", {}),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure_logging(level: str, log_format: LogFormat) -> None:
    """Every logger (uvicorn's too, given ``log_config=None``) through one stderr handler with request ids."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.captureWarnings(True)  # Python warnings become log lines too (JSON ones with log_format=json)
