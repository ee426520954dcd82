"""The runtime interface: anything that turns a uint8 image batch into the graph contract's outputs.

Evaluation, the service and the parity checks hold a ``Runtime`` and never know whether eager PyTorch,
onnxruntime or TensorRT is behind it. Outputs (numpy, padded to ``max_detections``): ``num_dets [B]``,
``boxes [B,K,4]`` xyxy input pixels, ``scores [B,K]``, ``classes [B,K]`` and, for mask methods,
``masks`` (MEInst ``[B,K,28,28]`` box-relative probabilities, EmbedMask ``[B,K,H/4,W/4]`` log-probabilities).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from model.detector import OneStageDetector


class Runtime(Protocol):
    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """``images``: uint8 [B, 3, H, W] RGB, H and W multiples of 32."""
        ...


class TorchRuntime:
    """The eager detector behind the runtime interface."""

    def __init__(self, model: OneStageDetector, device: str | torch.device = "cpu") -> None:
        self.model = model
        self.device = torch.device(device)

    @torch.inference_mode()
    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        was_training = self.model.training
        self.model.eval()
        try:
            detections = self.model(torch.from_numpy(np.ascontiguousarray(images)).to(self.device))
        finally:
            self.model.train(was_training)
        outputs = {
            "num_dets": detections.num_dets,
            "boxes": detections.boxes,
            "scores": detections.scores,
            "classes": detections.classes,
        }
        if detections.masks is not None:
            outputs["masks"] = detections.masks
        return {name: value.cpu().numpy() for name, value in outputs.items()}
