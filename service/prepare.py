"""Fill the service's cache ahead of serving, then exit: ``python -m service.prepare [service flags]``.

Takes the same settings as ``python -m service`` (flags or ``ONESTAGE_*``) and does what a first start would
do before loading the runtimes: export every configured checkpoint to ONNX into ``cache_dir``, build the
TensorRT engines for models on the tensorrt engine, and compile the mask finishing kernel into numba's cache. A
server started afterwards on that cache finds every graph in place, so it never imports torch (the
Kubernetes Deployment runs this as its init container). Exits 1 naming the models that failed.
"""

from __future__ import annotations

import logging
import sys
import time

from inference.runtime import prepare_graph
from model import finishing
from service.settings import load_settings

log = logging.getLogger("service.prepare")


def main(argv: list[str]) -> int:
    settings = load_settings(argv, prog="python -m service.prepare")
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    failed = []
    for spec in settings.models:
        started = time.perf_counter()
        try:
            graph = prepare_graph(
                spec.path,
                settings.runtime_options(spec),
                settings.cache_dir,
                max_batch_size=settings.max_batch_size,
                buckets=settings.model_buckets(spec),
            )
        except Exception:
            log.exception("model %s: preparing %s failed", spec.name, spec.path)
            failed.append(spec.name)
            continue
        log.info("model %s: %s ready in %.1f s", spec.name, graph, time.perf_counter() - started)
    finishing.compile_kernel()
    if failed:
        print(f"error: could not prepare {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
