"""The served models and their states: each configured path opened by the runtime factory
(``inference.runtime.open_runtime``, with the model's runtime options), wrapped in its pipeline and warmed up.

A model counts as ready only after every inference stream ran on its warm buckets (``--warm-buckets``, or by
default every bucket, but on OpenVINO only the largest: ``inference.runtime.warm_buckets``) at batch 1 and at
the largest batch it serves (``inference.runtime.warm_up``), so that no request on them pays for first-run
allocation or an engine compile, and after the app started its worker (``service.worker``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Literal

from inference.pipeline import ImagePipeline
from inference.runtime import OpenedModel, export_ahead, open_runtime, warm_buckets, warm_up
from service import heap
from service.settings import ModelSpec, Settings
from service.worker import ModelWorker

log = logging.getLogger(__name__)

State = Literal["loading", "ready", "failed"]


@dataclass
class ModelEntry:
    spec: ModelSpec
    state: State = "loading"
    error: str | None = None
    worker: ModelWorker | None = None


def load_model(spec: ModelSpec, settings: Settings) -> tuple[OpenedModel, ImagePipeline]:
    """Open ``spec`` with its runtime options (exporting or building its graph first when needed) and warm it
    up unless disabled (blocking; run it off the event loop)."""
    options = settings.runtime_options(spec)
    buckets = settings.model_buckets(spec)
    opened = open_runtime(
        spec.path, options, settings.cache_dir, max_batch_size=settings.max_batch_size, buckets=buckets
    )
    pipeline = ImagePipeline(
        opened.metadata,
        buckets=buckets,
        tile_overlap=settings.tile_overlap,
        max_image_pixels=settings.max_image_pixels,
        finishing_threads=settings.finishing_threads,
    )
    if settings.warmup:
        every_batch_size = opened.engine == "torch" and options.cuda_graphs  # a CUDA graph serves one shape
        warm = settings.warm_shapes() or warm_buckets(opened, pipeline.buckets)
        warm_up(opened, warm, settings.max_batch_size, every_batch_size)
    heap.trim()  # what the export, the compile and the warm-up freed
    return opened, pipeline


@dataclass
class ModelRegistry:
    """Every configured model and its state; ``ready`` once all of them are loaded, warmed up and
    marked ready by the app (which starts their workers first)."""

    settings: Settings
    entries: dict[str, ModelEntry] = field(init=False)

    def __post_init__(self) -> None:
        self.entries = {spec.name: ModelEntry(spec) for spec in self.settings.models}

    @property
    def ready(self) -> bool:
        return all(entry.state == "ready" for entry in self.entries.values())

    def export_ahead(self) -> None:
        """Export every model's checkpoint ahead of the loads, in one child process (blocking;
        ``inference.runtime.export_ahead``). A failure is only logged: each load exports again (only its own
        checkpoint) and records its error."""
        models = [(entry.spec.path, self.settings.runtime_options(entry.spec)) for entry in self.entries.values()]
        try:
            export_ahead(models, self.settings.cache_dir)
        except Exception:
            log.warning("exporting the checkpoints ahead failed; each load will try its own", exc_info=True)

    def load(self, name: str) -> tuple[OpenedModel, ImagePipeline] | None:
        """Load one model (blocking); on failure record the error and return None. The state stays
        "loading" until ``mark_ready``."""
        entry = self.entries[name]
        started = time.perf_counter()
        try:
            loaded = load_model(entry.spec, self.settings)
        except Exception as error:
            log.exception("model %s failed to load", name)
            entry.state, entry.error = "failed", f"{type(error).__name__}: {error}"
            return None
        log.info(
            "model %s loaded (%s, %s) in %.1f s",
            name,
            loaded[0].engine,
            loaded[0].version,
            time.perf_counter() - started,
        )
        return loaded

    def mark_ready(self, name: str, worker: ModelWorker) -> None:
        entry = self.entries[name]
        entry.worker, entry.state = worker, "ready"
