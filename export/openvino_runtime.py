"""The fused ONNX graph in OpenVINO on the CPU: one static batch-1 engine per height x width, compiled when a
shape is first needed and kept while it is among the most recently used; bf16 where the CPU has it, with the
operations a model needs exact kept in fp32.

OpenVINO reads the exported ``.onnx`` file as it is (``NonMaxSuppression`` and the dynamic batch, height and
width survive the conversion), so the graph contract is the one onnxruntime sees: uint8 RGB
``images [B, 3, H, W]`` (H, W multiples of 32) in, ``num_dets``, ``boxes``, ``scores``, ``classes`` and
``masks`` out, and the same ``metadata`` record.

Why static shapes: an engine compiled for one static shape was 1.2x faster than one dynamic engine at a
fixed shape and 1.4-1.6x faster alternating between sizes (EmbedMask, 2 streams), so every height x width (the
service's shape buckets) gets its own compiled model, made from the graph reshaped to that shape. Engines are
compiled on first use of their shape (the service warms only its largest bucket, where tiles run) and at most
``max_engines`` are kept, the least recently used released first; OpenVINO's model cache (``CACHE_DIR``)
stores each compiled blob on disk, so a restart or a released shape loads it (~0.5 s) instead of compiling
it again (~1 s).

Why few engines: every compiled engine holds its own copy of the whole graph for each stream (a batch-1
EmbedMask engine added 65 MB on average with one stream and 103 MB with two, little of it activations), and
the first one also the plugin's own ~80 MB. With every one of the eight default buckets compiled, one bundled
model held 720 / 1019 MB with one / two streams, against 306 / 396 MB in onnxruntime, and the service with
both models 1.9 GB; with one engine per model (the largest bucket, two streams) it idles near 0.5 GB
(``bench/results/replica_lean.json``). One dynamic engine per model held 280 MB.

Why batch 1 only: a batch of B images runs as B consecutive batch-1 inferences on one infer request
(``BEST_BATCH_SIZE``: the service forms no larger batches for it). Eight batch-1 inferences took 1.09-1.11x
the time of one static batch-8 inference at 256x256 and 0.91-0.94x at 512x512, a dynamic batch dimension was
no faster than static batch 8, and a batch-8 engine holds eight images' activations
(``bench/results/openvino_latency_*.json``, ``openvino_memory_*.json``).

Precision (``export.metadata.CpuPrecision``): ``INFERENCE_PRECISION_HINT`` bf16 when the device lists ``BF16``
among its ``OPTIMIZATION_CAPABILITIES`` (AVX-512 BF16 or AMX), else f32. In bf16 the plugin runs the
convolutions and matrix products in bf16 and keeps NMS, TopK and the graph's tail after its last such
operation in f32. That cost EmbedMask 4.9 segm AP on the test fields: its coupling subtracts large embedding
terms. ``fp32_operations`` finds the mask decode (or the whole mask branch) by the graph's structure, and
they are marked to keep their precision; the Python API cannot set that mark, so a marked graph is written
once as IR (``graph_source``). A model's choice is measured on its validation split (``training.precision``)
and stored in its metadata; ``auto`` runs it, or ``DEFAULT_CPU_PRECISION`` without one. The plugin turns a
MatMul with constant weights (MEInst's codec) into a FullyConnected and drops the mark there; MEInst loses
nothing measurable in bf16.

Streams: each engine runs ``streams`` inference streams of ``threads`` threads each
(``NUM_STREAMS`` and ``INFERENCE_NUM_THREADS`` = streams x threads), with one infer request per stream;
up to ``streams`` calls to ``infer`` from different threads run at the same time, each on its own stream
(a batch stays on one stream, image after image).
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import openvino as ov

from export.metadata import MASK_OUTPUT, CpuPrecision, GraphMetadata, read_onnx_metadata
from export.runtimes import check_images, file_version

log = logging.getLogger(__name__)

PrecisionChoice = Literal["auto"] | CpuPrecision
DEVICE = "CPU"
# What ``auto`` runs on a bf16 CPU for a graph that records no measured choice (``GraphMetadata.cpu_precision``):
# the mask decode in fp32 costs little (no convolution) and kept EmbedMask's segm AP on the test fields within
# 0.3 of fp32, where bf16 throughout lost 4.9 (``bench/results/precision_*.json``).
DEFAULT_CPU_PRECISION: CpuPrecision = "bf16+fp32_mask_decode"
# The operations whose outputs a convolution reads: the mask decode is what the masks output needs after them.
CONVOLUTIONS = frozenset({"Convolution", "GroupConvolution", "ConvolutionBackpropData"})
# The IR attribute that keeps an operation in its original precision where the CPU plugin lowers the rest (the
# plugin reads it when it builds its graph; a test checks that it still does, tests/test_openvino.py).
KEEP_PRECISION = {"name": "DisablePrecisionConversion", "version": "0", "value": "dynamic:f16"}
# Bumped when the marking changes, so that IR written by an earlier rule is not reused.
MARKING_VERSION = 1
# The precisions that keep part of a bf16 graph in fp32 (``fp32_operations``).
MIXED_PRECISIONS: tuple[CpuPrecision, ...] = ("bf16+fp32_mask_decode", "bf16+fp32_mask_branch")


def cpu_has_bf16(core: ov.Core | None = None, device: str = DEVICE) -> bool:
    """Whether OpenVINO's ``device`` computes in bf16 natively (it lists ``BF16`` as an optimization capability)."""
    core = core or ov.Core()
    return "BF16" in core.get_property(device, "OPTIMIZATION_CAPABILITIES")


