"""The eager detector behind the runtime interface (``model.runtime_protocol.Runtime``)."""

from __future__ import annotations

import numpy as np
import torch

from model.detector import OneStageDetector


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
