"""Checkpoints: atomic writes, ``weights_only`` reads, and a detector rebuilt from a checkpoint alone.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (no pickled classes), so
``torch.load(..., weights_only=True)`` reads it. Keys:

- ``model``: the detector's state dict (MEInst's PCA codec is in it as buffers);
- ``config``: the full ``Config`` as a JSON-style dict; ``class_names``, ``category_ids`` (dataset ids
  of labels 0..C-1);
- ``iteration`` (optimizer steps taken), ``samples_consumed`` (global data position for the sampler),
  ``metrics`` (the last validation result, may be empty), ``best_metric`` (or None);
- ``object_size`` (median training-object box side at the test scale, for ``scale=auto``), ``object_density``
  (objects per input megapixel of the training images, 95th percentile, for the density warning) and
  ``recommended_score_threshold`` (the best-F1 score threshold on the validation split, what answers default
  to) and ``cpu_precision`` (what the graph computes in on a bf16 CPU, chosen on the validation split by
  ``python -m training.precision``; ``export.metadata.CpuPrecision``); any may be missing or None in older
  checkpoints;
- only in resumable checkpoints: ``optimizer``, ``scheduler``, ``grad_scaler``.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from model.config import Config
from model.detector import OneStageDetector

METADATA_KEYS = ("class_names", "category_ids", "iteration", "metrics")
OPTIONAL_METADATA_KEYS = ("object_size", "object_density", "recommended_score_threshold", "cpu_precision")


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    """Write ``payload`` so that ``path`` is always either the old file or the complete new one.

    The bytes go to a temporary file in the same directory, are fsynced, then ``os.replace``d over
    ``path`` (atomic on POSIX); the directory is fsynced so that the rename itself survives a crash.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from other users (e.g. a container's)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint without unpickling arbitrary objects."""
    return torch.load(path, map_location=map_location, weights_only=True)


def load_detector(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[OneStageDetector, Config, dict[str, Any]]:
    """The detector in eval mode with the checkpoint's weights, its Config, and metadata
    (``class_names``, ``category_ids``, ``iteration``, ``metrics``, ``object_size``, ``object_density``,
    ``recommended_score_threshold``, ``cpu_precision``).

    The network is built without its ImageNet file (the checkpoint holds every weight), so serving
    and export need neither the weights package nor the MEInst codec file.
    """
    checkpoint = load_checkpoint(path)
    cfg = Config.model_validate(checkpoint["config"])
    build_cfg = copy.deepcopy(cfg.model)
    build_cfg.backbone.weights = None
    build_cfg.backbone.weights_sha256 = None
    model = OneStageDetector(build_cfg)
    model.load_state_dict(checkpoint["model"])
    model.to(device).eval()
    # Recorded by checkpoints written since: object_size (scale=auto), object_density,
    # recommended_score_threshold (answers) and cpu_precision (training.precision).
    optional = {key: checkpoint.get(key) for key in OPTIONAL_METADATA_KEYS}
    return model, cfg, {key: checkpoint[key] for key in METADATA_KEYS} | optional
