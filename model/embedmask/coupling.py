"""EmbedMask's RBF coupling between pixel and proposal embeddings, shared by the loss and inference.

p(pixel | proposal k) = exp(-E_k), E_k = sum_d sigma_kd * (e_pix_d - e_prop_kd)^2 (no 1/2, no sqrt).
Written with dense ops only (mean, matmul, sum, clip) so it traces to ONNX opset 17 unchanged.
"""

from __future__ import annotations

import math

import torch

# The reference takes logit(p.clamp(EPS, 1 - EPS)) with EPS = 1e-9. In energy terms p <= 1 - EPS is
# E >= -log1p(-EPS) (~1e-9) and p >= EPS is E <= -log(EPS) (~20.72), so logits lie in +/-20.72.
# (In float32 the reference's upper clamp is a no-op since 1 - 1e-9 rounds to 1; this is the exact form.)
_EPS = 1e-9
_E_MIN = -math.log1p(-_EPS)
_E_MAX = -math.log(_EPS)


def coupling_energy(pixel_embed: torch.Tensor, proposal_embed: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E [..., K, P] from pixel_embed [..., D, P], proposal_embed [..., K, D], sigma [..., K, D].

    The square is expanded so that the cost is one [K, 2D] x [2D, P] matmul: memory is O(K*P), never
    O(K*P*D), so the loss needs no chunking over instances to stay bounded. Both embeddings are centred
    on the mean pixel embedding first (distances are unchanged) so that the large spatial coordinates
    (x/100 on a big image) do not cancel catastrophically in float32.
    """
    centre = pixel_embed.mean(dim=-1, keepdim=True)  # [..., D, 1]
    pix = pixel_embed - centre
    prop = proposal_embed - centre.transpose(-1, -2)  # [..., K, D]
    weights = torch.cat([sigma, -2.0 * sigma * prop], dim=-1)  # [..., K, 2D]
    features = torch.cat([pix * pix, pix], dim=-2)  # [..., 2D, P]
    energy = torch.matmul(weights, features) + (sigma * prop * prop).sum(dim=-1, keepdim=True)
    return energy.clamp(min=0.0)


def coupling_logit(energy: torch.Tensor) -> torch.Tensor:
    """logit(p) for p = exp(-E), as -E - log(1 - exp(-E)) via expm1 (no cancellation near p = 1).

    E is clamped to the range that the reference's clamp(p, 1e-9, 1 - 1e-9) allows, so the logit is finite
    (|logit| <= 20.72) for E = 0 and E = inf alike. Training only: ONNX has no expm1, and inference
    works on log p = -E directly.
    """
    energy = energy.clamp(min=_E_MIN, max=_E_MAX)
    return -energy - torch.log(-torch.expm1(-energy))
