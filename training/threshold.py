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

from inference.cli import add_runtime_arguments, runtime_options
from inference.pipeline import DEFAULT_SCALE_HELP
from inference.predictor import Predictor
from model.input_contract import scale_argument
from training.calibration import calibration_parser, store_choice
from training.evaluate import best_f1_threshold, load_coco, predict


def main(argv: list[str] | None = None) -> None:
    parser = calibration_parser("python -m training.threshold", __doc__, "a training checkpoint (.pt)")
    parser.add_argument(
        "--scale",
        type=scale_argument,
        default=None,
        metavar="S|auto",
        help="a factor on the model's own input size, or 'auto' to estimate it per image from a first pass "
        f"(default: the service's, {DEFAULT_SCALE_HELP})",
    )
    add_runtime_arguments(parser)
    args = parser.parse_args(argv)
    if args.checkpoint.suffix != ".pt":
        parser.error("--checkpoint must be a training checkpoint (.pt): graphs carry the threshold of theirs")
    predictor = Predictor.open(args.checkpoint, runtime_options(args), cache_dir=args.cache_dir)
    coco = load_coco(args.annotations)
    results = predict(predictor, coco, args.images, args.scale)
    best = best_f1_threshold(coco, results, "segm" if predictor.metadata.mask_kind else "bbox")
    store_choice(
        args.checkpoint, lambda saved: saved.update(recommended_score_threshold=best["threshold"]), best, args.dry_run
    )


if __name__ == "__main__":
    main()
