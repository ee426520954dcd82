"""The PyTorch runtime behind the runtime interface (``model.runtime_protocol.Runtime``): eager for
evaluation, tuned for serving on a GPU.

Its outputs are the fused ONNX graph's contract (numpy, padded to ``max_detections``): ``num_dets [B]``
int64, ``boxes [B,K,4]`` float32 xyxy input pixels, ``scores [B,K]`` float32, ``classes [B,K]`` int64 and,
for mask methods, ``masks`` float32 (MEInst ``[B,K,28,28]`` box-relative probabilities, EmbedMask
``[B,K,H/4,W/4]`` log-probabilities).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Literal

import numpy as np
import torch

from model.detector import MethodOutputs, OneStageDetector
from model.fcos_head import FCOSHeadOutputs

Precision = Literal["fp32", "fp16", "bf16"]
# Autocast dtypes of the network part; detection selection and mask decode always run in float32.
AUTOCAST_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Runs of a new shape on a side stream before its CUDA graph is captured (cuDNN picks its algorithms,
# the caching allocator settles), as torch.cuda.graphs' documentation asks.
CAPTURE_WARMUP_RUNS = 3

DenseOutputs = tuple[FCOSHeadOutputs, "MethodOutputs | None"]


def default_device() -> torch.device:
    """The first CUDA device when torch sees one, else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _float32(head: FCOSHeadOutputs, method_outputs: MethodOutputs | None) -> DenseOutputs:
    """The dense outputs as float32 (a no-op without autocast): NMS ranks, boxes and the EmbedMask coupling's
    log-probabilities need float32's range and precision, whatever precision the convolutions ran in."""
    head = FCOSHeadOutputs(*([t.float() for t in getattr(head, f.name)] for f in fields(head)))
    if method_outputs is not None:
        method_outputs = MethodOutputs(
            level_extras=[t.float() for t in method_outputs.level_extras],
            dense=method_outputs.dense.float() if method_outputs.dense is not None else None,
        )
    return head, method_outputs


@dataclass
class _CapturedShape:
    """One input shape's CUDA graph: replaying it reads ``images`` and rewrites ``outputs`` in place."""

    graph: torch.cuda.CUDAGraph
    images: torch.Tensor
    outputs: DenseOutputs


class TorchRuntime:
    """The detector behind the runtime interface, on ``device`` (CPU or a CUDA device).

    ``precision``: the network part (backbone, FPN, head, mask branch) runs under autocast to fp16 or bf16
    when asked; the data-dependent rest (selection, NMS, padding, mask decode) always in float32, as the
    graph does. ``channels_last`` stores weights and input NHWC (the layout tensor cores' convolutions want).
    ``cuda_graphs`` captures the network part once per input shape (B, H, W) on first sight and replays it
    afterwards, which removes the per-layer launch overhead; warming every served shape up captures them
    all before the first request. ``compile`` runs the network part through ``torch.compile`` (compiled per
    shape, then with dynamic shapes after the first change). Both only pay where launch overhead or fusion
    matter, so they are off unless asked.

    The model is moved to ``device`` (and ``channels_last``) in place. ``infer`` puts it in eval mode for
    the call and restores its mode after; calls are serialised (CUDA graphs rewrite their outputs in place).
    """

    def __init__(
        self,
        model: OneStageDetector,
        device: str | torch.device = "cpu",
        *,
        precision: Precision = "fp32",
        channels_last: bool = False,
        cuda_graphs: bool = False,
        compile: bool = False,
    ) -> None:
        self.device = torch.device(device)
        if precision not in ("fp32", *AUTOCAST_DTYPES):
            raise ValueError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {self.device}")
        self.precision: Precision = precision
        self.channels_last = channels_last
        self.cuda_graphs = cuda_graphs
        self.model = model.to(self.device)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._network = torch.compile(self._dense) if compile else self._dense
        self._captured: dict[tuple[int, ...], _CapturedShape] = {}
        self._lock = threading.Lock()

    @property
    def captured_shapes(self) -> list[tuple[int, ...]]:
        """The input shapes (B, 3, H, W) that have a CUDA graph."""
        return sorted(self._captured)

    def _dense(self, images: torch.Tensor) -> DenseOutputs:
        autocast = torch.autocast(
            self.device.type,
            dtype=AUTOCAST_DTYPES.get(self.precision, torch.float32),
            enabled=self.precision != "fp32",
            # Autocast's cache of cast weights must stay out of CUDA graph captures (torch's graph docs).
            cache_enabled=not self.cuda_graphs,
        )
        with autocast:
            _, head, method_outputs = self.model.dense_outputs(images)
        return _float32(head, method_outputs)

    def _replay(self, images: torch.Tensor) -> DenseOutputs:
        key = tuple(images.shape)
        captured = self._captured.get(key)
        if captured is None:
            static = images.clone()  # keeps the channels-last strides
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(CAPTURE_WARMUP_RUNS):
                    self._network(static)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = self._network(static)
            captured = self._captured[key] = _CapturedShape(graph, static, outputs)
        captured.images.copy_(images)
        captured.graph.replay()
        return captured.outputs

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    @torch.inference_mode()
    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        batch = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with self._lock, self._eval_mode():
            head, method_outputs = self._replay(batch) if self.cuda_graphs else self._network(batch)
            detections = self.model.detect(head, method_outputs)
            outputs = {
                "num_dets": detections.num_dets,
                "boxes": detections.boxes,
                "scores": detections.scores,
                "classes": detections.classes,
            }
            if detections.masks is not None:
                outputs["masks"] = detections.masks
            return {name: value.cpu().numpy() for name, value in outputs.items()}
