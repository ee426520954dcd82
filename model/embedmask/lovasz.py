"""Binary Lovasz hinge (Berman et al., CVPR 2018): a convex surrogate of the Jaccard loss of one mask.

EmbedMask trains each instance's coupling logits against its GT mask with it, over all pixels.
"""

from __future__ import annotations

import torch


def lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss w.r.t. errors sorted descending, [..., P].

    Entry i is J(S_i) - J(S_{i-1}) for the prefix sets S_i of the sorted pixels (Alg. 1 of the paper).
    """
    gt = gt_sorted.float()
    gts = gt.sum(dim=-1, keepdim=True)
    intersection = gts - gt.cumsum(dim=-1)
    union = gts + (1.0 - gt).cumsum(dim=-1)  # float before subtracting: bool labels are fine
    jaccard = 1.0 - intersection / union
    return torch.cat([jaccard[..., :1], jaccard[..., 1:] - jaccard[..., :-1]], dim=-1)


def lovasz_hinge_per_instance(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Lovasz hinge of each row: logits [K, P], labels [K, P] in {0, 1} -> losses [K] (one batched sort)."""
    signs = 2.0 * labels.to(logits.dtype) - 1.0
    errors = 1.0 - logits * signs
    errors_sorted, perm = torch.sort(errors, dim=-1, descending=True)
    grad = lovasz_grad(torch.gather(labels, -1, perm)).to(logits.dtype)
    return (torch.relu(errors_sorted) * grad).sum(dim=-1)


def lovasz_hinge_flat(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Lovasz hinge of one mask: logits [P], labels [P] in {0, 1} -> scalar."""
    return lovasz_hinge_per_instance(logits[None], labels[None])[0]
