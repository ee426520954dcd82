"""The fused ONNX graph in OpenVINO on the CPU: one static batch-1 engine per height x width, bf16 where the
CPU has it.

OpenVINO reads the exported ``.onnx`` file as it is (``NonMaxSuppression`` and the dynamic batch, height and
width survive the conversion), so the graph contract is the one onnxruntime sees: uint8 RGB
``images [B, 3, H, W]`` (H, W multiples of 32) in, ``num_dets``, ``boxes``, ``scores``, ``classes`` and
``masks`` out, and the same ``metadata`` record.

Why static shapes: an engine compiled for one static shape is 1.5-1.9x faster than a dynamic one alternating
between sizes, so every height x width (the service's shape buckets) gets its own compiled model, made from
a clone of the read model reshaped to that shape. Engines are compiled on first use of their shape (the
service does that for every bucket during warm-up) and kept; OpenVINO's model cache (``CACHE_DIR``) stores
each compiled blob on disk, so a restart loads them instead of compiling again.

Why batch 1 only: a batch of B images runs as B consecutive batch-1 inferences on one infer request. The
engines used to be one per (batch size, height, width), batch 1 and the service's largest batch, and that
is what made OpenVINO expensive to keep: every compiled engine holds its own copy of the whole graph for
each stream (a batch-1 EmbedMask engine added 65 MB on average with one stream and 103 MB with two, little
of it activations), and a static batch-8 engine holds the activations of eight images besides. Measured
on this repository's 2-core AMD EPYC (bf16, one thread per stream, each bundled model alone with all eight
default buckets warmed, ``VmRSS``; ``python -m bench.openvino_memory``,
``bench/results/openvino_memory_*.json``):

    engines                            EmbedMask 1 / 2 streams   MEInst 1 / 2 streams
    batch 1 and 8 per bucket (before)      2019 / 3163 MB          1538 / 2406 MB
    batch 1..8 dynamic, one per bucket     1842 / 3472 MB          1458 / 2275 MB
    batch 1 per bucket (this module)        720 / 1019 MB           638 /  900 MB
    onnxruntime, one session per stream     306 /  396 MB           272 /  349 MB

Batching buys nothing on the CPU here: eight batch-1 inferences took 1.09-1.11x the time of one static batch-8
inference at 256x256 and 0.91-0.94x at 512x512 (fastest of 15 interleaved rounds, one thread;
``bench/results/openvino_latency_*.json``), and a dynamic batch dimension was no faster than static batch 8. Batch 1
stays 1.5-1.8x faster than onnxruntime's. The graph's fixed cost per engine and stream is also why OpenVINO
still needs more memory than onnxruntime, which frees its activations after each run and holds one graph per
session: both bundled models loaded and warmed as the service does (two streams) held 1.75 GB against
0.50 GB (``bench/results/openvino_memory_service.json``). The service's ``runtime=auto`` takes OpenVINO only
on a CPU with bf16, where that memory buys its speed (``service.models.choose_runtime``).

Precision: ``INFERENCE_PRECISION_HINT`` bf16 when the device lists ``BF16`` among its
``OPTIMIZATION_CAPABILITIES`` (AVX-512 BF16 or AMX), else f32; either can be forced. OpenVINO keeps NMS,
TopK and the box decode in f32 and runs the convolutions in bf16.

Streams: each engine runs ``streams`` inference streams of ``threads`` threads each
(``NUM_STREAMS`` and ``INFERENCE_NUM_THREADS`` = streams x threads), with one infer request per stream;
up to ``streams`` calls to ``infer`` from different threads run at the same time, each on its own stream
(a batch stays on one stream, image after image).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
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
    """One compiled height x width (batch 1) and its idle infer requests (one per stream)."""

    compiled: ov.CompiledModel
    idle: queue.SimpleQueue[ov.InferRequest]

    def run(self, batch: np.ndarray, count: int) -> list[np.ndarray]:
        """The ``count`` outputs of ``batch`` (any size, the engine's height and width), one image after the
        other on one infer request, copied out of its buffers into arrays of the whole batch."""
        request = self.idle.get()  # blocks while every stream of this engine is busy
        try:
            outputs: list[np.ndarray] = []
            for index in range(len(batch)):
                request.infer({0: batch[index : index + 1]})
                tensors = [request.get_output_tensor(i).data for i in range(count)]
                if not outputs:
                    outputs = [np.empty((len(batch), *t.shape[1:]), dtype=t.dtype) for t in tensors]
                for output, tensor in zip(outputs, tensors):
                    output[index] = tensor[0]
            return outputs
        finally:
            self.idle.put(request)


class OpenVinoRuntime:
    """An exported ``.onnx`` graph compiled by OpenVINO, one batch-1 engine per height x width (see the
    module doc).

    ``threads`` is the thread count of each stream (None: OpenVINO's choice); ``cache_dir`` holds OpenVINO's
    model cache (None: no cache).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        precision: Precision = "auto",
        threads: int | None = None,
        streams: int = 1,
        cache_dir: str | Path | None = None,
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
        self._model = self._core.read_model(str(path))
        self.output_names = [output.get_any_name() for output in self._model.outputs]
        self._engines: dict[tuple[int, int], _Engine] = {}
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

    def engine(self, height: int, width: int) -> _Engine:
        """The batch-1 engine of one height x width, compiled (or loaded from the model cache) on first use."""
        key = (height, width)
        engine = self._engines.get(key)
        if engine is not None:
            return engine
        with self._compiling:
            if key not in self._engines:
                started = time.perf_counter()
                model = self._model.clone()
                model.reshape({self.metadata.input_name: ov.PartialShape([1, 3, height, width])})
                compiled = self._core.compile_model(model, DEVICE, self.config)
                idle: queue.SimpleQueue[ov.InferRequest] = queue.SimpleQueue()
                for _ in range(self.streams):
                    idle.put(compiled.create_infer_request())
                self._engines[key] = _Engine(compiled, idle)
                log.info(
                    "OpenVINO engine 1x3x%dx%d (%s) ready in %.2f s",
                    height,
                    width,
                    self.precision,
                    time.perf_counter() - started,
                )
            return self._engines[key]

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """The (height, width) of every compiled engine."""
        return sorted(self._engines)

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        batch = check_images(images, self.metadata.input.size_divisibility)
        count, _, height, width = batch.shape
        if count == 0:
            raise ValueError("images must hold at least one image, got an empty batch")
        outputs = self.engine(height, width).run(batch, len(self.output_names))
        return dict(zip(self.output_names, outputs))
