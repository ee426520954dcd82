"""The service behind the routes: models, their batchers and threads, metrics, and the request steps.

A segmentation request goes through small named steps (as LitServe names them): ``read_body`` (streamed,
size-checked) -> ``decode`` (the model's intensity rule, EXIF orientation) -> ``choose_scale`` (the request's
scale, or a first pass for ``scale=auto``) -> ``prepare`` (resize by the model's size rule times the scale,
bucket, or tiles when larger than every bucket; worker threads) -> the model's ``DynamicBatcher`` (batch ->
predict in one of the model's inference threads, one per stream -> unbatch) -> ``finish``
(``model.finishing.finish_image``: paste, threshold, RLE; in a worker thread; tiles merged) -> ``answer``
-> ``encode_response`` (JSON; or, in a worker thread, a PNG from ``service.render``: the label image, or the
decoded image drawn with its instances).
Every failure becomes JSON ``{"error": ...}`` with its status and a ``reason`` in the failure metric; no
input can take down the process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from model import finishing
from model.tiling import Tile, finish_tile, merge_tiles
from service import request_log
from service.batcher import BackendError, DynamicBatcher, Outputs, QueueFull, Reservation
from service.imaging import (
    IMAGE_CONTENT_TYPES,
    ImageRejected,
    PreparedImage,
    check_input_size,
    configure_pil,
    decode_image,
    prepare_image,
)
from service.metrics import UNKNOWN_MODEL, Metrics
from service.models import TRITON_PLATFORMS, LoadedModel, ModelEntry, ModelRegistry
from service.render import label_image, overlay_image, png_bytes
from service.schemas import RLE, AnswerMaskFormat, Instance, ModelMetadata, Render, SegmentResponse, TensorInfo
from service.settings import Settings
from service.tiled import TiledImage, prepare_tiles, run_tiles

log = logging.getLogger(__name__)

# KServe v2 platform names of the runtimes.


class ServiceError(Exception):
    """A request that ends with an error status; ``reason`` labels the failure metric."""

    def __init__(self, status: int, message: str, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.reason, self.headers = status, message, reason, headers


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@dataclass(frozen=True)
class SegmentOptions:
    score_threshold: float
    max_detections: int | None
    mask_format: AnswerMaskFormat
    timeout_s: float
    render: Render = "json"
    scale: float | Literal["auto"] = 1.0  # a factor on the model's own input size, or estimated per image
    channel: int | None = None  # microscopy models: the channel to segment (default: the channel rule)

    @property
    def picture(self) -> bool:
        """Whether the answer is a PNG (drawn in a worker thread) rather than JSON."""
        return self.render == "overlay" or self.mask_format == "label"

    def conflict(self) -> str | None:
        """Why this combination cannot be answered, or None."""
        if self.render == "overlay" and self.mask_format in ("polygon", "label"):
            return (
                "render=overlay draws the masks (mask_format=rle, the default) or the boxes (mask_format=none) on "
                f"the image; mask_format={self.mask_format} cannot be drawn: leave render=json for it"
            )
        return None


class SegmentService:
    """One app's state: models, their batchers and threads, metrics; and the request steps."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics(settings.max_batch_size)
        self.registry = ModelRegistry(settings)
        self.batchers: dict[str, DynamicBatcher] = {}
        self.cpu_pool = ThreadPoolExecutor(settings.cpu_workers, thread_name_prefix="onestage-cpu")
        self.inference_pools: dict[str, ThreadPoolExecutor] = {}
        self.stopping = False
        self.draining = False  # after SIGTERM: still serving, readiness 503 (service.server)
        self._loader: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        configure_pil(self.settings.max_image_pixels)
        for name, entry in self.registry.entries.items():
            self.metrics.register_model(name, state=lambda entry=entry: entry.state)
        self._loader = asyncio.get_running_loop().create_task(self._load_all(), name="onestage-load")

    async def _load_all(self) -> None:
        """Compile the finishing kernel and load models one by one off the event loop (live answers
        meanwhile; ready waits for all)."""
        await asyncio.to_thread(finishing.compile_kernel)
        for name in self.registry.entries:
            model = await asyncio.to_thread(self.registry.load, name)
            if model is None or self.stopping:
                continue
            pool = ThreadPoolExecutor(model.streams, thread_name_prefix=f"onestage-infer-{name}")
            batcher = DynamicBatcher(
                name,
                model.runtime.infer,
                model.rule.pad_value,
                max_batch_size=self.settings.max_batch_size,
                max_delay_s=self.settings.max_delay_ms / 1000,
                max_queue_size=self.settings.max_queue_size,
                executor=pool,
                metrics=self.metrics,
                max_in_flight=model.streams,
            )
            batcher.start()
            self.inference_pools[name], self.batchers[name] = pool, batcher
            self.metrics.model_info.labels(name).info(
                {
                    "version": model.version,
                    "method": model.metadata.method,
                    "runtime": model.runtime_name,
                    "providers": ",".join(model.providers),
                }
            )
            self.registry.mark_ready(name)
        if self.registry.ready:
            log.info("all %d models ready", len(self.registry.entries))

    async def stop(self) -> None:
        """Refuse new work, finish every queued request, release the request threads (the finishing
        kernel's pool is process-wide and idle by then)."""
        self.stopping = True
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
        await asyncio.gather(*(batcher.stop() for batcher in self.batchers.values()))
        for pool in [*self.inference_pools.values(), self.cpu_pool]:
            pool.shutdown(wait=True)

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
    def resolve(self, name: str | None) -> LoadedModel:
        """The model to run, or 404 (unknown) / 503 (still loading, failed, or shutting down)."""
        name = name or next(iter(self.registry.entries))
        entry = self.registry.entries.get(name)
        if entry is None:
            raise ServiceError(404, f"unknown model {name!r}; served: {', '.join(self.registry.entries)}", "bad_input")
        if self.stopping:
            raise ServiceError(503, "shutting down", "rejected", self._retry_after())
        if entry.state != "ready" or entry.model is None:
            message = f"model {name!r} is {entry.state}" + (f": {entry.error}" if entry.error else "")
            raise ServiceError(503, message, "rejected", self._retry_after())
        return entry.model

    def _retry_after(self) -> dict[str, str]:
        return {"Retry-After": str(self.settings.retry_after_s)}

    def _queue_full(self, model: LoadedModel) -> ServiceError:
        size = self.batchers[model.name].max_queue_size
        return ServiceError(
            503, f"model {model.name!r} queue is full ({size} waiting)", "rejected", self._retry_after()
        )

    async def read_body(self, request: Request) -> bytes:
        """The image bytes, from the raw body or the multipart field ``file``; the size limit is enforced
        from Content-Length and again while the body streams in, so no oversized body is ever buffered."""
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ServiceError(413, f"body of {declared} bytes exceeds the limit of {limit}", "bad_input")
        media_type = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip().lower()

        async def limited() -> AsyncGenerator[bytes, None]:
            received = 0
            try:
                async for chunk in request.stream():
                    received += len(chunk)
                    if received > limit:
                        raise ServiceError(413, f"body exceeds the limit of {limit} bytes", "bad_input")
                    yield chunk
            except ClientDisconnect:
                raise ServiceError(400, "the client went away before sending the whole body", "bad_input") from None

        if media_type == "multipart/form-data":
            parser = MultiPartParser(request.headers, limited(), max_files=1, max_fields=8, max_part_size=limit)
            try:
                form = await parser.parse()
            except MultiPartException as error:
                raise ServiceError(400, f"malformed multipart body: {error.message}", "bad_input") from None
            try:
                upload = form.get("file")
                if not isinstance(upload, UploadFile):
                    raise ServiceError(
                        400, "the multipart body needs the image in a file field named 'file'", "bad_input"
                    )
                return await upload.read()
            finally:
                await form.close()
        if media_type not in IMAGE_CONTENT_TYPES:
            raise ServiceError(
                415,
                f"content type {media_type!r} is not an image; send image/jpeg, image/png, image/webp, "
                "image/bmp, image/tiff, application/octet-stream or multipart/form-data",
                "bad_input",
            )
        return b"".join([chunk async for chunk in limited()])

    def decode(self, data: bytes, model: LoadedModel, channel: int | None) -> tuple[Image.Image, float]:
        """Decode and orient one image by the model's intensity rule, and the seconds it took (worker thread).
        The preprocessing metric gets them with the resize (``prepare``), or here when the image is refused."""
        started = time.perf_counter()
        try:
            return decode_image(
                data, self.settings.max_image_pixels, model.rule, channel
            ), time.perf_counter() - started
        except ImageRejected as error:
            self.metrics.preprocess.labels(model.name).observe(time.perf_counter() - started)
            raise ServiceError(error.status, error.message, "bad_input") from None

    def prepare(
        self, image: Image.Image, model: LoadedModel, scale: float, decode_s: float | None
    ) -> PreparedImage | TiledImage:
        """Resize one image into its shape bucket at the model's size times ``scale``, or, when it is larger
        than every bucket, cut it into tiles (worker thread). With the request's ``decode_s``, the pass that
        answers it records decode + resize as one preprocessing observation; a first pass (None) records none."""
        started = time.perf_counter()
        try:
            input_size = check_input_size(image, model.rule, scale, self.settings.max_image_pixels)
            tiled = prepare_tiles(image, input_size, model.buckets, self.settings.tile_overlap)
            return tiled if tiled is not None else prepare_image(image, model.rule, model.buckets, scale)
        except ImageRejected as error:
            raise ServiceError(error.status, error.message, "bad_input") from None
        finally:
            if decode_s is not None:
                self.metrics.preprocess.labels(model.name).observe(decode_s + time.perf_counter() - started)

    async def run(
        self,
        image: Image.Image,
        model: LoadedModel,
        options: SegmentOptions,
        scale: float,
        slot: Reservation,
        deadline: float,
        decode_s: float | None,
    ) -> tuple[list[finishing.Instance], int]:
        """One image at one scale through the batcher, whole (in the request's queue slot while it is unused) or
        as tiles (their own flow control; the slot is given back): its instances and its tile count. The
        preprocessing and finishing metrics record the pass that answers the request (``decode_s`` given), not
        a ``scale=auto`` first pass (None)."""
        loop = asyncio.get_running_loop()
        record = decode_s is not None
        prepared = await loop.run_in_executor(self.cpu_pool, self.prepare, image, model, scale, decode_s)
        if isinstance(prepared, TiledImage):
            slot.release()
            instances = await self.segment_tiles(prepared, model, options, deadline, record)
            return instances, len(prepared.plan.tiles)
        outputs = await self.predict(prepared, model, slot, deadline)
        finish = partial(self.finish, outputs, prepared, model, options, record)
        return await loop.run_in_executor(self.cpu_pool, finish), 1

    async def choose_scale(
        self, image: Image.Image, model: LoadedModel, options: SegmentOptions, slot: Reservation, deadline: float
    ) -> float:
        """The request's scale; for ``auto``, a boxes-only first pass at the model's own size whose median
        object is compared with the training objects' (``InputContract.estimate_scale``; 1 when it finds too
        few objects)."""
        if options.scale != "auto":
            return options.scale
        first_pass = replace(options, mask_format="none", score_threshold=0.0, max_detections=None)
        instances, _ = await self.run(image, model, first_pass, 1.0, slot, deadline, decode_s=None)
        boxes = np.array([i.box for i in instances], dtype=np.float32).reshape(-1, 4)
        scores = np.array([i.score for i in instances], dtype=np.float32)
        return model.rule.estimate_scale(boxes, scores, (image.size[1], image.size[0])) or 1.0

    async def predict(self, prepared: PreparedImage, model: LoadedModel, slot: Reservation, deadline: float) -> Outputs:
        """Queue the image in the request's reserved slot of the model's batcher (or, once that is used, as one
        more image of the request) and wait for its outputs until the deadline."""
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            raise ServiceError(504, "deadline passed before the request reached the queue", "timeout")
        try:
            future = (self.batchers[model.name] if slot.used else slot).submit(prepared.pixels, prepared.bucket)
        except QueueFull:
            raise self._queue_full(model) from None
        try:
            return await asyncio.wait_for(future, remaining)
        except TimeoutError:
            raise ServiceError(
                504, f"no result within the request deadline ({remaining:.3f} s left at queueing)", "timeout"
            ) from None
        except BackendError as error:
            raise ServiceError(500, f"inference failed: {error}", "backend") from None

    def finishing_options(self, model: LoadedModel, options: SegmentOptions) -> dict[str, Any]:
        """``finish_image``'s keyword arguments for this model and request, but for sizes and the cap."""
        metadata = model.metadata
        return {
            "mask_kind": metadata.mask_kind,
            "mask_threshold": metadata.mask_threshold,
            "score_threshold": options.score_threshold,
            "mask_format": "rle"
            if options.mask_format == "label"
            else options.mask_format,  # labels are painted from RLE
            "box_padding": metadata.box_padding or 0,
            "workers": self.settings.finishing_threads,
        }

    def finish(
        self, outputs: Outputs, prepared: PreparedImage, model: LoadedModel, options: SegmentOptions, record: bool
    ) -> list[finishing.Instance]:
        """Paste, threshold and encode the masks in the original frame (worker thread); ``record``: into the
        finishing metric."""
        started = time.perf_counter()
        instances = finishing.finish_outputs(
            outputs,
            input_size=prepared.input_size,
            image_size=prepared.original_size,
            max_detections=options.max_detections,
            **self.finishing_options(model, options),
        )
        if record:
            self.metrics.mask_finishing.labels(model.name).observe(time.perf_counter() - started)
        return instances

    async def segment_tiles(
        self, tiled: TiledImage, model: LoadedModel, options: SegmentOptions, deadline: float, record: bool
    ) -> list[finishing.Instance]:
        """Run the tiles through the model's batcher, finish each in the full frame as it arrives, and merge
        (``model.tiling.merge_tiles``): at most the model's detections per tile, or the request's cap;
        ``record``: the finishing time into its metric."""
        plan, finish_options = tiled.plan, self.finishing_options(model, options)

        def finish(outputs: Outputs, tile: Tile) -> list[finishing.Instance]:
            return finish_tile(outputs, plan, tile, **finish_options)

        window = 2 * self.settings.max_batch_size  # one batch running, the next one queued
        try:
            per_tile, finishing_s = await run_tiles(
                tiled, self.batchers[model.name], finish, self.cpu_pool, window, deadline
            )
        except QueueFull:
            raise self._queue_full(model) from None
        except TimeoutError:
            raise ServiceError(
                504, f"no result within the request deadline ({len(plan.tiles)} tiles)", "timeout"
            ) from None
        except BackendError as error:
            raise ServiceError(500, f"inference failed: {error}", "backend") from None
        started = time.perf_counter()
        limit = model.metadata.max_detections * len(plan.tiles)
        limit = limit if options.max_detections is None else min(limit, options.max_detections)
        instances = await asyncio.get_running_loop().run_in_executor(self.cpu_pool, merge_tiles, plan, per_tile, limit)
        if record:
            self.metrics.mask_finishing.labels(model.name).observe(finishing_s + time.perf_counter() - started)
        return instances

    @staticmethod
    def answer(
        instances: list[finishing.Instance], size: tuple[int, int], scale: float, model: LoadedModel
    ) -> SegmentResponse:
        names, ids = model.metadata.class_names, model.metadata.category_ids

        def encode(instance: finishing.Instance) -> Instance:
            x0, y0, x1, y1 = instance.box
            return Instance(
                bbox=(x0, y0, x1 - x0, y1 - y0),
                score=instance.score,
                category_id=ids[instance.class_index],
                category_name=names[instance.class_index],
                area=instance.area,
                segmentation=RLE(**instance.rle) if instance.rle is not None else instance.polygons,
            )

        height, width = size
        return SegmentResponse(
            model=model.name,
            version=model.version,
            width=width,
            height=height,
            scale=scale,
            instances=[encode(i) for i in instances],
        )

    def encode_response(self, answer: SegmentResponse, options: SegmentOptions, image: Image.Image | None) -> Response:
        """The answer as JSON, as the label PNG (mask_format=label) or drawn over the decoded image (the
        8-bit RGB the model saw, before resizing; render=overlay)."""
        if options.mask_format == "label":
            picture = label_image(answer)
        elif options.render == "overlay":
            if image is None:
                raise ValueError("render=overlay draws on the request's image: pass it")
            picture = overlay_image(np.asarray(image), answer)
        else:
            return Response(answer.model_dump_json(), media_type="application/json")
        return Response(png_bytes(picture), media_type="image/png", headers={"X-Instances": str(len(answer.instances))})

    async def segment(self, request: Request, model_name: str | None, options: SegmentOptions) -> Response:
        arrived = time.perf_counter()
        label, status = UNKNOWN_MODEL, 500
        loop = asyncio.get_running_loop()
        try:
            if model_name in self.registry.entries or model_name is None:
                label = model_name or next(iter(self.registry.entries))
            model = self.resolve(model_name)
            request_log.note_model(model.name)
            if (conflict := options.conflict()) is not None:
                raise ServiceError(422, conflict, "bad_input")
            if options.scale == "auto" and model.rule.object_size is None:
                raise ServiceError(
                    422,
                    f"scale=auto needs a model that records its training object size; {model.name!r} "
                    "does not (retrain it, or pass a number)",
                    "bad_input",
                )
            try:  # a slot in the model's queue, before the body is read and decoded
                slot = self.batchers[model.name].reserve()
            except QueueFull:
                raise self._queue_full(model) from None
            self.metrics.in_flight.labels(label).inc()
            try:
                data = await self.read_body(request)
                image, decode_s = await loop.run_in_executor(self.cpu_pool, self.decode, data, model, options.channel)
                del data
                deadline = arrived + options.timeout_s
                scale = await self.choose_scale(image, model, options, slot, deadline)
                instances, tiles = await self.run(image, model, options, scale, slot, deadline, decode_s)
                self.metrics.tiles.labels(model.name).observe(tiles)
                answer = self.answer(instances, (image.size[1], image.size[0]), scale, model)
                if options.picture:
                    response = await loop.run_in_executor(self.cpu_pool, self.encode_response, answer, options, image)
                else:
                    response = self.encode_response(answer, options, None)
            finally:
                slot.release()
                self.metrics.in_flight.labels(label).dec()
            status = 200
            return response
        except ServiceError as error:
            status = error.status
            self.metrics.fail(label, error.reason)
            return error_response(error.status, error.message, error.headers)
        except Exception:
            log.exception("unexpected failure on a %s request", label)
            self.metrics.fail(label, "backend")
            return error_response(500, "internal server error")
        finally:
            self.metrics.request_duration.labels(label, str(status)).observe(time.perf_counter() - arrived)

    # ------------------------------------------------------------------ metadata
    def model_metadata(self, entry: ModelEntry) -> ModelMetadata:
        model = entry.model
        if model is None:
            return ModelMetadata(name=entry.spec.name, versions=[], platform=None, state=entry.state, error=entry.error)
        meta = model.metadata
        output_shapes = {
            "num_dets": [-1],
            "boxes": [-1, meta.max_detections, 4],
            "scores": [-1, meta.max_detections],
            "classes": [-1, meta.max_detections],
        }
        output_shapes["masks"] = [-1, meta.max_detections, meta.mask_size or -1, meta.mask_size or -1]
        return ModelMetadata(
            name=model.name,
            versions=[model.version],
            platform=TRITON_PLATFORMS[model.runtime_name],
            state=entry.state,
            error=entry.error,
            runtime=model.runtime_name,
            providers=model.providers,
            method=meta.method,
            mask_kind=meta.mask_kind,
            class_names=meta.class_names,
            category_ids=meta.category_ids,
            score_threshold=meta.score_threshold,
            mask_threshold=meta.mask_threshold,
            max_detections=meta.max_detections,
            min_size=meta.input.min_size,
            max_size=meta.input.max_size,
            input=meta.input,
            buckets=model.buckets,
            inputs=[TensorInfo(name=meta.input_name, datatype="UINT8", shape=[-1, 3, -1, -1])],
            outputs=[
                TensorInfo(
                    name=n, datatype="FP32" if n in ("boxes", "scores", "masks") else "INT64", shape=output_shapes[n]
                )
                for n in meta.output_names
            ],
        )
