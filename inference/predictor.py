"""``Predictor``: a model file and runtime options in, each image's instances out, synchronously.

The one in-process entry to the pipeline: ``training.evaluate`` (and the training loop's validation),
``python -m service.predict --checkpoint`` and the benchmarks all segment through it, so they measure what
the service answers: the same decode, sizing, buckets, tiles, finishing and merge
(``inference.pipeline``), on the same runtimes (``inference.runtime.open_runtime``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from export.metadata import GraphMetadata
from inference.decode import DEFAULT_MAX_IMAGE_PIXELS
from inference.pipeline import ImagePipeline, Segmentation, SegmentOptions, run_sync
from inference.runtime import OpenedModel, RuntimeOptions, default_cache_dir, open_runtime, usable_cores, warm_up
from inference.sizing import Bucket
from model.intensity import Decoded
from model.runtime_protocol import Runtime


def in_process_options(**overrides: object) -> RuntimeOptions:
    """Runtime options for one caller in one thread: one stream with every usable core (the service's
    defaults split the cores between streams for concurrent requests instead)."""
    return RuntimeOptions.model_validate({"streams": 1, "threads": usable_cores(), **overrides})


class Predictor:
    """Segment images with one model, one image at a time (its tiles ``batch_size`` per runtime call)."""

    def __init__(
        self,
        runtime: Runtime,
        metadata: GraphMetadata,
        *,
        buckets: Sequence[Bucket] | None = None,
        tile_overlap: int | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        batch_size: int = 1,
        finishing_threads: int = 1,
        opened: OpenedModel | None = None,
    ) -> None:
        """An open ``runtime`` with the graph ``metadata`` it follows (the eager model of a training run, say);
        ``Predictor.open`` opens a model file. ``buckets``, ``tile_overlap`` and ``max_image_pixels`` as the
        service's settings (defaults: the same)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.runtime = runtime
        self.pipeline = ImagePipeline(
            metadata,
            buckets=buckets,
            tile_overlap=tile_overlap,
            max_image_pixels=max_image_pixels,
            finishing_threads=finishing_threads,
        )
        self.batch_size = batch_size
        self.opened = opened

    @classmethod
    def open(
        cls,
        path: str | Path,
        runtime: RuntimeOptions | None = None,
        *,
        cache_dir: Path | None = None,
        buckets: Sequence[Bucket] | None = None,
        tile_overlap: int | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        batch_size: int = 1,
        warmup: bool = False,
    ) -> Predictor:
        """A checkpoint (``.pt``, exported to ONNX into ``cache_dir`` unless the torch engine runs it), an
        exported ``.onnx`` graph or a TensorRT engine, on ``runtime`` (default: ``in_process_options()``)."""
        options = runtime or in_process_options()
        opened = open_runtime(
            Path(path),
            options,
            cache_dir or default_cache_dir(),
            max_batch_size=batch_size,
            buckets=list(buckets or []),
        )
        predictor = cls(
            opened.runtime,
            opened.metadata,
            buckets=buckets,
            tile_overlap=tile_overlap,
            max_image_pixels=max_image_pixels,
            batch_size=batch_size,
            finishing_threads=options.threads,
            opened=opened,
        )
        if warmup:
            warm_up(opened, predictor.pipeline.buckets, batch_size)
        return predictor

    @property
    def metadata(self) -> GraphMetadata:
        return self.pipeline.metadata

    def __call__(self, image: bytes | Decoded | np.ndarray, options: SegmentOptions | None = None) -> Segmentation:
        """One image, as file bytes (decoded by the model's intensity rule), decoded (``pipeline.decode``), or
        as the ``[H, W, 3]`` uint8 RGB the model reads (then measured on its grey), with ``options`` (default:
        the model's own defaults). Raises ``inference.errors``' kinds."""
        options = options or SegmentOptions()
        self.pipeline.check(options)
        started = time.perf_counter()
        if isinstance(image, bytes):
            pixels = self.pipeline.decode(image, options.channel)
        elif isinstance(image, np.ndarray):
            pixels = Decoded(image, image.mean(axis=-1, dtype=np.float32), 0.0)
        else:
            pixels = image
        decode_s = time.perf_counter() - started
        steps = self.pipeline.steps(pixels, options)
        answer = run_sync(steps, self.runtime, self.pipeline.contract.pad_value, self.batch_size)
        answer.timings["decode"] = decode_s
        return answer
