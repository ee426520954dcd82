"""Command-line flags shared by the tools that open a model in process (``training.evaluate``,
``service.predict``): the engine and its precision, threads, as ``RuntimeOptions``."""

from __future__ import annotations

import argparse
from typing import get_args

from inference.predictor import in_process_options
from inference.runtime import EngineChoice, PrecisionChoice, RuntimeOptions

# The help of the tools' ``--cache-dir`` (``inference.runtime.default_cache_dir`` when not given).
CACHE_DIR_HELP = (
    "where a .pt checkpoint is exported to ONNX (default: $XDG_CACHE_HOME/onestage, else ~/.cache/onestage: the "
    "service's default cache_dir)"
)


def add_runtime_arguments(parser: argparse.ArgumentParser, default_engine: str = "auto") -> None:
    """``--runtime``, ``--precision`` and ``--threads``, with help texts that say what ``auto`` picks."""
    parser.add_argument(
        "--runtime",
        choices=get_args(EngineChoice),
        default=default_engine,
        help=f"the engine (default {default_engine}): {RuntimeOptions.model_fields['engine'].description}",
    )
    parser.add_argument(
        "--precision",
        choices=get_args(PrecisionChoice),
        default="auto",
        help=RuntimeOptions.model_fields["precision"].description,
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="inference threads (default: every usable core, one stream)"
    )


def runtime_options(args: argparse.Namespace) -> RuntimeOptions:
    """The options those flags ask for: one stream (one image at a time), every usable core unless told."""
    chosen = {"engine": args.runtime, "precision": args.precision}
    if args.threads is not None:
        chosen["threads"] = args.threads
    return in_process_options(**chosen)
