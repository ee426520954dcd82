"""The runtime interface: anything that turns a uint8 image batch into the graph contract's outputs.

Evaluation, the service and the parity checks hold a ``Runtime`` and never know whether eager PyTorch
(``model.runtime.TorchRuntime``), onnxruntime or TensorRT (``export.runtimes``) is behind it. This module
imports neither torch nor a graph runtime, so code that only holds a ``Runtime`` stays free of both.

Outputs (numpy, padded to ``max_detections``): ``num_dets [B]``, ``boxes [B,K,4]`` xyxy input pixels,
``scores [B,K]``, ``classes [B,K]`` and, for mask methods, ``masks`` (MEInst ``[B,K,28,28]`` box-relative
probabilities, EmbedMask ``[B,K,H/4,W/4]`` log-probabilities).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Runtime(Protocol):
    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """``images``: uint8 [B, 3, H, W] RGB, H and W multiples of 32."""
        ...
