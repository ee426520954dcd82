"""Access control: optional API keys on the routes that use the models, and CORS for pages on other origins.

With keys configured (``api_keys_file`` and/or ``api_keys``, see ``service.keys``), ``POST /segment``,
``GET /models`` and ``GET /v2/models/{name}`` (and ``GET /metrics`` with ``metrics_require_key``) need
``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. A missing or wrong key gets 401 with
``WWW-Authenticate: Bearer`` and the same body whatever keys exist. Health routes, the web page and
``/docs`` stay open: probes need them and they hold no data. Without keys everything is open, as before,
and the service says so once at start.

The keys reach the routes through FastAPI's security dependencies (``HTTPBearer``, ``APIKeyHeader`` with
``auto_error=False``, so that either header may be used), which also puts both schemes in the OpenAPI
schema. The header names and statuses are those of RFC 6750.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from typing import Annotated

from fastapi import FastAPI, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from service import request_log
from service.keys import KeyStore, parse_line
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)

API_KEY_HEADER = "X-API-Key"
REALM = "onestage"
# Headers a page on another origin may send and read; Retry-After says when a shed (503) request may retry.
CORS_REQUEST_HEADERS = ("Authorization", API_KEY_HEADER, request_log.REQUEST_ID_HEADER, "Content-Type")
CORS_RESPONSE_HEADERS = (request_log.REQUEST_ID_HEADER, "Retry-After", "WWW-Authenticate")
CORS_MAX_AGE_S = 600  # browsers cache a preflight answer this long

bearer_scheme = HTTPBearer(auto_error=False, scheme_name="bearer", description="`Authorization: Bearer <API key>`")
api_key_scheme = APIKeyHeader(
    name=API_KEY_HEADER, auto_error=False, scheme_name="apiKey", description="`X-API-Key: <API key>`"
)


class Authenticator:
    """The key store of one app (None: open) and the counters of authenticated and refused requests."""

    def __init__(self, store: KeyStore | None, metrics: Metrics) -> None:
        self.store = store
        self.metrics = metrics

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics) -> Authenticator:
        """Raises KeyFileError for a bad key (file or environment), so that the service does not start with it."""
        entries = settings.api_keys.get_secret_value().split(",")
        fixed = [parse_line(entry, f"ONESTAGE_API_KEYS entry {i}") for i, entry in enumerate(entries, 1)]
        keys = [key for key in fixed if key is not None]
        if not keys and settings.api_keys_file is None:
            return cls(None, metrics)
        return cls(KeyStore(keys, settings.api_keys_file), metrics)

    @property
    def enabled(self) -> bool:
        return self.store is not None

    def announce(self, settings: Settings) -> None:
        """One line at start: open (a warning) or how many keys guard what (never the keys)."""
        if self.store is None:
            log.warning(
                "no API keys configured: /segment, /display and the model metadata are open to every client that can "
                "reach port %d (set ONESTAGE_API_KEYS_FILE to require keys)",
                settings.port,
            )
            return
        keys = self.store.keys
        named = sorted(self.store.names)
        for name in named:  # their request counters exist (at zero) from the start
            self.metrics.key_requests(name)
        metrics = "needs a key too" if settings.metrics_require_key else "stays open"
        log.info(
            "API keys required on /segment, /display, /models and /v2/models/{name}: %d keys (%d named); /metrics %s",
            len(keys),
            len(named),
            metrics,
        )

    @property
    def _reloads_on_sighup(self) -> bool:
        """A key file to re-read, and a main-thread event loop to catch the signal (not in an in-thread server)."""
        has_file = self.store is not None and self.store.path is not None
        return has_file and hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread()

    def watch_sighup(self) -> None:
        """Re-read the key file on SIGHUP (changes are also picked up by their mtime on the next request)."""
        if self._reloads_on_sighup:
            assert self.store is not None
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.store.reload)

    def unwatch_sighup(self) -> None:
        if self._reloads_on_sighup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)

    def check(self, presented: str | None) -> None:
        """Accept the request or raise 401; counts it by key name (a bounded set) or by refusal reason."""
        assert self.store is not None
        if presented is None:
            self.metrics.auth_failures.labels("missing").inc()
            raise StarletteHTTPException(
                401,
                f"an API key is required: send 'Authorization: Bearer <key>' or '{API_KEY_HEADER}: <key>'",
                headers={"WWW-Authenticate": f'Bearer realm="{REALM}"'},
            )
        key = self.store.match(presented)
        if key is None:
            self.metrics.auth_failures.labels("invalid").inc()
            raise StarletteHTTPException(
                401, "invalid API key", headers={"WWW-Authenticate": f'Bearer realm="{REALM}", error="invalid_token"'}
            )
        self.metrics.key_requests(key.name).inc()
        request_log.note_key_name(key.name)


async def require_api_key(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)],
    api_key: Annotated[str | None, Security(api_key_scheme)],
) -> None:
    """The dependency of the protected routes: a Bearer token wins over ``X-API-Key`` when both are sent."""
    authenticator: Authenticator = request.app.state.authenticator
    if authenticator.enabled:
        authenticator.check(bearer.credentials if bearer is not None else api_key)


def add_cors(app: FastAPI, origins: list[str]) -> None:
    """Answer CORS (preflight included) for ``origins``; nothing when the list is empty (same-origin only)."""
    if not origins:
        return
    app.add_middleware(
        CORSMiddleware,
        allow_origins=origins,
        allow_methods=["GET", "POST"],
        allow_headers=list(CORS_REQUEST_HEADERS),
        expose_headers=list(CORS_RESPONSE_HEADERS),
        max_age=CORS_MAX_AGE_S,
    )
