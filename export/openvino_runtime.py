"""The fused ONNX graph in OpenVINO on the CPU: one static engine per input shape, bf16 where the CPU has it.

OpenVINO reads the exported ``.onnx`` file as it is (``NonMaxSuppression`` and the dynamic batch, height and
width survive the conversion), so the graph contract is the one onnxruntime sees: uint8 RGB
``images [B, 3, H, W]`` (H, W multiples of 32) in, ``num_dets``, ``boxes``, ``scores``, ``classes`` and
``masks`` out, and the same ``metadata`` record.

Why one engine per shape: an engine compiled for one static shape is 1.5-1.9x faster than a dynamic one
alternating between sizes, so every (batch size, height, width) gets its own compiled model, made from a
clone of the read model reshaped to that shape. Engines are compiled on first use of their shape (the
service does that for every bucket during warm-up) and kept; OpenVINO's model cache (``CACHE_DIR``)
stores each compiled blob on disk, so a restart loads them instead of compiling again.

A batch whose size has no engine runs as consecutive chunks of the compiled ``batch_sizes`` (largest
first, batch 1 for the rest), so the batcher may form any batch size without a compile in the middle of
serving.

Precision: ``INFERENCE_PRECISION_HINT`` bf16 when the device lists ``BF16`` among its
``OPTIMIZATION_CAPABILITIES`` (AVX-512 BF16 or AMX), else f32; either can be forced. OpenVINO keeps NMS,
TopK and the box decode in f32 and runs the convolutions in bf16.

Streams: each engine runs ``streams`` inference streams of ``threads`` threads each
(``NUM_STREAMS`` and ``INFERENCE_NUM_THREADS`` = streams x threads), with one infer request per stream;
up to ``streams`` calls to ``infer`` from different threads run at the same time, each on its own stream.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import openvino as ov

from export.metadata import read_onnx_metadata
from export.runtimes import check_images

log = logging.getLogger(__name__)

Precision = Literal["auto", "bf16", "fp32"]
DEVICE = "CPU"
_HINTS = {"bf16": "bf16", "fp32": "f32"}


def cpu_has_bf16(core: ov.Core | None = None, device: str = DEVICE) -> bool:
    """Whether OpenVINO's ``device`` computes in bf16 natively (it lists ``BF16`` as an optimization capability)."""
    core = core or ov.Core()
    return "BF16" in core.get_property(device, "OPTIMIZATION_CAPABILITIES")


def resolve_precision(
    precision: Precision, core: ov.Core | None = None, device: str = DEVICE
) -> Literal["bf16", "fp32"]:
    """``auto`` -> bf16 where the device has it, else fp32; a forced bf16 on a device without it is an error,
    so that a setting asking for bf16 never quietly runs something else."""
    has_bf16 = cpu_has_bf16(core, device)
    if precision == "auto":
        return "bf16" if has_bf16 else "fp32"
    if precision == "bf16" and not has_bf16:
        raise ValueError(
            f"bf16 was forced but OpenVINO's {device} device lacks it (no BF16 in OPTIMIZATION_CAPABILITIES)"
        )
    return precision


@dataclass
class _Engine:
    """One compiled static shape and its idle infer requests (one per stream)."""

    compiled: ov.CompiledModel
    idle: queue.SimpleQueue[ov.InferRequest]

    def run(self, batch: np.ndarray, names: list[str]) -> list[np.ndarray]:
        """The outputs of ``batch`` (exactly the engine's shape), copied out of the request's buffers."""
        request = self.idle.get()  # blocks while every stream of this engine is busy
        try:
            request.infer({0: batch})
            return [request.get_output_tensor(i).data.copy() for i in range(len(names))]
        finally:
            self.idle.put(request)


class OpenVinoRuntime:
    """An exported ``.onnx`` graph compiled by OpenVINO, one engine per input shape (see the module doc).

    ``threads`` is the thread count of each stream (None: OpenVINO's choice); ``cache_dir`` holds OpenVINO's
    model cache (None: no cache); ``batch_sizes`` are the batch sizes compiled for each new height x width
    (1 is always among them).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        precision: Precision = "auto",
        threads: int | None = None,
        streams: int = 1,
        cache_dir: str | Path | None = None,
        batch_sizes: Sequence[int] = (1,),
    ) -> None:
        if streams < 1 or (threads is not None and threads < 1):
            raise ValueError(f"streams and threads must be >= 1, got streams={streams} threads={threads}")
        self.metadata = read_onnx_metadata(path)
        self._core = ov.Core()
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            self._core.set_property({"CACHE_DIR": str(cache_dir)})
        self.precision = resolve_precision(precision, self._core)
        self.streams, self.threads = streams, threads
        self.batch_sizes = sorted({1, *batch_sizes}, reverse=True)
        self._model = self._core.read_model(str(path))
        self.output_names = [output.get_any_name() for output in self._model.outputs]
        self._engines: dict[tuple[int, int, int], _Engine] = {}
        self._compiling = threading.Lock()
        self.providers = [f"OpenVINO {ov.__version__} {DEVICE} {self.precision} {streams}x{threads or 'auto'} threads"]

    @property
    def config(self) -> dict[str, str | int]:
        """The ``compile_model`` properties of every engine."""
        config: dict[str, str | int] = {
            "INFERENCE_PRECISION_HINT": _HINTS[self.precision],
            # LATENCY for one stream, THROUGHPUT for several; NUM_STREAMS below fixes the count either way.
            "PERFORMANCE_HINT": "LATENCY" if self.streams == 1 else "THROUGHPUT",
            "NUM_STREAMS": self.streams,
        }
        if self.threads is not None:
            config["INFERENCE_NUM_THREADS"] = self.streams * self.threads
        return config

    def engine(self, batch: int, height: int, width: int) -> _Engine:
        """The engine of one static shape, compiled (or loaded from the model cache) on first use."""
        key = (batch, height, width)
        engine = self._engines.get(key)
        if engine is not None:
            return engine
        with self._compiling:
            if key not in self._engines:
                started = time.perf_counter()
                model = self._model.clone()
                model.reshape({self.metadata.input_name: ov.PartialShape([batch, 3, height, width])})
                compiled = self._core.compile_model(model, DEVICE, self.config)
                idle: queue.SimpleQueue[ov.InferRequest] = queue.SimpleQueue()
                for _ in range(self.streams):
                    idle.put(compiled.create_infer_request())
                self._engines[key] = _Engine(compiled, idle)
                log.info(
                    "OpenVINO engine %dx3x%dx%d (%s) ready in %.2f s",
                    batch,
                    height,
                    width,
                    self.precision,
                    time.perf_counter() - started,
                )
            return self._engines[key]

    @property
    def shapes(self) -> list[tuple[int, int, int]]:
        """The (batch, height, width) of every compiled engine."""
        return sorted(self._engines)

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        batch = check_images(images, self.metadata.input.size_divisibility)
        count, _, height, width = batch.shape
        for size in self.batch_sizes:  # every batch size of a new height x width at once, as warm-up expects
            self.engine(size, height, width)
        if count in self.batch_sizes:
            return dict(zip(self.output_names, self._engines[(count, height, width)].run(batch, self.output_names)))
        chunks: list[list[np.ndarray]] = []
        start = 0
        while start < count:
            size = next(s for s in self.batch_sizes if s <= count - start)
            chunks.append(self._engines[(size, height, width)].run(batch[start : start + size], self.output_names))
            start += size
        return {name: np.concatenate([chunk[i] for chunk in chunks]) for i, name in enumerate(self.output_names)}