def resolve_precision(
    precision: PrecisionChoice,
    metadata: GraphMetadata | None = None,
    core: ov.Core | None = None,
    device: str = DEVICE,
) -> CpuPrecision:
    """``auto`` -> fp32 where the device lacks bf16, else the graph's measured choice (``metadata.cpu_precision``)
    or ``DEFAULT_CPU_PRECISION``; a forced precision with bf16 in it on a device without bf16 is an error, so
    that a setting asking for bf16 never quietly runs something else."""
    has_bf16 = cpu_has_bf16(core, device)
    if precision == "auto":
        if not has_bf16:
            return "fp32"
        return (metadata.cpu_precision if metadata is not None else None) or DEFAULT_CPU_PRECISION
    if precision != "fp32" and not has_bf16:
        raise ValueError(
            f"{precision} was forced but OpenVINO's {device} device lacks bf16 (no BF16 in OPTIMIZATION_CAPABILITIES)"
        )
    return precision


def _consumers(op: ov.Node) -> list[ov.Node]:
    return [target.get_node() for output in op.outputs() for target in output.get_target_inputs()]


def _ancestors(outputs: list[ov.Output]) -> set[str]:
    """Friendly names of every operation the ``outputs`` depend on (themselves included)."""
    seen: set[str] = set()
    stack = [output.get_node() for output in outputs]
    while stack:
        op = stack.pop()
        if op.get_friendly_name() in seen:
            continue
        seen.add(op.get_friendly_name())
        stack += [value.get_source_output().get_node() for value in op.inputs()]
    return seen


