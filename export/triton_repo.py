"""A Triton model repository for the exported graph: ``<repo>/<name>/config.pbtxt`` + ``<name>/1/model.*``.

The config declares the graph's tensors with the batch axis left to ``max_batch_size`` (so ``dims`` exclude
it; dynamic axes are -1; per-image scalars such as ``num_dets`` are ``dims: [1]`` reshaped to ``[]``), a
dynamic batcher with a queue delay and a bounded queue, and the metadata record as a string parameter.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnx

from export.metadata import METADATA_KEY, GraphMetadata

Backend = Literal["onnxruntime", "tensorrt"]
PLATFORMS: dict[str, tuple[str, str]] = {
    "onnxruntime": ("onnxruntime_onnx", "model.onnx"),
    "tensorrt": ("tensorrt_plan", "model.plan"),
}
ONNX_TO_TRITON: dict[int, str] = {
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.BOOL: "TYPE_BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: its Triton data type and full shape (batch first, -1 where dynamic)."""

    name: str
    data_type: str
    shape: tuple[int, ...]


def onnx_tensor_specs(path: str | Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of an ONNX graph; a named (symbolic) or missing dim is dynamic."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
        return TensorSpec(value.name, ONNX_TO_TRITON[tensor.elem_type], dims)

    initializers = {i.name for i in graph.initializer}
    return [spec(v) for v in graph.input if v.name not in initializers], [spec(v) for v in graph.output]


def _pbtxt_string(text: str) -> str:
    """A protobuf text-format string literal (UTF-8 bytes; quotes, backslashes and controls escaped)."""
    out = []
    for byte in text.encode("utf-8"):
        if byte in (0x22, 0x5C):
            out.append("\\" + chr(byte))
        elif byte < 0x20 or byte == 0x7F:
            out.append(f"\\{byte:03o}")
        else:
            out.append(chr(byte) if byte < 0x80 else f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def _tensor_block(spec: TensorSpec) -> str:
    per_item = spec.shape[1:]
    lines = [f'    name: "{spec.name}"', f"    data_type: {spec.data_type}"]
    if per_item:
        lines.append(f"    dims: [ {', '.join(str(d) for d in per_item)} ]")
    else:  # one value per image: Triton needs a non-empty dims, reshaped back to a scalar
        lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
    return "  {\n" + "\n".join(lines) + "\n  }"


def render_config(
    name: str,
    backend: Backend,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    metadata: GraphMetadata,
    *,
    max_batch_size: int,
    max_queue_delay_us: int,
    max_queue_size: int,
) -> str:
    """The ``config.pbtxt`` text."""
    if max_batch_size < 1 or max_queue_size < 1 or max_queue_delay_us < 0:
        raise ValueError("max_batch_size and max_queue_size must be >= 1 and max_queue_delay_us >= 0")
    platform = PLATFORMS[backend][0]
    return "\n".join(
        [
            (
                f"# OneStage {metadata.method} detector from `python -m export`; "
                f"the metadata record is parameters[{METADATA_KEY!r}]."
            ),
            "# Triton batches requests of equal H and W only: resize and pad clients' images to a few fixed sizes.",
            f'name: "{name}"',
            f'platform: "{platform}"',
            f"max_batch_size: {max_batch_size}",
            "input [\n" + ",\n".join(_tensor_block(s) for s in inputs) + "\n]",
            "output [\n" + ",\n".join(_tensor_block(s) for s in outputs) + "\n]",
            "dynamic_batching {",
            f"  max_queue_delay_microseconds: {max_queue_delay_us}",
            "  default_queue_policy {",
            f"    max_queue_size: {max_queue_size}",
            "  }",
            "}",
            "parameters {",
            f'  key: "{METADATA_KEY}"',
            f"  value {{ string_value: {_pbtxt_string(metadata.to_json())} }}",
            "}",
            "",
        ]
    )


def write_repository(
    repository: str | Path,
    name: str,
    model_file: str | Path,
    backend: Backend,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    metadata: GraphMetadata,
    *,
    max_batch_size: int = 8,
    max_queue_delay_us: int = 2000,
    max_queue_size: int = 64,
) -> Path:
    """Write ``<repository>/<name>/config.pbtxt`` and copy the graph to ``<name>/1/``; returns the model folder."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"model name {name!r}: use letters, digits, '_', '.' and '-' only")
    folder = Path(repository) / name
    version = folder / "1"
    version.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_file, version / PLATFORMS[backend][1])
    config = render_config(
        name,
        backend,
        inputs,
        outputs,
        metadata,
        max_batch_size=max_batch_size,
        max_queue_delay_us=max_queue_delay_us,
        max_queue_size=max_queue_size,
    )
    (folder / "config.pbtxt").write_text(config)
    return folder
