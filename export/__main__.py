"""Lower a checkpoint to a fused graph.

    python -m export --checkpoint CKPT --format onnx --output model.onnx [--checkpoint CKPT2 --output b.onnx ...]
    python -m export --checkpoint CKPT --format tensorrt --output model.plan [--fp16] [--max-batch 8]
        [--min-shape 1x3x64x64 --opt-shape 4x3x800x1344 --max-shape 8x3x1344x1344] [--workspace-gib 4]
    python -m export --checkpoint CKPT --format triton --output REPO [--name NAME]
        [--triton-backend onnxruntime|tensorrt] [--max-batch 8] [--max-queue-delay-us 2000] [--max-queue-size 64]

Every ONNX export is checked against eager PyTorch on a random batch (onnxruntime, CPU) unless
``--skip-check``. ONNX exports take several ``--checkpoint``/``--output`` pairs, so that one process (one
import of torch, most of an export's time) exports them all. TensorRT needs an NVIDIA GPU host with the
``tensorrt`` package; the ONNX graph it is built from is written next to the engine (``model.onnx`` beside
``model.plan``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from export.metadata import GraphMetadata
from export.onnx_export import DEFAULT_OPSET, export_onnx
from export.parity import verify_onnx
from export.tensorrt_build import (
    Profile,
    build_engine,
    default_profile,
    engine_tensor_specs,
    import_tensorrt,
    parse_shape,
)
from export.triton_repo import onnx_tensor_specs, write_repository
from model.checkpoint import load_detector
from model.config import Config
from model.detector import OneStageDetector


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, action="append", help="repeat for several ONNX exports")
    parser.add_argument("--format", required=True, choices=["onnx", "tensorrt", "triton"])
    parser.add_argument(
        "--output",
        required=True,
        action="append",
        help="the .onnx file, the engine file, or the Triton repository folder (one per --checkpoint)",
    )
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--skip-check", action="store_true", help="do not compare the ONNX graph with eager PyTorch")
    parser.add_argument("--max-batch", type=int, default=8, help="largest batch of the TensorRT profile and of Triton")
    parser.add_argument(
        "--fp16", action="store_true", help="TensorRT: convolution trunks in FP16, post-processing in FP32"
    )
    parser.add_argument("--min-shape", type=parse_shape, help="TensorRT profile, e.g. 1x3x64x64")
    parser.add_argument("--opt-shape", type=parse_shape, help="TensorRT profile, e.g. 4x3x800x1344")
    parser.add_argument("--max-shape", type=parse_shape, help="TensorRT profile, e.g. 8x3x1344x1344")
    parser.add_argument("--workspace-gib", type=float, default=4.0, help="TensorRT builder workspace limit")
    parser.add_argument(
        "--no-tf32", action="store_true", help="TensorRT: plain FP32 arithmetic (TF32 is on by default)"
    )
    parser.add_argument("--name", help="Triton model name (default: the checkpoint's file stem)")
    parser.add_argument("--triton-backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime")
    parser.add_argument("--max-queue-delay-us", type=int, default=2000, help="Triton dynamic batching delay")
    parser.add_argument(
        "--max-queue-size", type=int, default=64, help="Triton queue bound (requests beyond it are rejected)"
    )
    return parser


def _profile(args: argparse.Namespace, metadata: GraphMetadata) -> Profile:
    """The default profile with any of min/opt/max replaced by the flags."""
    default = default_profile(metadata, args.max_batch)
    return Profile(
        min=args.min_shape or default.min, opt=args.opt_shape or default.opt, max=args.max_shape or default.max
    )


def _export_checked(
    model: OneStageDetector, args: argparse.Namespace, cfg: Config, checkpoint_metadata: dict, path: Path
) -> GraphMetadata:
    """Export, then (unless --skip-check) compare the graph with eager PyTorch; a disagreement is fatal."""
    metadata = export_onnx(model, cfg, checkpoint_metadata, path, opset=args.opset)
    print(f"wrote {path} ({metadata.method}, outputs {', '.join(metadata.output_names)})")
    if not args.skip_check:
        detections, problems = verify_onnx(model, path, metadata)
        if problems:
            raise SystemExit("the ONNX graph disagrees with eager PyTorch:\n" + "\n".join(problems[:20]))
        print(f"checked against eager PyTorch on a random batch: {detections} detections agree")
    return metadata


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if len(args.checkpoint) != len(args.output):
        parser.error(f"{len(args.checkpoint)} --checkpoint but {len(args.output)} --output: give one output each")
    if args.format == "onnx":
        for checkpoint, output in zip(args.checkpoint, args.output):
            model, cfg, checkpoint_metadata = load_detector(checkpoint)
            _export_checked(model, args, cfg, checkpoint_metadata, Path(output))
        return
    if len(args.checkpoint) > 1:
        parser.error(f"--format {args.format} exports one checkpoint")
    if args.format == "tensorrt" or (args.format == "triton" and args.triton_backend == "tensorrt"):
        try:
            import_tensorrt()
        except RuntimeError as error:
            raise SystemExit(f"error: {error}") from None
    model, cfg, checkpoint_metadata = load_detector(args.checkpoint[0])
    output = Path(args.output[0])
    if args.format == "tensorrt":
        onnx_path = output.with_suffix(".onnx")
        if onnx_path == output:
            raise SystemExit("error: the engine's --output needs another suffix than .onnx (e.g. model.plan)")
        metadata = _export_checked(model, args, cfg, checkpoint_metadata, onnx_path)
        build_engine(
            onnx_path,
            output,
            _profile(args, metadata),
            fp16=args.fp16,
            tf32=not args.no_tf32,
            workspace_gib=args.workspace_gib,
        )
        print(f"wrote {output} and {output}.json")
        return

    name = args.name or Path(args.checkpoint[0]).stem
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        metadata = _export_checked(model, args, cfg, checkpoint_metadata, onnx_path)
        if args.triton_backend == "tensorrt":
            profile = _profile(args, metadata)
            if profile.max[0] < args.max_batch:
                raise SystemExit(f"--max-batch {args.max_batch} exceeds the profile's largest batch {profile.max[0]}")
            model_file = build_engine(
                onnx_path,
                Path(tmp) / "model.plan",
                profile,
                fp16=args.fp16,
                tf32=not args.no_tf32,
                workspace_gib=args.workspace_gib,
            )
            inputs, outputs = engine_tensor_specs(model_file)
        else:
            model_file = onnx_path
            inputs, outputs = onnx_tensor_specs(onnx_path)
        folder = write_repository(
            output,
            name,
            model_file,
            args.triton_backend,
            inputs,
            outputs,
            metadata,
            max_batch_size=args.max_batch,
            max_queue_delay_us=args.max_queue_delay_us,
            max_queue_size=args.max_queue_size,
        )
    print(f"wrote Triton model {folder} ({args.triton_backend})")


if __name__ == "__main__":
    main(sys.argv[1:])
