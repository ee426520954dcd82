"""One served model at work: its runtime and pipeline, its dynamic batcher and inference threads, its metrics,
and the asynchronous driver that runs a request's passes through them.

The pipeline (``inference.pipeline``) decides what to run: ``ImagePipeline.steps`` yields a request's passes
(a ``scale=auto`` probe, then the answering pass unless the probe answers) and returns its answer.
``ModelWorker.segment`` drives those steps as ``inference.pipeline.run_sync`` does in one thread, except that
a pass's inputs (the image, or its tiles) go through the model's ``DynamicBatcher``, where they share batches
with other requests' inputs, and the CPU work of the steps (decode, resize or cut, finish, merge) runs in the
service's worker threads, off the event loop.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor, ThreadPoolExecutor

import numpy as np

from inference.pipeline import ImagePipeline, Pass, PassResult, Segmentation, SegmentOptions, advance
from inference.runtime import OpenedModel, served_batch_size
from model.finishing import Instance
from service.batcher import DynamicBatcher, Outputs, QueueFull, Reservation
from service.errors import DeadlinePassed
from service.metrics import Metrics
from service.settings import Settings


class ModelWorker:
    """A loaded model's batcher, inference threads (one per stream) and request driver."""

    def __init__(
        self,
        name: str,
        opened: OpenedModel,
        pipeline: ImagePipeline,
        settings: Settings,
        metrics: Metrics,
        cpu_pool: Executor,
    ) -> None:
        self.name, self.opened, self.pipeline = name, opened, pipeline
        self.metrics, self.cpu_pool = metrics, cpu_pool
        self.inference_pool = ThreadPoolExecutor(opened.streams, thread_name_prefix=f"onestage-infer-{name}")
        # No larger batches than the engine runs best: on the CPU engines a batch costs as much per image as
        # single images and makes its requests wait for one another (``inference.runtime.served_batch_size``).
        batch_size = served_batch_size(opened, settings.max_batch_size)
        self.batcher = DynamicBatcher(
            name,
            opened.runtime.infer,
            tuple(pipeline.contract.pad_value),  # type: ignore[arg-type]  # three values, checked by the contract
            max_batch_size=batch_size,
            max_delay_s=settings.max_delay_ms / 1000,
            max_queue_size=settings.max_queue_size,
            executor=self.inference_pool,
            metrics=metrics,
            max_in_flight=opened.streams,
        )
        # A request keeps at most a batch of its inputs queued per stream (running) and one more (the next).
        self.window = (opened.streams + 1) * batch_size

    def start(self) -> None:
        """Start batching (on the running event loop) and publish the model's identity."""
        self.batcher.start()
        opened = self.opened
        self.metrics.model_info.labels(self.name).info(
            {
                "version": opened.version,
                "method": opened.metadata.method,
                "runtime": opened.engine,
                "providers": ",".join(opened.providers),
            }
        )

    async def stop(self) -> None:
        """Refuse new inputs, run every queued one, then release the inference threads."""
        await self.batcher.stop()
        self.inference_pool.shutdown(wait=True)

    def reserve(self) -> Reservation:
        """A queue slot for a request whose body is still to be read (``QueueFull`` when there is none)."""
        return self.batcher.reserve()

    async def segment(
        self, data: bytes, options: SegmentOptions, slot: Reservation, deadline: float
    ) -> tuple[np.ndarray, Segmentation]:
        """Decode one image and run its passes: the RGB the model read and the answer.

        The preprocessing metric gets one observation per request (decode, then the resize or cut of the pass
        that answers it; decode alone when the image is refused) and the finishing metric one for that pass:
        the last one (a ``scale=auto`` probe that does not answer adds neither)."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            image = await loop.run_in_executor(self.cpu_pool, self.pipeline.decode, data, options.channel)
        except Exception:
            self.metrics.preprocess.labels(self.name).observe(time.perf_counter() - started)
            raise
        decode_s = time.perf_counter() - started
        steps = self.pipeline.steps(image, options)
        started = time.perf_counter()
        step = await loop.run_in_executor(self.cpu_pool, advance, steps, None)
        prepare_s = finishing_s = 0.0
        while isinstance(step, Pass):
            prepare_s = time.perf_counter() - started
            result, finishing_s = await self.run_pass(step, slot, deadline)
            started = time.perf_counter()
            step = await loop.run_in_executor(self.cpu_pool, advance, steps, result)
        self.metrics.preprocess.labels(self.name).observe(decode_s + prepare_s)
        self.metrics.mask_finishing.labels(self.name).observe(finishing_s)
        self.metrics.tiles.labels(self.name).observe(step.tiles)
        return image.rgb, step

    async def run_pass(self, step: Pass, slot: Reservation, deadline: float) -> tuple[PassResult, float]:
        """Every input of ``step`` through the batcher, each finished in a worker thread as its outputs arrive,
        then collected (tiles merged): the pass's result and the seconds spent finishing and merging.

        The first input takes the request's reserved queue slot while it is unused; the others queue as more
        inputs of an admitted request, at most ``window`` at a time, and while the queue is full a request
        waits for its own inputs instead of failing: only a request with nothing queued gets ``QueueFull``.
        Raises ``QueueFull``, ``DeadlinePassed`` or the batcher's ``BackendError``; inputs still queued then
        leave the queue."""
        loop = asyncio.get_running_loop()
        queued: dict[asyncio.Future[Outputs], int] = {}
        finishing: dict[int, asyncio.Future[tuple[list[Instance], bool, float]]] = {}
        following = 0

        def finish(index: int, outputs: Outputs) -> tuple[list[Instance], bool, float]:
            started = time.perf_counter()
            return step.finish(index, outputs), step.saturated(outputs), time.perf_counter() - started

        try:
            while following < len(step.inputs) or queued:
                while following < len(step.inputs) and len(queued) < self.window:
                    if deadline - time.perf_counter() <= 0:
                        raise DeadlinePassed("deadline passed before the request reached the queue")
                    pixels = step.inputs[following]
                    try:
                        future = (self.batcher if slot.used else slot).submit(pixels, step.bucket)
                    except QueueFull:
                        if not queued:
                            raise
                        break  # room comes back as this request's own inputs finish
                    queued[future] = following
                    following += 1
                remaining = deadline - time.perf_counter()
                done: set[asyncio.Future[Outputs]] = set()
                if remaining > 0:
                    done, _ = await asyncio.wait(queued, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    raise DeadlinePassed(f"no result within the request deadline ({len(step.inputs)} input(s))")
                for future in done:
                    index = queued.pop(future)
                    finishing[index] = loop.run_in_executor(self.cpu_pool, finish, index, future.result())
            finished = [await finishing[index] for index in range(len(step.inputs))]
        finally:
            for future in queued:
                future.cancel()
            for pending in finishing.values():
                pending.cancel()
        started = time.perf_counter()
        per_input = [instances for instances, _, _ in finished]
        saturated = sum(full for _, full, _ in finished)
        result = await loop.run_in_executor(self.cpu_pool, step.collect, per_input, saturated)
        return result, sum(seconds for _, _, seconds in finished) + time.perf_counter() - started
