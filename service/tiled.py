"""Images larger than every shape bucket in the service: cut into tiles (``model.tiling``), the tiles sent
through the model's dynamic batcher as batch elements, each tile finished in the full frame as its outputs
arrive, and the instances merged into one answer.

A request keeps at most ``window`` of its tiles queued at a time (two batches' worth: one running, the next
waiting), so it can fill batches without crowding other requests out of the queue; while the queue is full
it waits for its own tiles instead of failing, and only a request with nothing queued gets ``QueueFull``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from model.finishing import Instance
from model.tiling import Tile, TilePlan, cut_tile, plan_tiles
from service.batcher import DynamicBatcher, Outputs, QueueFull


@dataclass(frozen=True)
class TiledImage:
    """An image cut into tiles, each resized by the image's factor (unpadded)."""

    plan: TilePlan
    pixels: list[np.ndarray]  # [3, h_in, w_in] uint8 per tile, in plan order

    @property
    def original_size(self) -> tuple[int, int]:
        return self.plan.image_size


def prepare_tiles(
    image: Image.Image, input_size: tuple[int, int], buckets: list[tuple[int, int]], overlap: int
) -> TiledImage | None:
    """The tiles of an RGB image whose model input size is `input_size` (the contract's size rule times the
    caller's scale), or None when it runs whole (`prepare_image`)."""
    width, height = image.size
    plan = plan_tiles((height, width), input_size, buckets, overlap)
    if plan is None:
        return None
    return TiledImage(plan, [cut_tile(image, tile) for tile in plan.tiles])


async def run_tiles(
    tiled: TiledImage,
    batcher: DynamicBatcher,
    finish: Callable[[Outputs, Tile], list[Instance]],
    executor: Executor,
    window: int,
    deadline: float,
) -> tuple[list[list[Instance]], float]:
    """Every tile's instances (plan order, full frame) and the seconds spent finishing them.

    Raises ``QueueFull`` (the queue is full and none of this request's tiles is in it), ``TimeoutError``
    (the deadline passed) or the batcher's ``BackendError``; the tiles still queued then leave the queue.
    """
    loop = asyncio.get_running_loop()
    tiles = tiled.plan.tiles
    queued: dict[asyncio.Future[Outputs], int] = {}
    finishing: dict[int, asyncio.Future[tuple[list[Instance], float]]] = {}
    following = 0

    def timed_finish(outputs: Outputs, tile: Tile) -> tuple[list[Instance], float]:
        started = time.perf_counter()
        return finish(outputs, tile), time.perf_counter() - started

    try:
        while following < len(tiles) or queued:
            while following < len(tiles) and len(queued) < window:
                try:
                    future = batcher.submit(tiled.pixels[following], tiled.plan.bucket)
                except QueueFull:
                    if not queued:
                        raise
                    break  # room comes back as this request's own tiles finish
                queued[future] = following
                following += 1
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise TimeoutError
            done, _ = await asyncio.wait(queued, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                raise TimeoutError
            for future in done:
                k = queued.pop(future)
                finishing[k] = loop.run_in_executor(executor, timed_finish, future.result(), tiles[k])
        finished = [await finishing[k] for k in range(len(tiles))]
    finally:
        for future in queued:
            future.cancel()
        for pending in finishing.values():
            pending.cancel()
    return [instances for instances, _ in finished], sum(seconds for _, seconds in finished)
