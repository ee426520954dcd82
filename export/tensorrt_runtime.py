"""A serialized TensorRT engine behind the ``model.runtime_protocol.Runtime`` interface.

Its buffers are torch CUDA tensors, which is why it lives apart from ``export.runtimes`` (onnxruntime,
torch-free): only a service that runs engines imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.metadata import read_engine_sidecar
from export.runtimes import check_images
from export.tensorrt_build import import_tensorrt


class TensorRTRuntime:
    """A serialized TensorRT engine (from ``python -m export --format tensorrt``) on one CUDA device.

    Buffers are torch CUDA tensors; the engine's optimization profile bounds the accepted shapes. Integer
    outputs come back as int64 whatever width the engine uses.
    """

    def __init__(self, engine_path: str | Path, device: str = "cuda:0") -> None:
        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise RuntimeError("the TensorRT runtime needs a CUDA device, and torch sees none")
        self.device = torch.device(device)
        self.metadata, self.build_info = read_engine_sidecar(engine_path)
        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            self._engine = trt.Runtime(self._logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
            if self._engine is None:
                raise RuntimeError(
                    f"TensorRT could not deserialize {engine_path} (built by another TensorRT version or GPU?)"
                )
            self._context = self._engine.create_execution_context()
        self._stream = torch.cuda.Stream(self.device)
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self.output_names = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._dtypes = {n: _torch_dtype(trt, self._engine.get_tensor_dtype(n)) for n in names}

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        batch = check_images(images, self.metadata.input.size_divisibility)
        name = self.metadata.input_name
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            inputs = torch.from_numpy(batch).to(self.device, non_blocking=True)
            if not self._context.set_input_shape(name, tuple(inputs.shape)):
                raise ValueError(
                    f"input shape {tuple(inputs.shape)} is outside the engine's profile {self.build_info['profile']}"
                )
            self._context.set_tensor_address(name, inputs.data_ptr())
            outputs = {}
            for output in self.output_names:
                shape = tuple(self._context.get_tensor_shape(output))
                if any(d < 0 for d in shape):
                    raise RuntimeError(f"TensorRT left output {output!r} with a data-dependent shape {shape}")
                outputs[output] = torch.empty(shape, dtype=self._dtypes[output], device=self.device)
                self._context.set_tensor_address(output, outputs[output].data_ptr())
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            host = {n: t.cpu() for n, t in outputs.items()}  # cpu() waits for the stream
        return {n: (t.long() if not t.is_floating_point() else t.float()).numpy() for n, t in host.items()}


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.int32: torch.int32,
        trt.int8: torch.int8,
        trt.uint8: torch.uint8,
        trt.bool: torch.bool,
    }
    if hasattr(trt, "int64"):
        table[trt.int64] = torch.int64
    if dtype not in table:
        raise TypeError(f"unsupported TensorRT tensor type {dtype}")
    return table[dtype]
