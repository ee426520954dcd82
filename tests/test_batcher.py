"""The dynamic batcher keeps up to ``max_in_flight`` batches running at once, one per inference stream."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.batcher import DynamicBatcher
from service.metrics import Metrics

BUCKET = (32, 32)


class SlowRuntime:
    """Takes ``seconds`` per batch and records how many batches ran at the same time; its output tags each
    image with its own first pixel, so every request can check it got its own slice back."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.running = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(self.seconds)
        with self._lock:
            self.running -= 1
        return {"tag": images[:, 0, 0, 0].astype(np.int64)}


async def serve(runtime: SlowRuntime, requests: int, max_in_flight: int) -> tuple[list[int], float]:
    """``requests`` single-image batches through a batcher; each request's tag and the wall time."""
    with ThreadPoolExecutor(max_in_flight) as pool:
        batcher = DynamicBatcher(
            "m",
            runtime.infer,
            (0, 0, 0),
            max_batch_size=1,
            max_delay_s=0.0,
            max_queue_size=64,
            executor=pool,
            metrics=Metrics(1),
            max_in_flight=max_in_flight,
        )
        batcher.start()
        started = time.perf_counter()
        futures = [batcher.submit(np.full((3, 32, 32), i, dtype=np.uint8), BUCKET) for i in range(requests)]
        outputs = await asyncio.gather(*futures)
        wall = time.perf_counter() - started
        await batcher.stop()
    return [int(o["tag"]) for o in outputs], wall


@pytest.mark.parametrize("max_in_flight", [1, 2, 4])
def test_batches_run_side_by_side_up_to_the_stream_count(max_in_flight: int) -> None:
    runtime = SlowRuntime(0.2)
    tags, wall = asyncio.run(serve(runtime, 8, max_in_flight))
    assert tags == list(range(8))  # every request got its own result
    assert runtime.most_at_once == max_in_flight
    assert wall < 8 * 0.2 / max_in_flight + 0.5  # a sleeping runtime needs no CPU, so overlap shows in time


def test_stop_waits_for_the_batches_in_flight() -> None:
    runtime = SlowRuntime(0.3)

    async def scenario() -> list[bool]:
        with ThreadPoolExecutor(2) as pool:
            batcher = DynamicBatcher(
                "m",
                runtime.infer,
                (0, 0, 0),
                max_batch_size=1,
                max_delay_s=0.0,
                max_queue_size=64,
                executor=pool,
                metrics=Metrics(1),
                max_in_flight=2,
            )
            batcher.start()
            futures = [batcher.submit(np.zeros((3, 32, 32), dtype=np.uint8), BUCKET) for _ in range(3)]
            await asyncio.sleep(0.05)  # two batches running, one queued
            await batcher.stop()
            return [f.done() and f.exception() is None for f in futures]

    assert asyncio.run(scenario()) == [True, True, True]
