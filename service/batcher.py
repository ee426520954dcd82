"""Dynamic batching for one model, Triton-style: bounded queue, max delay, max batch, per-request deadline.

Requests are queued by shape bucket. The worker takes the bucket whose first request is oldest, waits
until that bucket holds ``max_batch_size`` requests or its first request has waited ``max_delay`` (a
request that already waited that long while a batch ran goes at once), and runs the batch in a thread,
so the event loop keeps accepting requests and answering health checks meanwhile. Up to ``max_in_flight``
batches per model run at once (one per inference stream of the runtime, each in its own executor thread);
the next batch forms as soon as a stream is free, from the requests that queued meanwhile. A request whose
caller gave up (deadline or disconnect) leaves the queue at once.

Admission is bounded: a request takes one of ``max_queue_size`` slots (``reserve``) before its body is read
and decoded and holds it until its batch starts, so a burst is refused at once (503) instead of piling up
in front of the queue. ``stop`` refuses new requests, runs every queued one and waits for those still
holding a slot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from inference.sizing import pad_batch
from service.metrics import Metrics

log = logging.getLogger(__name__)

Outputs = dict[str, np.ndarray]


class QueueFull(Exception):
    """``max_queue_size`` requests of the model are queued or about to be, or the batcher is stopping."""


class BackendError(Exception):
    """The runtime failed on the batch that held this request."""


@dataclass(eq=False)
class _Pending:
    pixels: np.ndarray  # [3, h, w]
    bucket: tuple[int, int]
    future: asyncio.Future[Outputs]
    enqueued: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    def __init__(
        self,
        name: str,
        infer: Callable[[np.ndarray], Outputs],
        pad_value: tuple[int, int, int],
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue_size: int,
        executor: Executor,
        metrics: Metrics,
        max_in_flight: int = 1,
    ) -> None:
        self.name = name
        self._infer = infer
        self._pad_value = pad_value
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue_size = max_queue_size
        self._executor = executor
        self._metrics = metrics
        self._queues: dict[tuple[int, int], deque[_Pending]] = {}
        self._depth = 0
        self._reserved = 0  # slots held by admitted requests that are not queued yet
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._worker: asyncio.Task[None] | None = None
        self._free_streams = asyncio.Semaphore(max_in_flight)
        self._running: set[asyncio.Task[None]] = set()
        metrics.queue_capacity.labels(name).set(max_queue_size)  # 0 until now: a loading model admits nothing

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def full(self) -> bool:
        return self._stopping or self._depth + self._reserved >= self.max_queue_size

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Refuse new requests, run every queued one, then end the worker once its batches are done."""
        self._stopping = True
        self._wakeup.set()
        if self._worker is not None:
            await self._worker
        await asyncio.gather(*self._running)

    def _refuse(self) -> QueueFull:
        if self._stopping:
            return QueueFull(f"model {self.name!r} is shutting down")
        return QueueFull(f"model {self.name!r} queue is full ({self.max_queue_size} waiting)")

    def reserve(self) -> Reservation:
        """Hold a queue slot for a request whose image is still to be read and decoded; raises ``QueueFull``."""
        if self.full:
            raise self._refuse()
        self._reserved += 1
        return Reservation(self)

    def submit(self, pixels: np.ndarray, bucket: tuple[int, int]) -> asyncio.Future[Outputs]:
        """Queue one more image of an admitted request (a tile, or a second pass) without a reserved slot;
        raises ``QueueFull``."""
        if self.full:
            raise self._refuse()
        return self._enqueue(pixels, bucket)

    def _unreserve(self) -> None:
        self._reserved -= 1
        self._wakeup.set()  # a stopping worker waits for the last slot

    def _enqueue(self, pixels: np.ndarray, bucket: tuple[int, int]) -> asyncio.Future[Outputs]:
        item = _Pending(pixels, bucket, asyncio.get_running_loop().create_future())
        self._queues.setdefault(bucket, deque()).append(item)
        self._set_depth(self._depth + 1)
        item.future.add_done_callback(lambda _: self._discard(item))
        self._wakeup.set()
        return item.future

    def _discard(self, item: _Pending) -> None:
        """Drop a request that was answered or given up on while still queued."""
        queue = self._queues.get(item.bucket)
        if queue is not None and item in queue:
            queue.remove(item)
            self._set_depth(self._depth - 1)

    def _set_depth(self, depth: int) -> None:
        self._depth = depth
        self._metrics.queue_depth.labels(self.name).set(depth)

    def _oldest_bucket(self) -> tuple[int, int] | None:
        heads = [(queue[0].enqueued, bucket) for bucket, queue in self._queues.items() if queue]
        return min(heads)[1] if heads else None

    async def _wait(self, timeout: float | None) -> None:
        self._wakeup.clear()
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
        except TimeoutError:
            pass

    async def _run(self) -> None:
        while True:
            await self._free_streams.acquire()  # a batch forms only once a stream can take it
            try:
                if not await self._dispatch_one():
                    return
            except BaseException:
                self._free_streams.release()
                raise

    async def _dispatch_one(self) -> bool:
        """Form one batch and start it (its stream is released when it ends); False when stopped and empty."""
        while True:
            bucket = self._oldest_bucket()
            if bucket is None:
                if self._stopping and not self._reserved:
                    self._free_streams.release()
                    return False
                await self._wait(None)
                continue
            queue = self._queues[bucket]
            flush_at = queue[0].enqueued + self.max_delay_s
            while queue and len(queue) < self.max_batch_size and not self._stopping:
                remaining = flush_at - time.perf_counter()
                if remaining <= 0:
                    break
                await self._wait(remaining)
            if not queue:  # every waiting request was given up on meanwhile
                continue
            batch = [queue.popleft() for _ in range(min(len(queue), self.max_batch_size))]
            self._set_depth(self._depth - len(batch))
            task = asyncio.get_running_loop().create_task(self._execute(bucket, batch))
            self._running.add(task)
            task.add_done_callback(self._batch_done)
            return True

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._free_streams.release()

    async def _execute(self, bucket: tuple[int, int], batch: list[_Pending]) -> None:
        started = time.perf_counter()
        for item in batch:
            self._metrics.queue_wait.labels(self.name).observe(started - item.enqueued)
        self._metrics.batch_size.labels(self.name).observe(len(batch))
        images = [item.pixels for item in batch]
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(self._executor, self._predict, images, bucket)
        except Exception as error:
            log.exception("model %s failed on a batch of %d at %s", self.name, len(batch), bucket)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(BackendError(f"{type(error).__name__}: {error}"))
            return
        for i, item in enumerate(batch):
            if not item.future.done():
                item.future.set_result({key: value[i] for key, value in outputs.items()})

    def _predict(self, images: list[np.ndarray], bucket: tuple[int, int]) -> Outputs:
        started = time.perf_counter()
        outputs = self._infer(pad_batch(images, bucket, self._pad_value))
        self._metrics.inference.labels(self.name).observe(time.perf_counter() - started)
        return outputs


class Reservation:
    """One request's queue slot, from admission until ``submit`` queues its image or ``release`` gives it up."""

    def __init__(self, batcher: DynamicBatcher) -> None:
        self._batcher: DynamicBatcher | None = batcher

    def submit(self, pixels: np.ndarray, bucket: tuple[int, int]) -> asyncio.Future[Outputs]:
        """Queue the resized image ``pixels [3, h, w]`` in the slot; the future gets its own slice of the batch
        outputs. Cancelling the future (a caller's timeout) takes the request out of the queue."""
        batcher = self._batcher
        if batcher is None:
            raise RuntimeError("this slot was already used or released")
        self._batcher = None
        batcher._unreserve()
        return batcher._enqueue(pixels, bucket)

    @property
    def used(self) -> bool:
        """Whether the slot was used (``submit``) or given up (``release``)."""
        return self._batcher is None

    def release(self) -> None:
        """Give the slot up unless it was used (a request that failed before reaching the queue); idempotent."""
        if self._batcher is not None:
            self._batcher._unreserve()
            self._batcher = None
