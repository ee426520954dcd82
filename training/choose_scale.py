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

import argparse
import json
from pathlib import Path

from inference.cli import CACHE_DIR_HELP, add_runtime_arguments, runtime_options
from inference.predictor import Predictor
from model.checkpoint import load_checkpoint, save_checkpoint
from training.evaluate import evaluate, load_coco


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m training.choose_scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="a training checkpoint (.pt), scale rule")
    parser.add_argument("--annotations", required=True, help="the validation split's COCO instances json")
    parser.add_argument("--images", required=True, help="folder the json's file_names are relative to")
    parser.add_argument(
        "--scales", required=True, type=float, nargs="+", help="candidate test scales (input pixels per image pixel)"
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help=CACHE_DIR_HELP)
    parser.add_argument("--dry-run", action="store_true", help="print the choice, leave the checkpoint as it is")
    add_runtime_arguments(parser)
    args = parser.parse_args(argv)
    saved = load_checkpoint(args.checkpoint)
    data = saved["config"]["data"]
    if data["resize"] != "scale":
        parser.error(f"{args.checkpoint} sizes images by the {data['resize']} rule, not by a scale")
    own = float(data["scale_test"])
    predictor = Predictor.open(args.checkpoint, runtime_options(args), cache_dir=args.cache_dir)
    coco = load_coco(args.annotations)
    tried = {
        scale: evaluate(predictor, coco, args.images, scale / own)["segm"]["AP"] for scale in sorted(set(args.scales))
    }
    best = max(tried, key=lambda scale: tried[scale])
    if not args.dry_run:
        data["scale_test"] = best
        for key, power in (("object_size", 1), ("object_density", -2)):  # input pixels grow with the scale
            if saved.get(key) is not None:
                saved[key] = saved[key] * (best / own) ** power
        save_checkpoint(saved, args.checkpoint)
    print(
        json.dumps(
            {"checkpoint": str(args.checkpoint), "written": not args.dry_run, "scale_test": best, "segm_AP": tried}
        )
    )


if __name__ == "__main__":
    main()
