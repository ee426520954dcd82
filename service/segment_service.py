"""The service behind the routes: models, their batchers and threads, metrics, and the request steps.

A segmentation request goes through small named steps (as LitServe names them): ``read_body`` (streamed,
size-checked) -> ``preprocess`` (decode, EXIF orientation, resize, bucket; in a worker thread) -> the
model's ``DynamicBatcher`` (batch -> predict in the model's inference thread -> unbatch) -> ``finish``
(``model.finishing.finish_image``: paste, threshold, RLE; in a worker thread) -> ``encode_response``.
Every failure becomes JSON ``{"error": ...}`` with its status and a ``reason`` in the failure metric; no
input can take down the process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from model import finishing
from model.mask_contract import MaskFormat
from model.tiling import Tile, finish_tile, merge_tiles
from service.batcher import BackendError, DynamicBatcher, Outputs, QueueFull
from service.imaging import (
    IMAGE_CONTENT_TYPES,
    ImageRejected,
    PreparedImage,
    configure_pil,
    decode_image,
    prepare_image,
)
from service.metrics import UNKNOWN_MODEL, Metrics
from service.models import LoadedModel, ModelEntry, ModelRegistry
from service.schemas import RLE, Instance, ModelMetadata, SegmentResponse, TensorInfo
from service.settings import Settings
from service.tiled import TiledImage, prepare_tiles, run_tiles

log = logging.getLogger(__name__)


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
    mask_format: MaskFormat
    timeout_s: float


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
        self._loader: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        configure_pil(self.settings.max_image_pixels)
        for name in self.registry.entries:
            self.metrics.register_model(name)
        self._loader = asyncio.get_running_loop().create_task(self._load_all(), name="onestage-load")

    async def _load_all(self) -> None:
        """Compile the finishing kernel and load models one by one off the event loop (live answers
        meanwhile; ready waits for all)."""
        await asyncio.to_thread(finishing.compile_kernel)
        for name in self.registry.entries:
            model = await asyncio.to_thread(self.registry.load, name)
            if model is None or self.stopping:
                continue
            pool = ThreadPoolExecutor(1, thread_name_prefix=f"onestage-infer-{name}")
            batcher = DynamicBatcher(
                name,
                model.runtime.infer,
                model.rule.pad_value,
                max_batch_size=self.settings.max_batch_size,
                max_delay_s=self.settings.max_delay_ms / 1000,
                max_queue_size=self.settings.max_queue_size,
                executor=pool,
                metrics=self.metrics,
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

    @property
    def ready(self) -> bool:
        return self.registry.ready and not self.stopping

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

    def preprocess(self, data: bytes, model: LoadedModel) -> PreparedImage | TiledImage:
        """Decode, orient and resize one image into its shape bucket, or, when it is larger than every
        bucket at the model's scale, cut it into tiles (worker thread)."""
        started = time.perf_counter()
        try:
            image = decode_image(data, self.settings.max_image_pixels)
            input_size = model.rule.resized_shape(image.size[1], image.size[0])
            tiled = prepare_tiles(image, input_size, model.buckets, self.settings.tile_overlap)
            return tiled if tiled is not None else prepare_image(image, model.rule, model.buckets)
        except ImageRejected as error:
            raise ServiceError(error.status, error.message, "bad_input") from None
        finally:
            self.metrics.preprocess.labels(model.name).observe(time.perf_counter() - started)

    async def predict(self, prepared: PreparedImage, model: LoadedModel, deadline: float) -> Outputs:
        """Queue the image in the model's batcher and wait for its outputs until the deadline."""
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            raise ServiceError(504, "deadline passed before the request reached the queue", "timeout")
        try:
            future = self.batchers[model.name].submit(prepared.pixels, prepared.bucket)
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
            "mask_format": options.mask_format,
            "box_padding": metadata.box_padding or 0,
            "workers": self.settings.finishing_threads,
        }

    def finish(
        self, outputs: Outputs, prepared: PreparedImage, model: LoadedModel, options: SegmentOptions
    ) -> list[finishing.Instance]:
        """Paste, threshold and encode the masks in the original frame (worker thread)."""
        started = time.perf_counter()
        instances = finishing.finish_image(
            outputs["num_dets"],
            outputs["boxes"],
            outputs["scores"],
            outputs["classes"],
            outputs.get("masks"),
            input_size=prepared.input_size,
            image_size=prepared.original_size,
            max_detections=options.max_detections,
            **self.finishing_options(model, options),
        )
        self.metrics.mask_finishing.labels(model.name).observe(time.perf_counter() - started)
        return instances

    async def segment_tiles(
        self, tiled: TiledImage, model: LoadedModel, options: SegmentOptions, deadline: float
    ) -> list[finishing.Instance]:
        """Run the tiles through the model's batcher, finish each in the full frame as it arrives, and merge
        (``model.tiling.merge_tiles``): at most the model's detections per tile, or the request's cap."""
        plan, finish_options = tiled.plan, self.finishing_options(model, options)

        def finish(outputs: Outputs, tile: Tile) -> list[finishing.Instance]:
            return finish_tile(outputs, plan, tile, **finish_options)

        window = 2 * self.settings.max_batch_size  # one batch running, the next one queued
        try:
            per_tile, finishing_s = await run_tiles(tiled, self.batchers[model.name], finish, self.cpu_pool, window, deadline)
        except QueueFull:
            raise self._queue_full(model) from None
        except TimeoutError:
            raise ServiceError(504, f"no result within the request deadline ({len(plan.tiles)} tiles)", "timeout") from None
        except BackendError as error:
            raise ServiceError(500, f"inference failed: {error}", "backend") from None
        started = time.perf_counter()
        limit = model.metadata.max_detections * len(plan.tiles)
        limit = limit if options.max_detections is None else min(limit, options.max_detections)
        instances = await asyncio.get_running_loop().run_in_executor(self.cpu_pool, merge_tiles, plan, per_tile, limit)
        self.metrics.mask_finishing.labels(model.name).observe(finishing_s + time.perf_counter() - started)
        return instances

    @staticmethod
    def encode_response(
        instances: list[finishing.Instance], prepared: PreparedImage | TiledImage, model: LoadedModel
    ) -> Response:
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

        height, width = prepared.original_size
        body = SegmentResponse(
            model=model.name,
            version=model.version,
            width=width,
            height=height,
            instances=[encode(i) for i in instances],
        )
        return Response(body.model_dump_json(), media_type="application/json")

    async def segment(self, request: Request, model_name: str | None, options: SegmentOptions) -> Response:
        arrived = time.perf_counter()
        label, status = UNKNOWN_MODEL, 500
        loop = asyncio.get_running_loop()
        try:
            if model_name in self.registry.entries or model_name is None:
                label = model_name or next(iter(self.registry.entries))
            model = self.resolve(model_name)
            if self.batchers[model.name].full:  # refuse before reading and decoding the body
                raise self._queue_full(model)
            self.metrics.in_flight.labels(label).inc()
            try:
                data = await self.read_body(request)
                prepared = await loop.run_in_executor(self.cpu_pool, self.preprocess, data, model)
                del data
                if isinstance(prepared, TiledImage):
                    self.metrics.tiles.labels(model.name).observe(len(prepared.plan.tiles))
                    instances = await self.segment_tiles(prepared, model, options, arrived + options.timeout_s)
                else:
                    self.metrics.tiles.labels(model.name).observe(1)
                    outputs = await self.predict(prepared, model, arrived + options.timeout_s)
                    instances = await loop.run_in_executor(
                        self.cpu_pool, partial(self.finish, outputs, prepared, model, options)
                    )
                response = self.encode_response(instances, prepared, model)
            finally:
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
            platform="tensorrt_plan" if model.runtime_name == "tensorrt" else "onnxruntime_onnx",
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
            buckets=model.buckets,
            inputs=[TensorInfo(name=meta.input_name, datatype="UINT8", shape=[-1, 3, -1, -1])],
            outputs=[
                TensorInfo(
                    name=n, datatype="FP32" if n in ("boxes", "scores", "masks") else "INT64", shape=output_shapes[n]
                )
                for n in meta.output_names
            ],
        )
