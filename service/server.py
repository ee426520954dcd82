"""uvicorn's server with a drain phase after SIGTERM, for orchestrators and load balancers.

SIGTERM (Kubernetes, ``docker stop``) first turns readiness to 503 and keeps serving for ``drain_s``
seconds, so that load balancers following readiness stop sending before the replica stops listening; then
uvicorn's graceful shutdown runs as for SIGINT: stop listening, wait up to ``shutdown_timeout_s`` for the
requests already accepted, and finally the app's shutdown, which runs every request still queued in the
batchers. SIGINT (Ctrl-C) and a second SIGTERM skip what is left of the drain.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable
from types import FrameType

import uvicorn
from fastapi import FastAPI

from service.settings import Settings

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """``uvicorn.Server`` whose first SIGTERM calls ``begin_drain`` and defers the exit by ``drain_s``."""

    def __init__(self, config: uvicorn.Config, begin_drain: Callable[[], None], drain_s: float) -> None:
        super().__init__(config)
        self._begin_drain = begin_drain
        self._drain_s = drain_s
        self._drain_until: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self._drain_s > 0 and self._drain_until is None and not self.should_exit:
            self._captured_signals.append(sig)  # re-raised after shutdown, as uvicorn does
            self._drain_until = time.monotonic() + self._drain_s
            self._begin_drain()
            log.info("SIGTERM: readiness is 503, serving %.1f s more before shutting down", self._drain_s)
            return
        if sig == signal.SIGTERM and self._drain_until is not None and not self.should_exit:
            self.should_exit = True  # a second SIGTERM ends the drain now (not in _captured_signals twice)
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        """Called every 0.1 s by uvicorn's main loop; ends the drain once its time is up."""
        if self._drain_until is not None and time.monotonic() >= self._drain_until:
            self.should_exit = True
        return await super().on_tick(counter)


def serve(app: FastAPI, settings: Settings, begin_drain: Callable[[], None]) -> bool:
    """Run ``app`` until it is shut down; False when it failed to start (e.g. the port is taken)."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # uvicorn's lines go through configure_logging's handler, with request ids
        access_log=False,  # the service's own access log (service.request_log) has the route, model and id
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout_s),
        workers=1,
    )
    server = DrainingServer(config, begin_drain, settings.drain_s)
    server.run()
    return server.started
