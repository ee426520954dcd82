"""Serve the configured models over HTTP.

    python -m service [--port 8000] [--host 127.0.0.1] [--models JSON] [--runtime auto|onnxruntime|tensorrt] ...

With no arguments: the bundled ``models/`` checkpoints on this machine's CPU (onnxruntime), or onnxruntime
CUDA where a GPU is usable. Every flag has an ``ONESTAGE_*`` environment variable; ``--help`` lists them.
One process serves all models (the batcher needs every request of a model in one place); scale out with
more replicas. SIGTERM first drains (readiness 503 for ``--drain-s`` while still serving); then, as on
SIGINT, the server stops accepting connections and finishes the requests it accepted.
"""

from __future__ import annotations

import logging
import sys

from service.app import create_app
from service.server import serve
from service.settings import Settings, load_settings


def main(argv: list[str]) -> int:
    settings: Settings = load_settings(argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    missing = [f"{spec.name}: {spec.path}" for spec in settings.models if not spec.path.is_file()]
    if missing:
        print("error: model files not found (set --models or ONESTAGE_MODELS):\n  " + "\n  ".join(missing), file=sys.stderr)
        return 2
    app = create_app(settings)
    if not serve(app, settings, app.state.service.begin_drain):
        return 3  # uvicorn's exit code for a failed start
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
