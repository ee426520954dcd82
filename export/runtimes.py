"""Graph runtimes behind the ``model.runtime_protocol.Runtime`` interface: onnxruntime and TensorRT.

Both take uint8 RGB ``images [B, 3, H, W]`` (H, W multiples of 32) and return the graph contract as numpy
arrays (``num_dets``, ``boxes``, ``scores``, ``classes`` and, for mask methods, ``masks``), and expose the
exported ``metadata`` record, so the service never needs the checkpoint or the config. The module does not
import torch (only the TensorRT runtime's methods do), so a service running ONNX graphs never loads it, nor
onnxruntime until a session is opened or a CUDA device asks for its providers (~20 MB a service on
OpenVINO does without).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from export.metadata import METADATA_KEY, GraphMetadata, read_engine_sidecar
from export.tensorrt_build import import_tensorrt

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ACCELERATED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def file_version(path: Path) -> str:
    """The first 12 hex digits of the SHA-256 of the file at ``path``: names a graph's version (answers, cache
    files made from it)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def check_images(images: np.ndarray, divisibility: int) -> np.ndarray:
    """The batch as a C-contiguous uint8 array, or a ValueError that says what is wrong with it."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    if images.shape[2] % divisibility or images.shape[3] % divisibility:
        raise ValueError(f"image height and width must be multiples of {divisibility}, got {tuple(images.shape[2:])}")
    return np.ascontiguousarray(images)


def cuda_device_count() -> int:
    """CUDA devices the NVIDIA driver reports (0 without a driver or a device), asked through the driver
    library itself so that no framework is loaded for it."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def default_providers() -> list[str]:
    """CUDA (then CPU) where onnxruntime offers it and a CUDA device exists, else CPU only.

    onnxruntime-gpu lists its CUDA provider even on hosts that cannot load it, so the device is checked
    too; the TensorRT provider is left to explicit requests (it builds an engine per new input shape).
    """
    if cuda_device_count() == 0:
        return ["CPUExecutionProvider"]
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxRuntime:
    """An exported ``.onnx`` graph in onnxruntime.

    ``providers`` defaults to ``default_providers()``. After the session is created its active providers
    are checked: a requested accelerator that did not load is reported once and the session runs on CPU.
    """

    def __init__(
        self, path: str | Path, providers: list[str] | None = None, threads: int | None = None, cpu_arena: bool = True
    ) -> None:
        """``cpu_arena=False`` turns onnxruntime's CPU memory arena off: activations go back to the system
        after each run instead of staying reserved for the largest shape seen (the service's lean default)."""
        import onnxruntime as ort

        requested = list(providers) if providers is not None else default_providers()
        if "CPUExecutionProvider" not in requested:
            requested.append("CPUExecutionProvider")
        if "CUDAExecutionProvider" in requested:
            # cuBLAS and cuDNN from NVIDIA's wheels (installed with torch), loaded without importing torch
            ort.preload_dlls()
        options = ort.SessionOptions()
        options.enable_cpu_mem_arena = cpu_arena
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


class TensorRTRuntime:
    """A serialized TensorRT engine (from ``python -m export --format tensorrt``) on one CUDA device.

    Buffers are torch CUDA tensors; the engine's optimization profile bounds the accepted shapes. Integer
    outputs come back as int64 whatever width the engine uses. torch is imported by its methods, not by this
    module, so that a service running ONNX graphs never loads it (it is needed only where engines run).
    """

    def __init__(self, engine_path: str | Path, device: str = "cuda:0") -> None:
        import torch  # lazy: see the class docstring

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
        import torch  # lazy: see the class docstring

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
    import torch  # lazy: see TensorRTRuntime

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
