"""Choose what a checkpoint computes in on a bf16 CPU, by measuring it on a validation split, and store it.

    python -m training.precision --checkpoint CKPT --annotations VAL.json --images VAL_DIR [--tolerance 0.3]
        [--scale S|auto] [--cache-dir DIR] [--dry-run]

OpenVINO on a CPU with bf16 (the service's default engine there) can run a graph in bf16 throughout, with
its mask decode or its whole mask branch in fp32, or in fp32 (``export.metadata.CpuPrecision``, fastest
first). bf16 moves EmbedMask's mask boundaries (its coupling subtracts large embedding terms), MEInst's not.
Every validation image is segmented as the service segments it (``inference.Predictor``, every detection
kept, at the model's own scale unless ``--scale`` says otherwise: precision is the network's arithmetic, not
the size estimate's) with onnxruntime in fp32, the reference, and then through OpenVINO in each precision from
the fastest, until one scores within ``--tolerance`` AP of the reference (segm AP; bbox for boxes-only graphs): that one
becomes the checkpoint's ``cpu_precision``, which its exported graph carries and ``auto`` runs
(``export.openvino_runtime.resolve_precision``). A checkpoint without one runs ``DEFAULT_CPU_PRECISION``.
Use a validation split, never a test split. Prints one JSON line; the checkpoint is rewritten atomically
(unless ``--dry-run``), so a graph exported from it before is exported again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pycocotools.coco import COCO

from export.metadata import CPU_PRECISIONS, CpuPrecision
from export.openvino_runtime import cpu_has_bf16
from inference.pipeline import OWN_SCALE, Scale
from inference.predictor import Predictor, in_process_options
from model.input_contract import scale_argument
from training.calibration import calibration_parser, store_choice
from training.evaluate import coco_metrics, load_coco, predict

# How much AP below fp32 a precision may score on the validation split and still be chosen: less than the 0.5
# asked of the test split, for the difference between the two splits.
DEFAULT_TOLERANCE = 0.3


def average_precision(
    checkpoint: Path, engine: str, precision: str, coco: COCO, images: str | Path, scale: Scale, cache_dir: Path | None
) -> float:
    """segm AP (bbox AP for a boxes-only graph) of ``checkpoint`` on ``coco`` through ``engine`` in ``precision``,
    one image at a time as the service segments it."""
    options = in_process_options(engine=engine, precision=precision)
    predictor = Predictor.open(checkpoint, options, cache_dir=cache_dir)
    iou_type = "segm" if predictor.metadata.mask_kind else "bbox"
    value = coco_metrics(coco, predict(predictor, coco, images, scale), iou_type)["AP"]
    return float(value or 0.0)


def choose(
    checkpoint: Path,
    coco: COCO,
    images: str | Path,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    scale: Scale = OWN_SCALE,
    cache_dir: Path | None = None,
) -> tuple[CpuPrecision, dict[str, Any]]:
    """The fastest precision within ``tolerance`` AP of onnxruntime's fp32 on ``coco``, and every AP measured
    on the way (``reference``, then each precision tried)."""
    measured: dict[str, Any] = {
        "reference": average_precision(checkpoint, "onnxruntime", "fp32", coco, images, scale, cache_dir)
    }
    for precision in CPU_PRECISIONS:
        measured[precision] = average_precision(checkpoint, "openvino", precision, coco, images, scale, cache_dir)
        if measured[precision] >= measured["reference"] - tolerance:
            return precision, measured
    return "fp32", measured  # OpenVINO's fp32 fell short too: nothing it runs is closer


def main(argv: list[str] | None = None) -> None:
    parser = calibration_parser("python -m training.precision", __doc__, "a training checkpoint (.pt)")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help=f"AP below fp32 allowed (default {DEFAULT_TOLERANCE})",
    )
    parser.add_argument(
        "--scale", type=scale_argument, default=OWN_SCALE, metavar="S|auto", help="default: the model's own, 1"
    )
    args = parser.parse_args(argv)
    if args.checkpoint.suffix != ".pt":
        parser.error("--checkpoint must be a training checkpoint (.pt): graphs carry the choice of theirs")
    if not cpu_has_bf16():
        parser.error("this CPU has no bf16 (OpenVINO lists no BF16 capability): there is nothing to choose between")
    coco = load_coco(args.annotations)
    chosen, measured = choose(
        args.checkpoint, coco, args.images, tolerance=args.tolerance, scale=args.scale, cache_dir=args.cache_dir
    )
    store_choice(
        args.checkpoint,
        lambda saved: saved.update(cpu_precision=chosen),
        {"cpu_precision": chosen, "AP": measured},
        args.dry_run,
    )


if __name__ == "__main__":
    main()
