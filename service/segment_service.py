"""The service behind the routes: its models' lifecycle, admission, and the steps of one request.

A segmentation request goes through small named steps (as LitServe names them): ``resolve`` the model ->
admit it (a slot in the model's queue, before its body is read) -> read the body (``service.body``) -> the
model's worker (``service.worker``: decode, the pipeline's passes through the dynamic batcher, finish) ->
``encode`` (JSON; or, in a worker thread, a picture from ``service.render``: the label image as PNG or TIFF,
or the decoded image drawn with its instances). ``display`` answers the image as the model reads it, for the
page to draw under the masks. Every failure is mapped to its status once (``service.errors``) and answered
as JSON ``{"error": ...}`` (with a ``reason`` in the failure metric for segmentations); no input can take
down the process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
from fastapi.responses import Response

from inference.pipeline import SegmentOptions
from model import finishing
from service import request_log
from service.body import ImageBody
from service.errors import ServiceError, error_response, service_error
from service.metrics import UNKNOWN_MODEL, Metrics
from service.models import ModelRegistry
from service.render import LABEL_MEDIA_TYPES, display_image, label_bytes, label_image, overlay_image, png_bytes
from service.schemas import AnswerMaskFormat, LabelFormat, Render, SegmentResponse
from service.settings import Settings
from service.worker import ModelWorker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentRequest:
    """One ``POST /segment``: what to segment (the pipeline's options) and how to answer."""

    options: SegmentOptions
    answer_format: AnswerMaskFormat  # the pipeline's mask formats, or "label" (a label image, painted from RLE)
    timeout_s: float
    render: Render = "json"
    label_format: LabelFormat = "png"  # the label image's file (mask_format=label)

    @property
    def picture(self) -> bool:
        """Whether the answer is a PNG (drawn in a worker thread) rather than JSON."""
        return self.render == "overlay" or self.answer_format == "label"

    def conflict(self) -> str | None:
        """Why this combination cannot be answered, or None."""
        if self.render == "overlay" and self.answer_format in ("polygon", "label"):
            return (
                "render=overlay draws the masks (mask_format=rle, the default) or the boxes (mask_format=none) on "
                f"the image; mask_format={self.answer_format} cannot be drawn: leave render=json for it"
            )
        if self.label_format != "png" and self.answer_format != "label":
            return f"label_format={self.label_format} is the file of a label image: ask for it with mask_format=label"
        return None


class SegmentService:
    """One app's models (their workers) and request steps."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics(settings.max_batch_size)
        self.registry = ModelRegistry(settings)
        self.cpu_pool = ThreadPoolExecutor(settings.cpu_workers, thread_name_prefix="onestage-cpu")
        self.stopping = False
        self.draining = False  # after SIGTERM: still serving, readiness 503 (service.server)
        self._loader: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        for name, entry in self.registry.entries.items():
            self.metrics.register_model(name, state=partial(getattr, entry, "state"))
        self._loader = asyncio.get_running_loop().create_task(self._load_all(), name="onestage-load")

    async def _load_all(self) -> None:
        """Export every checkpoint (one child process, on a cold cache most of the start) while the finishing
        kernel compiles, then load the models side by side (each compile and warm-up is mostly one thread),
        all off the event loop (live answers meanwhile; each model serves once warm, ready waits for all)."""
        await asyncio.gather(asyncio.to_thread(finishing.compile_kernel), asyncio.to_thread(self.registry.export_ahead))
        await asyncio.gather(*(self._load(name) for name in self.registry.entries))
        if self.registry.ready:
            log.info("all %d models ready", len(self.registry.entries))

    async def _load(self, name: str) -> None:
        """Load one model off the event loop and start its worker."""
        loaded = await asyncio.to_thread(self.registry.load, name)
        if loaded is None or self.stopping:
            return
        worker = ModelWorker(name, *loaded, self.settings, self.metrics, self.cpu_pool)
        worker.start()
        self.registry.mark_ready(name, worker)

    async def stop(self) -> None:
        """Refuse new work, finish every queued request, release the request threads."""
        self.stopping = True
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
        workers = [entry.worker for entry in self.registry.entries.values() if entry.worker is not None]
        await asyncio.gather(*(worker.stop() for worker in workers))
        self.cpu_pool.shutdown(wait=True)

    def begin_drain(self) -> None:
        """Report not ready from now on; requests are still served until the server stops listening."""
        self.draining = True

    @property
    def accepting(self) -> bool:
        """Neither draining nor stopping: what readiness reports besides the models' states."""
        return not (self.draining or self.stopping)

    @property
    def ready(self) -> bool:
        return self.registry.ready and self.accepting

    # ------------------------------------------------------------------ request steps
    def resolve(self, name: str | None) -> ModelWorker:
        """The model's worker, or 404 (unknown) / 503 (still loading, failed, or shutting down)."""
        name = name or next(iter(self.registry.entries))
        entry = self.registry.entries.get(name)
        if entry is None:
            raise ServiceError(404, f"unknown model {name!r}; served: {', '.join(self.registry.entries)}", "bad_input")
        retry = {"Retry-After": str(self.settings.retry_after_s)}
        if self.stopping:
            raise ServiceError(503, "shutting down", "rejected", retry)
        if entry.state != "ready" or entry.worker is None:
            message = f"model {name!r} is {entry.state}" + (f": {entry.error}" if entry.error else "")
            raise ServiceError(503, message, "rejected", retry)
        return entry.worker

    def encode(self, answer: SegmentResponse, request: SegmentRequest, image: np.ndarray) -> Response:
        """The answer as JSON, as the label image (mask_format=label, a PNG or TIFF file) or drawn over the
        decoded image (the 8-bit RGB the model read, before resizing; render=overlay, PNG)."""
        count = {"X-Instances": str(len(answer.instances))}
        if request.answer_format == "label":
            data = label_bytes(label_image(answer), request.label_format)
            return Response(data, media_type=LABEL_MEDIA_TYPES[request.label_format], headers=count)
        if request.render == "overlay":
            return Response(png_bytes(overlay_image(image, answer)), media_type="image/png", headers=count)
        return Response(answer.model_dump_json(), media_type="application/json")

    def failure(self, raised: Exception, label: str | None) -> tuple[int, Response]:
        """The status and JSON answer of a failed request; counted under ``label`` in the failure metric
        unless None (requests outside the segmentation metrics)."""
        error = service_error(raised, self.settings.retry_after_s)
        if error is None:
            log.exception("unexpected failure on a %s request", label or "display")
            error = ServiceError(500, "internal server error", "backend")
        if label is not None:
            self.metrics.fail(label, error.reason)
        return error.status, error_response(error.status, error.message, error.headers)

    async def display(self, body: ImageBody, model_name: str | None, channel: int | None) -> Response:
        """The image as model ``model_name`` reads it (its intensity and channel rules, EXIF orientation
        applied, not resized) as a PNG: grey for the microscopy rule, else RGB (``service.render``). Admitted
        as a segmentation is (a slot in the model's queue while the body is read and decoded, so a burst is
        refused with 503 instead of buffering bodies); not counted in the segmentation metrics."""
        try:
            worker = self.resolve(model_name)
            request_log.note_model(worker.name)
            slot = worker.reserve()
            try:
                data = await body.read()

                def rendition() -> bytes:
                    return png_bytes(display_image(worker.pipeline.decode(data, channel).rgb))

                picture = await asyncio.get_running_loop().run_in_executor(self.cpu_pool, rendition)
            finally:
                slot.release()
            return Response(picture, media_type="image/png")
        except Exception as raised:
            return self.failure(raised, None)[1]

    async def segment(self, body: ImageBody, model_name: str | None, request: SegmentRequest) -> Response:
        arrived = time.perf_counter()
        label = model_name if model_name in self.registry.entries else UNKNOWN_MODEL
        label = next(iter(self.registry.entries)) if model_name is None else label
        status = 500
        try:
            worker = self.resolve(model_name)
            request_log.note_model(worker.name)
            if (conflict := request.conflict()) is not None:
                raise ServiceError(422, conflict, "bad_input")
            worker.pipeline.check(request.options)
            slot = worker.reserve()  # a slot in the model's queue, before the body is read and decoded
            self.metrics.in_flight.labels(label).inc()
            try:
                data = await body.read()
                deadline = arrived + request.timeout_s
                image, segmentation = await worker.segment(data, request.options, slot, deadline)
                del data
                opened = worker.opened
                answer = SegmentResponse.from_segmentation(segmentation, worker.name, opened.version, opened.metadata)
                if request.picture:
                    loop = asyncio.get_running_loop()
                    response = await loop.run_in_executor(self.cpu_pool, self.encode, answer, request, image)
                else:
                    response = self.encode(answer, request, image)
            finally:
                slot.release()
                self.metrics.in_flight.labels(label).dec()
            status = 200
            return response
        except Exception as raised:
            status, response = self.failure(raised, label)
            return response
        finally:
            self.metrics.request_duration.labels(label, str(status)).observe(time.perf_counter() - arrived)
