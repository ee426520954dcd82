"""Build a TensorRT engine from the exported ONNX graph with the TensorRT Python API.

One optimization profile (min/opt/max shapes of ``images``), an optional FP16 build, a workspace limit;
the serialized engine is written with a JSON sidecar holding the metadata record and the build settings.
TensorRT is imported only here and only when called, so the rest of the project runs without it.

Graph notes for TensorRT (>= 10): class-aware NMS is ONNX ``NonMaxSuppression`` (INMSLayer), with the
whole batch folded into one NMS call whose candidates TensorRT caps at 5000 (``INMSLayer`` top-K limit);
NonZero, ScatterND, CumSum (float), TopK (constant K) and Mod are all parsed natively, no plugins.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.metadata import WRAPPED_NAME, GraphMetadata, read_onnx_metadata, write_engine_sidecar
from export.triton_repo import TensorSpec

log = logging.getLogger(__name__)

Shape = tuple[int, int, int, int]
NMS_TOPK_LIMIT = 5000


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or a RuntimeError saying how to get it."""
    try:
        import tensorrt
    except ImportError as error:
        raise RuntimeError(
            "TensorRT is not installed: it needs an NVIDIA GPU host; `pip install tensorrt` there (matching its CUDA)"
        ) from error
    return tensorrt


@dataclass(frozen=True)
class Profile:
    """Shapes of ``images`` the engine accepts (min, max) and is tuned for (opt)."""

    min: Shape
    opt: Shape
    max: Shape

    def __post_init__(self) -> None:
        for name, shape in (("min", self.min), ("opt", self.opt), ("max", self.max)):
            if len(shape) != 4 or shape[1] != 3 or shape[2] % 32 or shape[3] % 32 or min(shape) < 1:
                raise ValueError(f"{name} shape {shape} must be B x 3 x H x W with H, W multiples of 32")
        if not all(a <= b <= c for a, b, c in zip(self.min, self.opt, self.max)):
            raise ValueError(
                f"profile shapes must satisfy min <= opt <= max per axis: {self.min}, {self.opt}, {self.max}"
            )


def parse_shape(text: str) -> Shape:
    """``"1x3x800x1344"`` (or with commas) -> (1, 3, 800, 1344)."""
    parts = [int(p) for p in re.split(r"[x,]", text.strip().lower()) if p]
    if len(parts) != 4:
        raise ValueError(f"a shape is B x 3 x H x W, e.g. 1x3x800x1344; got {text!r}")
    return parts[0], parts[1], parts[2], parts[3]


def default_profile(metadata: GraphMetadata, max_batch: int) -> Profile:
    """From 1 x 64 x 64 up to ``max_batch`` x S x S (S the largest padded side the resize rule allows),
    tuned for a landscape image of the test size at half the maximum batch."""
    rules = metadata.input
    div = rules.size_divisibility
    short = -(-rules.min_size // div) * div
    long = -(-rules.max_size // div) * div
    return Profile(min=(1, 3, 64, 64), opt=(max(max_batch // 2, 1), 3, short, long), max=(max_batch, 3, long, long))


def cuda_device() -> str:
    """The GPU an engine is built for (name and compute capability): an engine runs only on the GPU model
    and TensorRT version that built it."""
    import torch  # lazy: the service imports this module to cache engines, and ONNX serving needs no torch

    if not torch.cuda.is_available():
        return "none"
    major, minor = torch.cuda.get_device_capability()
    return f"{torch.cuda.get_device_name()} sm_{major}{minor}"


def build_identity(profile: Profile, *, fp16: bool, tf32: bool = True) -> dict[str, Any]:
    """What an engine depends on besides its ONNX graph; a cached engine is reused only when all of it matches."""
    return {
        "tensorrt_version": import_tensorrt().__version__,
        "device": cuda_device(),
        "fp16": fp16,
        "tf32": tf32,
        "profile": {"min": list(profile.min), "opt": list(profile.opt), "max": list(profile.max)},
    }


def runs_in_fp16(layer_name: str) -> bool:
    """Whether a layer belongs to a convolution trunk (backbone + FPN, FCOS head, mask-method towers).

    Everything else keeps FP32 in an FP16 build: the box decode, the NMS input (its per-group coordinate
    offsets reach 1e5-1e6, past FP16's 65504), the rank bookkeeping and the mask assembly.
    """
    scope = layer_name.split("/")
    if len(scope) < 4 or scope[1] != WRAPPED_NAME:
        return False
    if scope[2] in ("backbone", "head"):
        return True
    return scope[2] == "mask_method" and len(scope) >= 5 and scope[3] != "codec"


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    profile: Profile | None = None,
    *,
    max_batch: int = 8,
    fp16: bool = False,
    tf32: bool = True,
    workspace_gib: float = 4.0,
) -> Path:
    """Parse ``onnx_path``, build and write the serialized engine and its sidecar; returns the engine path.

    ``tf32=False`` keeps FP32 layers in true FP32 arithmetic (TensorRT uses TF32 on Ampere and later by default).
    """
    trt = import_tensorrt()
    metadata = read_onnx_metadata(onnx_path)
    profile = profile or default_profile(metadata, max_batch)
    candidates = profile.max[0] * metadata.pre_nms_topk * len(metadata.strides)
    if candidates > NMS_TOPK_LIMIT:
        log.warning(
            "up to %d candidates (batch %d x %d levels x top-%d) reach one NMS call; TensorRT's NMS keeps the "
            "best %d, so a crowded batch can lose low-scoring detections",
            candidates,
            profile.max[0],
            len(metadata.strides),
            metadata.pre_nms_topk,
            NMS_TOPK_LIMIT,
        )

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH) if major < 10 else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n{errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    optimization = builder.create_optimization_profile()
    optimization.set_shape(metadata.input_name, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(optimization)
    if not tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    if fp16:
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise RuntimeError(f"TensorRT {trt.__version__} builds strongly typed networks only: no FP16 builder flag")
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        _keep_fp32_outside_trunks(trt, network)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    build_info = {
        **build_identity(profile, fp16=fp16, tf32=tf32),
        "workspace_gib": workspace_gib,
        "onnx": Path(onnx_path).name,
    }
    write_engine_sidecar(engine_path, metadata, build_info)
    return engine_path


def _keep_fp32_outside_trunks(trt: Any, network: Any) -> None:
    float_types = (trt.float32, trt.float16)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if runs_in_fp16(layer.name):
            continue
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if outputs and all(o.dtype in float_types for o in outputs):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)


def engine_tensor_specs(engine_path: str | Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of a built engine, with the data types TensorRT actually uses at its boundary."""
    trt = import_tensorrt()
    types = {
        trt.float32: "TYPE_FP32",
        trt.float16: "TYPE_FP16",
        trt.int32: "TYPE_INT32",
        trt.uint8: "TYPE_UINT8",
        trt.bool: "TYPE_BOOL",
    }
    if hasattr(trt, "int64"):
        types[trt.int64] = "TYPE_INT64"
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise RuntimeError(f"TensorRT could not deserialize {engine_path}")
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        spec = TensorSpec(name, types[engine.get_tensor_dtype(name)], tuple(engine.get_tensor_shape(name)))
        (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(spec)
    return inputs, outputs
