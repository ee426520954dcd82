"""Tiny random-weight MEInst and EmbedMask checkpoints for driving the service without trained models.

The detectors are small MobileNetV2-FPN networks (32 channels) with a head re-initialised so that any
textured image (a photo, a nucleus tile) yields detections with distinct scores and boxes a few strides
wide; the MEInst codec decodes to disks. They are saved with `model.checkpoint.save_checkpoint`, so the
service loads them exactly as it loads trained checkpoints (export to ONNX on start).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import Config, load_config
from model.detector import OneStageDetector

CLASS_NAMES = ["cell", "nucleus", "debris"]
CATEGORY_IDS = [3, 5, 9]  # non-contiguous dataset ids, so responses must map class indices
SCORE_LOGIT = float(np.log(0.05 / 0.95))  # the head's default score threshold as a logit
# The microscopy input contract of the bundled recipes (percentile intensity, the scale size rule), at scale 1.
MICROSCOPY = ("data.resize=scale", "data.scale_test=1.0", "data.intensity=percentile")
CONFIDENT_LOGIT_SHIFT = 3.0  # lifts the random head's scores to about 0.5 and up, as a trained model's


def tiny_detector(method: str, *, seed: int = 0, extra: tuple[str, ...] = ()) -> tuple[OneStageDetector, Config]:
    """A small MobileNetV2-FPN `method` detector whose random head yields detections on textured images only."""
    cfg = load_config(
        None,
        [
            f"model.method={method}",
            f"model.num_classes={len(CLASS_NAMES)}",
            "model.backbone.weights=null",
            "model.fpn.out_channels=32",
            "model.head.channels=32",
            "model.head.num_convs=1",
            "model.head.num_groups=8",
            "model.embedmask.pixel_channels=32",
            "model.embedmask.pixel_convs=1",
            "model.meinst.num_components=8",
            "data.min_size_test=128",
            "data.max_size_test=192",
            *extra,
        ],
    )
    torch.manual_seed(seed)
    model = OneStageDetector(cfg.model).eval()
    head = model.head
    with torch.no_grad():
        nn.init.normal_(head.cls_logits.weight, std=0.5)
        nn.init.constant_(head.cls_logits.bias, SCORE_LOGIT - 0.5)
        nn.init.normal_(head.ctrness.weight, std=0.5)
        nn.init.normal_(head.bbox_pred.weight, std=0.1)
        nn.init.constant_(head.bbox_pred.bias, 1.5)  # boxes about 3 strides wide
        if method == "meinst":
            nn.init.normal_(model.mask_method.mask_pred.weight, std=0.1)
            rng = np.random.default_rng(seed)
            components = np.linalg.qr(rng.normal(size=(28 * 28, 8)))[0].T
            yy, xx = np.mgrid[:28, :28]
            disk_logits = 3.0 - 0.02 * ((yy - 13.5) ** 2 + (xx - 13.5) ** 2)
            model.mask_method.codec.load_arrays(components * 10.0, np.linspace(4.0, 1.0, 8), disk_logits.ravel())
        else:
            model.mask_method.position_scale.scale.fill_(20.0)  # p = 0.53 about 7 pixels from a proposal
    return model, cfg


def tiny_checkpoint(
    method: str,
    path: Path,
    *,
    min_size: int = 128,
    max_size: int = 192,
    max_detections: int = 20,
    seed: int = 0,
    extra: tuple[str, ...] = (),
    object_size: float | None = None,
    recommended_score_threshold: float | None = 0.0,
) -> Path:
    """Write a random-weight `method` ("meinst" or "embedmask") checkpoint to `path` and return it; `extra`
    config overrides (e.g. a microscopy input contract), the training objects' median size and the score
    threshold answers default to that it records (0 by default: every detection, so tests see them all)."""
    model, cfg = tiny_detector(
        method,
        seed=seed,
        extra=(
            f"model.head.max_detections={max_detections}",
            f"data.min_size_test={min_size}",
            f"data.max_size_test={max_size}",
            *extra,
        ),
    )
    save_checkpoint(
        {
            "model": model.state_dict(),
            "config": cfg.model_dump(mode="json"),
            "class_names": CLASS_NAMES,
            "category_ids": CATEGORY_IDS,
            "iteration": 0,
            "metrics": {},
            "object_size": object_size,
            "recommended_score_threshold": recommended_score_threshold,
        },
        path,
    )
    return path


def microscopy_checkpoint(method: str, path: Path, *, object_size: float) -> Path:
    """A tiny `method` checkpoint with the microscopy contract that records its training objects' size
    (`object_size`, input pixels) and scores confidently (about 0.5 and up, as a trained model), so that
    scale=auto has objects to measure and a diameter sets the scale."""
    tiny_checkpoint(method, path, extra=MICROSCOPY, object_size=object_size)
    confident = load_checkpoint(path)
    confident["model"]["head.cls_logits.bias"] += CONFIDENT_LOGIT_SHIFT
    save_checkpoint(confident, path)
    return path
