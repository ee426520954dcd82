"""The exported graph in onnxruntime, behind the ``model.runtime_protocol.Runtime`` interface.

A graph runtime takes uint8 RGB ``images [B, 3, H, W]`` (H, W multiples of 32), returns the graph contract as
numpy arrays (``num_dets``, ``boxes``, ``scores``, ``classes`` and, for mask methods, ``masks``) and exposes
the exported ``metadata`` record, so the service never needs the checkpoint or the config. This module does
not import torch, so a service running ONNX graphs never loads it; the TensorRT runtime, whose buffers are
torch CUDA tensors, lives in ``export.tensorrt_runtime``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from export.metadata import METADATA_KEY, GraphMetadata

log = logging.getLogger(__name__)

ACCELERATED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def check_images(images: np.ndarray, divisibility: int) -> np.ndarray:
    """The batch as a C-contiguous uint8 array, or a ValueError that says what is wrong with it."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    if images.shape[2] % divisibility or images.shape[3] % divisibility:
        raise ValueError(f"image height and width must be multiples of {divisibility}, got {tuple(images.shape[2:])}")
    return np.ascontiguousarray(images)


def default_providers() -> list[str]:
    """CUDA (then CPU) where onnxruntime offers it and a CUDA device exists, else CPU only.

    onnxruntime-gpu lists its CUDA provider even on hosts that cannot load it, so the device is checked
    too; the TensorRT provider is left to explicit requests (it builds an engine per new input shape).
    """
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return ["CPUExecutionProvider"]
    # Only a GPU build of onnxruntime gets here; torch (installed beside it on GPU hosts) is imported this
    # late so that CPU serving never loads it.
    import torch

    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if torch.cuda.is_available() else ["CPUExecutionProvider"]


class OnnxRuntime:
    """An exported ``.onnx`` graph in onnxruntime.

    ``providers`` defaults to ``default_providers()``. After the session is created its active providers
    are checked: a requested accelerator that did not load is reported once and the session runs on CPU.
    """

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None) -> None:
        requested = list(providers) if providers is not None else default_providers()
        if "CPUExecutionProvider" not in requested:
            requested.append("CPUExecutionProvider")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=requested)
        except Exception as error:  # some onnxruntime builds raise where others fall back to the next provider
            if requested == ["CPUExecutionProvider"]:
                raise
            log.warning("onnxruntime failed with %s (%s); retrying on CPU", requested, error)
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.providers: list[str] = self.session.get_providers()
        missing = [p for p in requested if p in ACCELERATED_PROVIDERS and p not in self.providers]
        if missing:
            log.warning("onnxruntime could not use %s on this host; running on %s", missing, self.providers)
        props = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in props:
            raise ValueError(f"{path} carries no {METADATA_KEY!r} metadata: export it with `python -m export`")
        self.metadata = GraphMetadata.from_json(props[METADATA_KEY])
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def accelerated(self) -> bool:
        return any(p in ACCELERATED_PROVIDERS for p in self.providers)

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        batch = check_images(images, self.metadata.input.size_divisibility)
        values = self.session.run(self.output_names, {self.metadata.input_name: batch})
        return dict(zip(self.output_names, values))