def fp32_operations(model: ov.Model, precision: CpuPrecision) -> set[str]:
    """Friendly names of the operations ``precision`` keeps in fp32 where the rest runs in bf16 (found by the
    graph's structure, so any exported model of any mask method gets them): the mask branch is every operation
    that only the ``masks`` output depends on; its decode, those of them after its last convolutions (neither a
    convolution nor feeding one). Constants are left out (they hold no computation). Empty for bf16 and fp32
    and for boxes-only graphs."""
    masks = [output for output in model.outputs if output.get_any_name() == MASK_OUTPUT]
    if precision not in MIXED_PRECISIONS or not masks:
        return set()
    others = [output for output in model.outputs if output.get_any_name() != MASK_OUTPUT]
    mask_only = _ancestors(masks) - _ancestors(others)
    ops = [op for op in model.get_ordered_ops() if op.get_type_name() not in ("Constant", "Parameter", "Result")]
    if precision == "bf16+fp32_mask_decode":
        feeds_convolution: set[str] = set()
        for op in reversed(ops):  # consumers come later in topological order
            if any(
                consumer.get_type_name() in CONVOLUTIONS or consumer.get_friendly_name() in feeds_convolution
                for consumer in _consumers(op)
            ):
                feeds_convolution.add(op.get_friendly_name())
        mask_only -= feeds_convolution | {op.get_friendly_name() for op in ops if op.get_type_name() in CONVOLUTIONS}
    return {op.get_friendly_name() for op in ops if op.get_friendly_name() in mask_only}


