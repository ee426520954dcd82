"""Choose a scale-rule checkpoint's test scale on a validation split and store it in the checkpoint.

    python -m training.choose_scale --checkpoint CKPT --annotations VAL.json --images VAL_DIR
        --scales 1.5 1.75 2.0 2.25 [--runtime auto|onnxruntime|openvino|torch] [--dry-run]

A recipe trained with scale jitter is tested at one scale (``data.scale_test``: input pixels per image pixel,
the model's own scale). Every validation image is segmented at each candidate scale as the service segments it
(``inference.Predictor``, every detection kept) and the one with the best segm AP becomes the checkpoint's
``data.scale_test``; the training objects' size and density it records (``object_size``, ``object_density``:
at the test scale) are rescaled with it, so ``scale=auto`` and the density warning stay right. Use a validation
split (whole fields, as users send them), never a test split. Prints one JSON line; the checkpoint is rewritten
atomically (unless ``--dry-run``), so a graph exported from it before is exported again. Run it before
``python -m training.threshold``, whose choice depends on the scale.
"""

from __future__ import annotations

from typing import Any

from inference.cli import add_runtime_arguments, runtime_options
from inference.predictor import Predictor
from model.checkpoint import load_checkpoint
from training.calibration import calibration_parser, store_choice
from training.evaluate import evaluate, load_coco


def main(argv: list[str] | None = None) -> None:
    parser = calibration_parser("python -m training.choose_scale", __doc__, "a training checkpoint (.pt), scale rule")
    parser.add_argument(
        "--scales", required=True, type=float, nargs="+", help="candidate test scales (input pixels per image pixel)"
    )
    add_runtime_arguments(parser)
    args = parser.parse_args(argv)
    data = load_checkpoint(args.checkpoint)["config"]["data"]
    if data["resize"] != "scale":
        parser.error(f"{args.checkpoint} sizes images by the {data['resize']} rule, not by a scale")
    own = float(data["scale_test"])
    predictor = Predictor.open(args.checkpoint, runtime_options(args), cache_dir=args.cache_dir)
    coco = load_coco(args.annotations)
    tried = {
        scale: evaluate(predictor, coco, args.images, scale / own)["segm"]["AP"] for scale in sorted(set(args.scales))
    }
    best = max(tried, key=lambda scale: tried[scale])

    def rescale(saved: dict[str, Any]) -> None:
        saved["config"]["data"]["scale_test"] = best
        for key, power in (("object_size", 1), ("object_density", -2)):  # input pixels grow with the scale
            if saved.get(key) is not None:
                saved[key] = saved[key] * (best / own) ** power

    store_choice(args.checkpoint, rescale, {"scale_test": best, "segm_AP": tried}, args.dry_run)


if __name__ == "__main__":
    main()
