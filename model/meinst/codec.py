"""MEInst's PCA mask codec: 28x28 box-relative binary masks <-> whitened coefficient vectors.

Faithful to AdelaiDet ``PCAMaskEncoding`` (docs/methods.md, MEInst: codec): class-agnostic, whitened, with the
"sigmoid" preprocessing (stochastically label-smoothed logits). The PCA lives in persistent buffers so that a
checkpoint alone carries the codec; the ``.npz`` format is the reference one, so AdelaiDet's COCO file loads.
"""

from __future__ import annotations

import math
from os import PathLike

import numpy as np
import torch
from torch import nn
from torchvision.ops import roi_align

EPS_MIN = 0.01
EPS_MAX = 0.05
NPZ_KEYS = ("components_c", "mean_c", "explained_variance_c", "ratio_c")


def smoothed_logits(masks: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Binary masks -> logits of label-smoothed values, eps drawn afresh per pixel and per call.

    eps = max(0.05 * U(0,1), 0.01), so eps is in [0.01, 0.05] with P(eps = 0.01) = 0.2; 1 -> 1 - eps,
    0 -> eps. Re-drawing eps every call makes it a stochastic label smoothing of the training targets.
    """
    values = masks.to(torch.float32)
    uniform = torch.rand(values.shape, generator=generator, device=values.device)
    eps = (EPS_MAX * uniform).clamp_min(EPS_MIN)
    return torch.logit(torch.where(values >= 0.5, 1.0 - eps, eps))


def crop_bitmasks(masks: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each mask to its box and resample to ``size x size``: roi_align(aligned=True), then >= 0.5.

    detectron2 ``BitMasks.crop_and_resize`` semantics. masks [G,H,W] (any dtype, 0/1), boxes [G,4] xyxy in
    the masks' pixel frame -> [G,size,size] float 0/1. Each mask is first cut to its box plus a 2-pixel
    margin (clipped to the image): roi_align's samples and its border rules are unchanged by that cut, and
    only the window is converted to float, so memory is O(box area), not O(G*H*W).
    """
    if masks.dim() != 3 or boxes.shape != (masks.shape[0], 4):
        raise ValueError(f"expected masks [G,H,W] and boxes [G,4], got {tuple(masks.shape)} and {tuple(boxes.shape)}")
    height, width = masks.shape[-2:]
    out = torch.zeros((masks.shape[0], size, size), dtype=torch.float32, device=masks.device)
    for g, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        left = min(max(math.floor(x0) - 2, 0), width - 1)
        top = min(max(math.floor(y0) - 2, 0), height - 1)
        right = max(min(math.ceil(x1) + 2, width), left + 1)
        bottom = max(min(math.ceil(y1) + 2, height), top + 1)
        window = masks[g, top:bottom, left:right].to(torch.float32)[None, None]
        roi = torch.tensor([[0.0, x0 - left, y0 - top, x1 - left, y1 - top]], device=masks.device)
        resampled = roi_align(window, roi, (size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True)
        out[g] = (resampled[0, 0] >= 0.5).to(torch.float32)
    return out


class PCAMaskCodec(nn.Module):
    """Whitened class-agnostic PCA of box-relative masks, kept as persistent buffers.

    A freshly built codec is empty (``is_fitted`` False); fill it with ``load_npz``/``load_arrays`` or
    by loading a checkpoint's state dict. Loading a file with more components than configured keeps the
    first ``num_components``: PCA components are ordered by explained variance, so the prefix is exactly
    the PCA of that smaller size (whitening is per component, so nothing else changes).
    """

    components: torch.Tensor
    explained_variance: torch.Tensor
    mean: torch.Tensor
    fitted: torch.Tensor

    def __init__(self, num_components: int = 60, mask_size: int = 28) -> None:
        super().__init__()
        if num_components < 1 or mask_size < 1:
            raise ValueError(f"num_components and mask_size must be positive, got {num_components}, {mask_size}")
        if num_components > mask_size * mask_size:
            raise ValueError(f"num_components={num_components} exceeds the mask dimension {mask_size * mask_size}")
        self.num_components = num_components
        self.mask_size = mask_size
        dim = mask_size * mask_size
        self.register_buffer("components", torch.zeros(num_components, dim))
        self.register_buffer("explained_variance", torch.zeros(num_components))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("fitted", torch.tensor(False))

    def extra_repr(self) -> str:
        return f"num_components={self.num_components}, mask_size={self.mask_size}, fitted={self.is_fitted}"

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted)

    def require_fitted(self) -> None:
        """Raise unless a PCA was loaded; call it outside traced code (it reads a buffer's value)."""
        if not self.is_fitted:
            raise RuntimeError(
                "the MEInst mask codec holds no PCA: fit one with `python -m training.fit_codec --annotations "
                "train.json --out codec.npz` and set model.meinst.codec_path, or load a checkpoint that carries it"
            )

    @torch.no_grad()
    def load_arrays(
        self,
        components: np.ndarray | torch.Tensor,
        explained_variance: np.ndarray | torch.Tensor,
        mean: np.ndarray | torch.Tensor,
    ) -> PCAMaskCodec:
        """Fill the buffers from components [K',S*S], explained_variance [K'], mean [S*S] with K' >= K."""
        components = torch.as_tensor(components, dtype=torch.float32).cpu()
        explained_variance = torch.as_tensor(explained_variance, dtype=torch.float32).cpu()
        mean = torch.as_tensor(mean, dtype=torch.float32).cpu()
        dim = self.mask_size * self.mask_size
        if components.dim() != 2 or components.shape[1] != dim or mean.shape != (dim,):
            raise ValueError(
                f"codec arrays are for masks of {tuple(components.shape[1:])} pixels (mean {tuple(mean.shape)}), "
                f"this codec is configured for mask_size={self.mask_size} ({dim} pixels)"
            )
        if explained_variance.shape != components.shape[:1]:
            raise ValueError(
                f"explained_variance {tuple(explained_variance.shape)} does not match "
                f"components {tuple(components.shape)}"
            )
        if components.shape[0] < self.num_components:
            raise ValueError(
                f"codec has {components.shape[0]} components, this codec is configured for {self.num_components}"
            )
        k = self.num_components
        if not bool((explained_variance[:k] > 0).all()) or not bool(torch.isfinite(components[:k]).all()):
            raise ValueError("codec arrays must be finite, with positive explained variances (whitening divides)")
        self.components.copy_(components[:k])
        self.explained_variance.copy_(explained_variance[:k])
        self.mean.copy_(mean)
        self.fitted.fill_(True)
        return self

    def load_npz(self, path: str | PathLike[str]) -> PCAMaskCodec:
        """Load a reference-format ``.npz`` (keys ``components_c`` (1,K,784), ``explained_variance_c``, ``mean_c``)."""
        components, explained_variance, mean = _read_npz(path)
        try:
            return self.load_arrays(components, explained_variance, mean)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    @classmethod
    def from_npz(
        cls, path: str | PathLike[str], num_components: int | None = None, mask_size: int | None = None
    ) -> PCAMaskCodec:
        """Build a codec from a file; K and the mask size default to the file's."""
        components, explained_variance, mean = _read_npz(path)
        if mask_size is None:
            mask_size = math.isqrt(components.shape[1])
            if mask_size * mask_size != components.shape[1]:
                raise ValueError(f"{path}: {components.shape[1]} pixels per mask is not a square mask")
        codec = cls(components.shape[0] if num_components is None else num_components, mask_size)
        try:
            return codec.load_arrays(components, explained_variance, mean)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    def save_npz(self, path: str | PathLike[str], ratio: np.ndarray | torch.Tensor) -> None:
        """Write the reference format (float32, leading class axis); ``ratio`` is the explained-variance ratio [K]."""
        self.require_fitted()
        ratio = torch.as_tensor(ratio, dtype=torch.float32).cpu().numpy()
        if ratio.shape != (self.num_components,):
            raise ValueError(f"ratio must have shape ({self.num_components},), got {ratio.shape}")
        with open(path, "wb") as f:  # a file object keeps np.savez from appending ".npz" to the name
            np.savez(
                f,
                components_c=self.components.detach().cpu().float().numpy()[None],
                mean_c=self.mean.detach().cpu().float().numpy()[None],
                explained_variance_c=self.explained_variance.detach().cpu().float().numpy()[None],
                ratio_c=ratio[None],
            )

    def encode(self, masks: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Binary masks [N,S,S] or [N,S*S] -> whitened coefficients [N,K], with freshly drawn eps."""
        self.require_fitted()
        dim = self.mask_size * self.mask_size
        flat = masks.reshape(masks.shape[0], -1)
        if flat.shape[1] != dim:
            raise ValueError(f"expected masks of {self.mask_size}x{self.mask_size}, got {tuple(masks.shape)}")
        logits = smoothed_logits(flat, generator).to(self.components.dtype)
        return (logits - self.mean) @ self.components.T / self.explained_variance.sqrt()

    def decode_logits(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Whitened coefficients [...,K] -> mask logits [...,S*S]: one matmul and an add (ONNX-traceable)."""
        return coeffs @ (self.components * self.explained_variance.sqrt()[:, None]) + self.mean

    def decode(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Whitened coefficients [...,K] -> mask probabilities [...,S,S]."""
        return torch.sigmoid(self.decode_logits(coeffs)).unflatten(-1, (self.mask_size, self.mask_size))


def _read_npz(path: str | PathLike[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(components [K,D], explained_variance [K], mean [D]) of a reference-format file, class axis removed."""
    with np.load(path) as data:
        missing = [key for key in NPZ_KEYS[:3] if key not in data.files]
        if missing:
            raise KeyError(
                f"{path}: codec file lacks {missing} (has {sorted(data.files)}); expected keys {list(NPZ_KEYS)}"
            )
        components, mean, explained_variance = (data[key] for key in NPZ_KEYS[:3])
    if components.ndim != 3 or mean.ndim != 2 or explained_variance.ndim != 2:
        raise ValueError(
            f"{path}: expected components_c (1,K,D), mean_c (1,D), explained_variance_c (1,K), got "
            f"{components.shape}, {mean.shape}, {explained_variance.shape}"
        )
    if components.shape[0] != 1 or mean.shape[0] != 1 or explained_variance.shape[0] != 1:
        raise ValueError(
            f"{path}: only class-agnostic codecs (class axis of size 1) are supported, got {components.shape}"
        )
    return components[0], explained_variance[0], mean[0]
