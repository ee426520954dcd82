"""Serve the configured models over HTTP.

    python -m service [--port 8000] [--host 127.0.0.1] [--models JSON] [--runtime auto|onnxruntime|tensorrt] ...

With no arguments: the bundled ``models/`` checkpoints on this machine's CPU (OpenVINO where the CPU has bf16,
else onnxruntime), or onnxruntime CUDA where a GPU is usable. Every flag has an ``ONESTAGE_*`` environment
variable; ``--help`` lists them.
One process serves all models (the batcher needs every request of a model in one place); scale out with
more replicas. SIGTERM first drains (readiness 503 for ``--drain-s`` while still serving); then, as on
SIGINT, the server stops accepting connections and finishes the requests it accepted.
"""

from __future__ import annotations

import sys

from service import heap
from service.app import create_app
from service.keys import KeyFileError
from service.request_log import configure_logging
from service.server import serve
from service.settings import Settings, load_settings


def main(argv: list[str]) -> int:
    heap.limit_arenas()  # before the server, the request workers and the engines start their threads
    settings: Settings = load_settings(argv)
    configure_logging(settings.log_level, settings.log_format)
    missing = [f"{spec.name}: {spec.path}" for spec in settings.models if not spec.path.is_file()]
    if missing:
        print(
            "error: model files not found (set --models or ONESTAGE_MODELS):\n  " + "\n  ".join(missing),
            file=sys.stderr,
        )
        return 2
    try:
        app = create_app(settings)
    except KeyFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not serve(app, settings, app.state.service.begin_drain):
        return 3  # uvicorn's exit code for a failed start
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
