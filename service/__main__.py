"""Serve the configured models over HTTP.

    python -m service [--port 8000] [--host 127.0.0.1] [--models JSON] [--runtime auto|onnxruntime|tensorrt] ...

With no arguments: the bundled ``models/`` checkpoints on this machine's CPU (onnxruntime), or onnxruntime
CUDA where a GPU is usable. Every flag has an ``ONESTAGE_*`` environment variable; ``--help`` lists them.
One process serves all models (the batcher needs every request of a model in one place); scale out with
more replicas. SIGTERM/SIGINT stop accepting connections and finish the requests in flight.
"""

from __future__ import annotations

import math
import sys

import uvicorn

from service.app import create_app
from service.keys import KeyFileError
from service.request_log import configure_logging
from service.settings import Settings, load_settings


def main(argv: list[str]) -> int:
    settings: Settings = load_settings(argv)
    configure_logging(settings.log_level, settings.log_format)
    missing = [f"{spec.name}: {spec.path}" for spec in settings.models if not spec.path.is_file()]
    if missing:
        print("error: model files not found (set --models or ONESTAGE_MODELS):\n  " + "\n  ".join(missing), file=sys.stderr)
        return 2
    try:
        app = create_app(settings)
    except KeyFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # uvicorn's lines go through configure_logging's handler, with request ids
        access_log=False,  # the service's own access log (service.request_log) has the route, model and id
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout_s),
        workers=1,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
