"""Backbones (C3-C5 feature maps) and the FPN with P6/P7 from P5 (docs/methods.md, FCOS: backbone and FPN).

Weights are loaded from a file and checked by sha256; library code never downloads.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torchvision.models import mobilenet_v2, resnet50, resnet101
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

from model.config import BackboneConfig, ModelConfig

# torchvision's cache names for the ImageNet weights, used when the config gives no path.
_TORCHVISION_CACHE_NAMES = {
    "mobilenet_v2": "mobilenet_v2-b0353104.pth",
    "resnet50": "resnet50-0676ba61.pth",
    "resnet101": "resnet101-63fe2227.pth",
}


def resolve_weights_path(spec: str) -> Path:
    """A plain path, or ``package:<module>/<file inside it>`` for weights shipped in an installed package."""
    if spec.startswith("package:"):
        module, _, relative = spec[len("package:") :].partition("/")
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(f"weights package {module!r} is not installed (see the README's set-up command)")
        return Path(next(iter(found.submodule_search_locations))) / relative
    return Path(spec).expanduser()


def _default_weights_path(name: str) -> Path | None:
    cached = Path(torch.hub.get_dir()) / "checkpoints" / _TORCHVISION_CACHE_NAMES[name]
    return cached if cached.is_file() else None


def load_imagenet_state(cfg: BackboneConfig) -> dict[str, torch.Tensor] | None:
    """The backbone's ImageNet state dict, or None when the config asks for random initialisation."""
    path = resolve_weights_path(cfg.weights) if cfg.weights else _default_weights_path(cfg.name)
    if path is None:
        return None
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights not found: {path}")
    if cfg.weights_sha256:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != cfg.weights_sha256:
            raise ValueError(f"{path}: sha256 {digest} does not match the config's {cfg.weights_sha256}")
    return torch.load(path, map_location="cpu", weights_only=True)


def _freeze(modules: list[nn.Module]) -> None:
    for module in modules:
        for parameter in module.parameters():
            parameter.requires_grad_(False)


class MobileNetV2Body(nn.Module):
    """torchvision MobileNetV2 features split at strides 8, 16 and 32 (channels 32, 96, 320)."""

    out_channels = (32, 96, 320)

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        features = mobilenet_v2(norm_layer=FrozenBatchNorm2d).features
        state = load_imagenet_state(cfg)
        if state is not None:
            prefixed = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
            features.load_state_dict(prefixed)
        # features[18] is the 1280-channel classifier conv, unused by a detector.
        self.stages = nn.ModuleList([features[:7], features[7:14], features[14:18]])
        # freeze_at counts like detectron2: 1 = stem, 2 = stem + the stride-4 blocks.
        frozen_blocks = (0, 1, 4, 7)[min(cfg.freeze_at, 3)]
        _freeze([features[i] for i in range(frozen_blocks)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs


class ResNetBody(nn.Module):
    """torchvision ResNet with frozen BN; res3-res5 outputs (channels 512, 1024, 2048)."""

    out_channels = (512, 1024, 2048)

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        builder = resnet50 if cfg.name == "resnet50" else resnet101
        net = builder(norm_layer=FrozenBatchNorm2d)
        state = load_imagenet_state(cfg)
        if state is not None:
            net.load_state_dict(state)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.res2, self.res3, self.res4, self.res5 = net.layer1, net.layer2, net.layer3, net.layer4
        _freeze([self.stem, self.res2, self.res3, self.res4, self.res5][: cfg.freeze_at])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c2 = self.res2(self.stem(x))
        c3 = self.res3(c2)
        c4 = self.res4(c3)
        return [c3, c4, self.res5(c4)]


class BackboneWithFPN(nn.Module):
    """Returns P3-P7 (strides 8-128); P6 is a stride-2 conv on P5 and P7 one on relu(P6)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.body = MobileNetV2Body(cfg.backbone) if cfg.backbone.name == "mobilenet_v2" else ResNetBody(cfg.backbone)
        channels = cfg.fpn.out_channels
        # With equal in/out channels torchvision's LastLevelP6P7 builds P6 from P5, as the reference does.
        self.fpn = FeaturePyramidNetwork(
            list(self.body.out_channels), channels, extra_blocks=LastLevelP6P7(channels, channels)
        )
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c3, c4, c5 = self.body(x)
        pyramid = self.fpn(OrderedDict([("c3", c3), ("c4", c4), ("c5", c5)]))
        return list(pyramid.values())
