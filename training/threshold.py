"""Choose a checkpoint's recommended score threshold on a validation split and store it in the checkpoint.

    python -m training.threshold --checkpoint CKPT --annotations VAL.json --images VAL_DIR [--scale S|auto]
        [--runtime auto|onnxruntime|openvino|torch] [--dry-run]

Every validation image is segmented as the service segments it (``inference.Predictor``, every detection
kept), the detections are matched to the objects (``training.evaluate.best_f1_threshold``: IoU >= 0.5 of the
masks), and the score threshold with the best F1 becomes the checkpoint's ``recommended_score_threshold``:
what ``POST /segment``, the web page and ``python -m service.predict`` default to. ``training.train`` records
it at each validation; this command sets it for a checkpoint trained before, or on another validation set
(whole fields, say). Use a validation split, never a test split. Prints one JSON line; the checkpoint is
rewritten atomically (unless ``--dry-run``), so a graph exported from it before is exported again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from inference.cli import CACHE_DIR_HELP, add_runtime_arguments, runtime_options
from inference.pipeline import DEFAULT_SCALE_HELP
from inference.predictor import Predictor
from model.checkpoint import load_checkpoint, save_checkpoint
from model.input_contract import scale_argument
from training.evaluate import best_f1_threshold, load_coco, predict


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m training.threshold", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="a training checkpoint (.pt)")
    parser.add_argument("--annotations", required=True, help="the validation split's COCO instances json")
    parser.add_argument("--images", required=True, help="folder the json's file_names are relative to")
    parser.add_argument(
        "--scale",
        type=scale_argument,
        default=None,
        metavar="S|auto",
        help="a factor on the model's own input size, or 'auto' to estimate it per image from a first pass "
        f"(default: the service's, {DEFAULT_SCALE_HELP})",
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help=CACHE_DIR_HELP)
    parser.add_argument("--dry-run", action="store_true", help="print the choice, leave the checkpoint as it is")
    add_runtime_arguments(parser)
    args = parser.parse_args(argv)
    if args.checkpoint.suffix != ".pt":
        parser.error("--checkpoint must be a training checkpoint (.pt): graphs carry the threshold of theirs")
    predictor = Predictor.open(args.checkpoint, runtime_options(args), cache_dir=args.cache_dir)
    coco = load_coco(args.annotations)
    results = predict(predictor, coco, args.images, args.scale)
    best = best_f1_threshold(coco, results, "segm" if predictor.metadata.mask_kind else "bbox")
    if not args.dry_run:
        checkpoint = load_checkpoint(args.checkpoint)
        checkpoint["recommended_score_threshold"] = best["threshold"]
        save_checkpoint(checkpoint, args.checkpoint)
    print(json.dumps({"checkpoint": str(args.checkpoint), "written": not args.dry_run, **best}))


if __name__ == "__main__":
    main()
