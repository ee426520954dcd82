"""One typed configuration for model, training and export.

A config is a YAML file (optionally inheriting from another through ``_base_``) plus command-line
``key.sub=value`` overrides. Unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BackboneConfig(_Section):
    name: Literal["mobilenet_v2", "resnet50", "resnet101"] = "mobilenet_v2"
    # ImageNet weights: a file path, or "package:<module>/<relative path>" for weights shipped in a package.
    weights: str | None = None
    weights_sha256: str | None = None
    # Stages frozen from the stem upwards (detectron2's FREEZE_AT; 2 = stem and first stage).
    freeze_at: int = 2


class FPNConfig(_Section):
    out_channels: int = 256


class HeadConfig(_Section):
    """FCOS head and its target/inference rules (docs/methods.md, FCOS)."""

    channels: int = 256
    num_convs: int = 4
    num_groups: int = 32
    prior_prob: float = 0.01
    strides: list[int] = [8, 16, 32, 64, 128]
    sizes_of_interest: list[float] = [64, 128, 256, 512]
    center_sample_radius: float = 1.5
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    score_threshold: float = 0.05
    pre_nms_topk: int = 1000
    nms_threshold: float = 0.6
    max_detections: int = 100

    @model_validator(mode="after")
    def _levels_match(self) -> HeadConfig:
        if len(self.sizes_of_interest) != len(self.strides) - 1:
            raise ValueError("sizes_of_interest needs exactly len(strides) - 1 boundaries")
        if self.channels % self.num_groups:
            raise ValueError(f"head.channels={self.channels} is not divisible by head.num_groups={self.num_groups}")
        return self


class MEInstConfig(_Section):
    num_components: int = 60
    mask_size: int = 28
    # Codec .npz from `python -m training.fit_codec`; stored in the checkpoint after the first load.
    codec_path: str | None = None
    mask_threshold: float = 0.5


class EmbedMaskConfig(_Section):
    embed_dim: int = 16
    spatial_dims: int = 2
    pixel_convs: int = 4
    pixel_channels: int = 256
    prior_margin: float = 2.0
    margin_reduce_factor: float = 32.0
    mask_threshold: float = 0.53
    mask_loss_weight: float = 0.5
    # Inference crop around each box, in stride-4 pixels.
    box_padding: int = 2
    # Instances per chunk in the training coupling, bounding memory on crowded images.
    instance_chunk: int = 16


class ModelConfig(_Section):
    method: Literal["fcos", "meinst", "embedmask"] = "fcos"
    num_classes: int = 80
    class_names: list[str] = Field(default_factory=list)
    # RGB, 0-255 scale; the graph takes uint8 images and normalises them itself.
    pixel_mean: list[float] = [123.675, 116.28, 103.53]
    pixel_std: list[float] = [58.395, 57.12, 57.375]
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    fpn: FPNConfig = Field(default_factory=FPNConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    meinst: MEInstConfig = Field(default_factory=MEInstConfig)
    embedmask: EmbedMaskConfig = Field(default_factory=EmbedMaskConfig)

    @model_validator(mode="after")
    def _names_match(self) -> ModelConfig:
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class_names given for num_classes={self.num_classes}")
        return self


class PhotometricConfig(_Section):
    """Training changes to a microscopy image's raw intensities, before the intensity rule stretches them
    (``training.photometric``): how another microscope's image of the same field differs. Each change is
    applied with its own probability (0: never, the default), its strength drawn from its range. Strengths
    are in units of the image's signal range (its 1st to 99.8th percentile) unless stated."""

    gamma: tuple[float, float] = (1.0, 1.0)  # exponent on the signal above background, drawn log-uniformly
    gamma_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.0, 0.0)  # Gaussian blur (another PSF), in image pixels
    blur_prob: float = 0.0
    background: tuple[float, float] = (0.0, 0.0)  # offset added (haze, autofluorescence)
    background_ramp: tuple[float, float] = (0.0, 0.0)  # amplitude of a linear ramp across the image, any direction
    background_prob: float = 0.0
    photons: tuple[float, float] = (1000.0, 1000.0)  # photons at the signal level (Poisson), drawn log-uniformly
    read_noise: tuple[float, float] = (0.0, 0.0)  # Gaussian noise after the Poisson draw
    noise_prob: float = 0.0

    @property
    def enabled(self) -> bool:
        return any(p > 0 for p in (self.gamma_prob, self.blur_prob, self.background_prob, self.noise_prob))

    @model_validator(mode="after")
    def _ranges(self) -> PhotometricConfig:
        for name in ("gamma_prob", "blur_prob", "background_prob", "noise_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"photometric.{name} must lie in [0, 1], got {getattr(self, name)}")
        for name, positive in (
            ("gamma", True),
            ("blur_sigma", False),
            ("background", False),
            ("background_ramp", False),
            ("photons", True),
            ("read_noise", False),
        ):
            low, high = getattr(self, name)
            if not (0 < low if positive else 0 <= low) or not low <= high:
                kind = "positive" if positive else "non-negative"
                raise ValueError(f"photometric.{name} must be an ordered range of {kind} numbers, got {(low, high)}")
        return self


class DataConfig(_Section):
    train_annotations: str | None = None
    train_images: str | None = None
    val_annotations: str | None = None
    val_images: str | None = None
    # How images are sized, in training and at test time (the input contract, stored with every checkpoint
    # and graph): "shortest_edge" (photos) draws the shorter side from min_size_train / sets it to
    # min_size_test, the longer side capped at max_size_train / max_size_test; "scale" (microscopy at a
    # known pixel size) multiplies every image by scale_test, and training images by a factor drawn
    # log-uniformly from scale_train (the scale jitter that covers other magnifications).
    resize: Literal["shortest_edge", "scale"] = "shortest_edge"
    min_size_train: list[int] = [800]
    max_size_train: int = 1333
    min_size_test: int = 800
    max_size_test: int = 1333
    scale_train: tuple[float, float] = (1.0, 1.0)
    # Wide scale jitter (magnifications far from the training data's): with probability scale_train_wide_prob a
    # training image's factor is drawn log-uniformly from scale_train_wide instead of scale_train, so the
    # factors are dense in scale_train (where test images are brought) and still cover the wide range.
    scale_train_wide: tuple[float, float] | None = None
    scale_train_wide_prob: float = 0.0
    scale_test: float = 1.0
    # Training inputs larger than this many pixels a side after the resize are cut to it at a random place
    # (instances cut by the window keep their visible part), bounding an iteration's cost at large factors.
    crop_size_train: int | None = None
    # How pixel values become 8-bit RGB (model.intensity): "rgb8" (photos) or "percentile" (microscopy: the
    # percentiles below map to 0 and 255). Training draws each image's percentiles from the *_train ranges
    # when they are given (intensity jitter).
    intensity: Literal["rgb8", "percentile"] = "rgb8"
    percentiles: tuple[float, float] = (1.0, 99.8)
    percentile_low_train: tuple[float, float] | None = None
    percentile_high_train: tuple[float, float] | None = None
    hflip_prob: float = 0.5
    vflip_prob: float = 0.0
    rot90_prob: float = 0.0  # probability of a quarter turn (either way), for images with no up and down
    # Raw-intensity changes before the intensity rule (microscopy, "percentile" rule only); off by default.
    photometric: PhotometricConfig = Field(default_factory=PhotometricConfig)
    size_divisibility: int = 32
    num_workers: int = 2

    @model_validator(mode="after")
    def _ranges(self) -> DataConfig:
        low, high = self.scale_train
        if not 0 < low <= high or not self.scale_test > 0:
            raise ValueError(
                f"scales must be positive with scale_train low <= high, got {self.scale_train}, {self.scale_test}"
            )
        if not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")
        if not 0 <= self.scale_train_wide_prob <= 1:
            raise ValueError(f"scale_train_wide_prob must lie in [0, 1], got {self.scale_train_wide_prob}")
        if self.scale_train_wide_prob > 0:
            if self.resize != "scale" or self.scale_train_wide is None:
                raise ValueError("scale_train_wide_prob > 0 needs resize: scale and a scale_train_wide range")
            wide_low, wide_high = self.scale_train_wide
            if not 0 < wide_low <= wide_high:
                raise ValueError(f"scale_train_wide must be positive with low <= high, got {self.scale_train_wide}")
        if self.crop_size_train is not None and self.crop_size_train < self.size_divisibility:
            raise ValueError(
                f"crop_size_train={self.crop_size_train} is smaller than size_divisibility={self.size_divisibility}"
            )
        if self.photometric.enabled and self.intensity != "percentile":
            raise ValueError("photometric changes act on raw microscopy intensities: they need intensity: percentile")
        return self


class SolverConfig(_Section):
    ims_per_batch: int = 16  # global batch, split across ranks
    base_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    bias_lr_factor: float = 1.0
    weight_decay_bias: float | None = None
    warmup_method: Literal["linear", "constant"] = "linear"
    warmup_factor: float = 1.0 / 1000
    warmup_iters: int = 1000
    steps: list[int] = [60000, 80000]
    gamma: float = 0.1
    max_iter: int = 90000
    checkpoint_period: int = 5000
    eval_period: int = 0  # 0: evaluate only at the end
    amp: bool = True  # used only where CUDA is present
    clip_grad_norm: float | None = None


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    solver: SolverConfig = Field(default_factory=SolverConfig)
    output_dir: str = "runs/default"
    seed: int = 0


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a mapping, not {type(data).__name__}")
    base = data.pop("_base_", None)
    if base is None:
        return data
    return _deep_merge(_read_yaml((path.parent / base).resolve()), data)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML (numbers, lists, booleans)."""
    data = _deep_merge({}, data)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key.sub=value")
        dotted, raw = item.split("=", 1)
        node = data
        *parents, leaf = dotted.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    data = _read_yaml(Path(path)) if path is not None else {}
    return Config.model_validate(apply_overrides(data, overrides or []))
