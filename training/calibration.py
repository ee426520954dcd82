"""What the calibration commands share (``training.choose_scale``, ``training.threshold``,
``training.precision``): each measures a checkpoint on a validation split, stores one choice in it and prints
one JSON line."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from inference.cli import CACHE_DIR_HELP
from model.checkpoint import load_checkpoint, save_checkpoint


def calibration_parser(prog: str, description: str | None, checkpoint_help: str) -> argparse.ArgumentParser:
    """A parser with the arguments every calibration takes: the checkpoint, the validation split, the export
    cache and ``--dry-run``."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help=checkpoint_help)
    parser.add_argument("--annotations", required=True, help="the validation split's COCO instances json")
    parser.add_argument("--images", required=True, help="folder the json's file_names are relative to")
    parser.add_argument("--cache-dir", type=Path, default=None, help=CACHE_DIR_HELP)
    parser.add_argument("--dry-run", action="store_true", help="print the choice, leave the checkpoint as it is")
    return parser


def store_choice(
    checkpoint: Path, update: Callable[[dict[str, Any]], None], record: dict[str, Any], dry_run: bool
) -> None:
    """Apply ``update`` to the checkpoint's contents and rewrite it atomically, unless ``dry_run`` (a graph
    exported from it before is then exported again); then print one JSON line: the checkpoint, whether it was
    written, and ``record``."""
    if not dry_run:
        saved = load_checkpoint(checkpoint)
        update(saved)
        save_checkpoint(saved, checkpoint)
    print(json.dumps({"checkpoint": str(checkpoint), "written": not dry_run, **record}))