def _write_marked_ir(model: ov.Model, names: set[str], target: Path) -> None:
    """``model`` as OpenVINO IR at ``target`` (``.xml`` and its ``.bin``, fp32 weights), the operations
    ``names`` carrying ``KEEP_PRECISION``; written beside the target first, then renamed into place (the
    ``.bin`` before the ``.xml`` that needs it), so a reader never sees half of it."""
    staging = Path(tempfile.mkdtemp(prefix=".ir-", dir=target.parent))
    try:
        xml = staging / "graph.xml"
        ov.save_model(model, xml, compress_to_fp16=False)
        tree = ElementTree.parse(xml)
        for layer in tree.getroot().iter("layer"):
            if layer.get("name") in names:
                rt_info = layer.find("rt_info")
                if rt_info is None:
                    rt_info = ElementTree.SubElement(layer, "rt_info")
                ElementTree.SubElement(rt_info, "attribute", KEEP_PRECISION)
        tree.write(xml)
        os.replace(staging / "graph.bin", target.with_suffix(".bin"))
        os.replace(xml, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def graph_source(core: ov.Core, path: Path, precision: CpuPrecision, ir_dir: Path) -> Path:
    """The file OpenVINO reads for the graph at ``path`` under ``precision``: the graph itself, or, when
    ``precision`` keeps operations in fp32, the graph as IR with those operations marked.

    OpenVINO's Python API cannot set that mark, but its IR carries it: such a graph is written once into
    ``ir_dir``, named by the graph's digest, the precision and ``MARKING_VERSION``, and read from there (its
    weights memory-mapped)."""
    if precision not in MIXED_PRECISIONS:
        return path
    target = ir_dir / f"{path.stem}-{file_version(path)}-{precision}-v{MARKING_VERSION}.xml"
    if target.is_file():
        return target
    model = core.read_model(str(path))
    names = fp32_operations(model, precision)
    if not names:
        return path
    ir_dir.mkdir(parents=True, exist_ok=True)
    _write_marked_ir(model, names, target)
    log.info("%s: %d operations kept in fp32 (%s), IR in %s", path, len(names), precision, target)
    return target


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

    ``precision``: ``auto`` (``resolve_precision``) or one of ``export.metadata.CpuPrecision``. ``threads`` is
    the thread count of each stream (None: OpenVINO's choice); ``cache_dir`` holds OpenVINO's model cache and
    the IR of graphs with operations kept in fp32 (None: neither is kept). ``max_engines`` bounds the compiled
    shapes kept at once: beyond it the least recently used one is released (None: every shape stays).
    """

    # A batch runs image by image on batch-1 engines: batching requests only makes them wait for each other.
    BEST_BATCH_SIZE = 1

    def __init__(
        self,
        path: str | Path,
        *,
        precision: PrecisionChoice = "auto",
        threads: int | None = None,
        streams: int = 1,
        cache_dir: str | Path | None = None,
        max_engines: int | None = None,
    ) -> None:
        if streams < 1 or (threads is not None and threads < 1) or (max_engines is not None and max_engines < 1):
            raise ValueError(
                f"streams, threads and max_engines must be >= 1, got {streams}, {threads} and {max_engines}"
            )
        self.metadata = read_onnx_metadata(path)
        self._core = ov.Core()
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            self._core.set_property({"CACHE_DIR": str(cache_dir)})
        self.precision = resolve_precision(precision, self.metadata, self._core)
        self.streams, self.threads, self.max_engines = streams, threads, max_engines
        # The graph is read again for each compile instead of held (~20 MB per model): memory that only a
        # compile needs. Marked IR goes to the cache, or to a folder of this runtime's own without one.
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        if cache_dir is not None:
            ir_dir = Path(cache_dir) / "ir"
        else:
            self._scratch = tempfile.TemporaryDirectory(prefix="onestage-ir-")
            ir_dir = Path(self._scratch.name)
        self._source = graph_source(self._core, Path(path), self.precision, ir_dir)
        self.output_names = [output.get_any_name() for output in self._core.read_model(str(self._source)).outputs]
        self._engines: OrderedDict[tuple[int, int], _Engine] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()  # guards _engines
        self._compiling = threading.Lock()  # one compile at a time; inference on other engines goes on
        self.providers = [f"OpenVINO {ov.__version__} {DEVICE} {self.precision} {streams}x{threads or 'auto'} threads"]

    @property
    def config(self) -> dict[str, str | int]:
        """The ``compile_model`` properties of every engine."""
        config: dict[str, str | int] = {
            "INFERENCE_PRECISION_HINT": "f32" if self.precision == "fp32" else "bf16",
            # LATENCY for one stream, THROUGHPUT for several; NUM_STREAMS below fixes the count either way.
            "PERFORMANCE_HINT": "LATENCY" if self.streams == 1 else "THROUGHPUT",
            "NUM_STREAMS": self.streams,
        }
        if self.threads is not None:
            config["INFERENCE_NUM_THREADS"] = self.streams * self.threads
        return config

    def engine(self, height: int, width: int) -> _Engine:
        """The batch-1 engine of one height x width, compiled (or loaded from the model cache) on first use and
        kept while it is among the ``max_engines`` most recently used. A released engine's memory returns once
        its last running batch ends."""
        key = (height, width)
        with self._lock:
            engine = self._engines.get(key)
            if engine is not None:
                self._engines.move_to_end(key)
                return engine
        with self._compiling:
            with self._lock:
                engine = self._engines.get(key)
            if engine is None:
                engine = self._compile(height, width)
                with self._lock:
                    self._engines[key] = engine
                    while self.max_engines is not None and len(self._engines) > self.max_engines:
                        released, _ = self._engines.popitem(last=False)
                        log.info("OpenVINO engine 1x3x%dx%d released (at most %d kept)", *released, self.max_engines)
            return engine

    def _compile(self, height: int, width: int) -> _Engine:
        started = time.perf_counter()
        model = self._core.read_model(str(self._source))
        model.reshape({self.metadata.input_name: ov.PartialShape([1, 3, height, width])})
        compiled = self._core.compile_model(model, DEVICE, self.config)
        idle: queue.SimpleQueue[ov.InferRequest] = queue.SimpleQueue()
        for _ in range(self.streams):
            idle.put(compiled.create_infer_request())
        log.info(
            "OpenVINO engine 1x3x%dx%d (%s) ready in %.2f s",
            height,
            width,
            self.precision,
            time.perf_counter() - started,
        )
        return _Engine(compiled, idle)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """The (height, width) of every engine kept."""
        with self._lock:
            return sorted(self._engines)

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        batch = check_images(images, self.metadata.input.size_divisibility)
        count, _, height, width = batch.shape
        if count == 0:
            raise ValueError("images must hold at least one image, got an empty batch")
        outputs = self.engine(height, width).run(batch, len(self.output_names))
        return dict(zip(self.output_names, outputs))
