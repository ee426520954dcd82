"""EmbedMask math core: the RBF coupling and the Lovasz hinge against brute-force definitions."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from model.embedmask.coupling import coupling_energy, coupling_logit
from model.embedmask.lovasz import lovasz_hinge_flat, lovasz_hinge_per_instance


def brute_energy(pix: torch.Tensor, prop: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Triple loop in float64: E[k, p] = sum_d sigma[k, d] * (pix[d, p] - prop[k, d])^2."""
    pix, prop, sigma = pix.double().tolist(), prop.double().tolist(), sigma.double().tolist()
    num_dims, num_pix = len(pix), len(pix[0])
    out = [[0.0] * num_pix for _ in prop]
    for k in range(len(prop)):
        for p in range(num_pix):
            for d in range(num_dims):
                out[k][p] += sigma[k][d] * (pix[d][p] - prop[k][d]) ** 2
    return torch.tensor(out, dtype=torch.float64)


def image_like_embeddings(gen: torch.Generator, k: int, d: int, h: int, w: int, sigma_max: float):
    """Pixel/proposal embeddings as the heads make them: 2 spatial dims = location/100 + offset on a
    1333-px-wide image at stride 4, the rest small; sigma log-uniform up to ``sigma_max``."""
    ys, xs = torch.meshgrid(torch.arange(h) * 4.0 + 2, torch.arange(w) * 4.0 + 2, indexing="ij")
    pix = 0.5 * torch.randn(d, h * w, generator=gen)
    pix[0] += xs.flatten() / 100
    pix[1] += ys.flatten() / 100
    prop = pix[:, torch.randint(h * w, (k,), generator=gen)].T + 0.3 * torch.randn(k, d, generator=gen)
    sigma = torch.exp(torch.rand(k, d, generator=gen) * math.log(sigma_max))
    return pix, prop, sigma


@pytest.mark.parametrize("sigma_max", [1.0, 200.0])
def test_coupling_matches_brute_force_unbatched(sigma_max: float) -> None:
    gen = torch.Generator().manual_seed(0)
    pix, prop, sigma = image_like_embeddings(gen, k=4, d=16, h=6, w=333, sigma_max=sigma_max)
    sub = torch.arange(0, pix.shape[1], 17)  # brute force on a subset of columns; centring uses all
    expected = brute_energy(pix[:, sub], prop, sigma)
    exact = coupling_energy(pix.double(), prop.double(), sigma.double())[:, sub]
    torch.testing.assert_close(exact, expected, rtol=1e-10, atol=1e-9)
    # float32: error relative to the size of the terms, sum_d sigma*(centred values)^2, stays ~1e-6
    got = coupling_energy(pix, prop, sigma)[:, sub].double()
    scale = (sigma.double() * (1.0 + prop.double().var(0))).sum(1, keepdim=True)
    assert got.shape == expected.shape
    assert ((got - expected).abs() / scale).max() < 1e-5
    assert (got >= 0).all()


def test_coupling_matches_brute_force_batched() -> None:
    gen = torch.Generator().manual_seed(1)
    images = [image_like_embeddings(gen, k=3, d=5, h=4, w=20, sigma_max=50.0) for _ in range(2)]
    pix, prop, sigma = (torch.stack(t) for t in zip(*images))
    got = coupling_energy(pix, prop, sigma)
    assert got.shape == (2, 3, 80)
    for b in range(2):
        expected = brute_energy(pix[b], prop[b], sigma[b])
        torch.testing.assert_close(got[b].double(), expected, rtol=1e-5, atol=1e-4)


def test_coupling_is_zero_at_the_proposal_and_handles_no_proposals() -> None:
    gen = torch.Generator().manual_seed(2)
    pix, _, sigma = image_like_embeddings(gen, k=3, d=16, h=5, w=300, sigma_max=100.0)
    energy = coupling_energy(pix, pix[:, [7, 100, 1499]].T, sigma)
    assert torch.all(energy[[0, 1, 2], [7, 100, 1499]] < 1e-3)
    assert coupling_energy(pix, torch.zeros(0, 16), torch.zeros(0, 16)).shape == (0, 1500)


def test_coupling_gradcheck() -> None:
    gen = torch.Generator().manual_seed(3)
    pix = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    prop = torch.randn(2, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    sigma = torch.rand(2, 2, 3, generator=gen, dtype=torch.float64).add(0.5).requires_grad_()
    assert torch.autograd.gradcheck(coupling_energy, (pix, prop, sigma))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # dynamo=False is the exporter export/ uses
def test_coupling_exports_to_onnx(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")

    class Coupling(torch.nn.Module):
        def forward(self, pix, prop, sigma):
            return coupling_energy(pix, prop, sigma)

    gen = torch.Generator().manual_seed(4)
    pix, prop, sigma = image_like_embeddings(gen, k=3, d=16, h=4, w=10, sigma_max=10.0)
    path = tmp_path / "coupling.onnx"
    axes = {"pix": {0: "b", 2: "p"}, "prop": {0: "b", 1: "k"}, "sigma": {0: "b", 1: "k"}}
    torch.onnx.export(
        Coupling(),
        (pix[None], prop[None], sigma[None]),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=list(axes),
        output_names=["energy"],
        dynamic_axes=axes,
    )
    pix, prop, sigma = image_like_embeddings(gen, k=5, d=16, h=3, w=7, sigma_max=10.0)
    feeds = {"pix": pix[None].numpy(), "prop": prop[None].numpy(), "sigma": sigma[None].numpy()}
    (got,) = ort.InferenceSession(str(path)).run(None, feeds)
    np.testing.assert_allclose(got[0], coupling_energy(pix, prop, sigma).numpy(), rtol=1e-5, atol=1e-5)


def test_coupling_logit() -> None:
    energy = torch.logspace(-3, math.log10(15.0), 50, dtype=torch.float64)
    p = torch.exp(-energy)
    torch.testing.assert_close(coupling_logit(energy), torch.log(p) - torch.log1p(-p))
    # Both ends saturate where the reference's clamp(p, 1e-9, 1 - 1e-9) does, and stay finite.
    ends = coupling_logit(torch.tensor([0.0, 1e-12, 1e3, float("inf")], dtype=torch.float64))
    limit = math.log((1 - 1e-9) / 1e-9)
    torch.testing.assert_close(ends, torch.tensor([limit, limit, -limit, -limit], dtype=torch.float64))
    energy32 = torch.tensor([0.0, 1e-8, 1e-3, 1.0, 30.0], requires_grad=True)
    logit = coupling_logit(energy32)
    logit.sum().backward()
    assert torch.isfinite(logit).all() and torch.isfinite(energy32.grad).all()
    assert torch.all(logit[1:] < logit[:-1] + 1e-6)  # monotone: more energy, lower probability


def jaccard_loss(mispredicted: set[int], gt: set[int]) -> float:
    """Delta_J(M) = 1 - |gt \\ M| / |gt u M| = |M| / |gt u M| (Berman et al. eq. 3), with Delta_J({}) = 0."""
    return len(mispredicted) / len(gt | mispredicted) if mispredicted else 0.0


def brute_lovasz_hinge(logits: torch.Tensor, labels: list[int]) -> torch.Tensor:
    """Lovasz extension of Delta_J at the hinge errors m = relu(1 - logit * sign), from its definition:
    sum_i m_(i) * (Delta_J(S_i) - Delta_J(S_{i-1})) over the prefix sets S_i of pixels sorted by m."""
    signs = torch.tensor([1.0 if y else -1.0 for y in labels], dtype=logits.dtype)
    errors = torch.relu(1.0 - logits * signs)
    order = sorted(range(len(labels)), key=lambda i: -errors[i].item())
    gt = {i for i, y in enumerate(labels) if y}
    loss = logits.new_zeros(())
    for i in range(len(order)):
        weight = jaccard_loss(set(order[: i + 1]), gt) - jaccard_loss(set(order[:i]), gt)
        loss = loss + errors[order[i]] * weight
    return loss


def test_lovasz_matches_brute_force_and_its_gradient() -> None:
    gen = torch.Generator().manual_seed(5)
    for num_pix in range(1, 9):
        for trial in range(4):
            labels = torch.randint(0, 2, (num_pix,), generator=gen)
            if trial == 0:
                labels.zero_()  # empty GT: the loss is the largest error
            logits = (3 * torch.randn(num_pix, generator=gen, dtype=torch.float64)).requires_grad_()
            loss = lovasz_hinge_flat(logits, labels)
            (grad,) = torch.autograd.grad(loss, logits)
            expected = brute_lovasz_hinge(logits, labels.tolist())
            (expected_grad,) = torch.autograd.grad(expected, logits)
            torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-6)


def test_lovasz_gradient_matches_finite_differences() -> None:
    gen = torch.Generator().manual_seed(6)
    labels = torch.tensor([1, 0, 1, 1, 0, 0, 1])
    logits = torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: lovasz_hinge_flat(x, labels), (logits,), atol=1e-5)


def test_lovasz_per_instance_is_rowwise_and_accepts_bool_labels() -> None:
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(5, 40, generator=gen)
    labels = torch.rand(5, 40, generator=gen) > 0.6
    expected = torch.stack([lovasz_hinge_flat(logits[k], labels[k]) for k in range(5)])
    torch.testing.assert_close(lovasz_hinge_per_instance(logits, labels), expected)
    torch.testing.assert_close(lovasz_hinge_per_instance(logits, labels.to(torch.uint8)), expected)
    assert lovasz_hinge_per_instance(torch.zeros(0, 40), torch.zeros(0, 40, dtype=torch.bool)).shape == (0,)


def test_lovasz_is_minimised_by_the_right_mask() -> None:
    gen = torch.Generator().manual_seed(8)
    labels = (torch.rand(64, generator=gen) > 0.5).long()
    right = 10.0 * (2.0 * labels - 1.0)
    assert lovasz_hinge_flat(right, labels).item() == 0.0
    wrong = right.clone()
    wrong[:3] = -wrong[:3]
    assert lovasz_hinge_flat(wrong, labels) > 0.1
    for bits in itertools.product([0, 1], repeat=6):  # every other sign pattern on a small mask
        mask = torch.tensor(bits)
        if not torch.equal(mask, labels[:6]):
            assert lovasz_hinge_flat(10.0 * (2.0 * mask - 1.0), labels[:6]) > 0


def test_lovasz_gradient_descent_finds_the_mask() -> None:
    gen = torch.Generator().manual_seed(9)
    labels = (torch.rand(100, generator=gen) > 0.7).long()
    logits = torch.randn(100, generator=gen).requires_grad_()
    optimizer = torch.optim.SGD([logits], lr=1.0)
    start = lovasz_hinge_flat(logits, labels).item()
    assert start > 1.0
    for _ in range(200):
        optimizer.zero_grad()
        loss = lovasz_hinge_flat(logits, labels)
        loss.backward()
        optimizer.step()
    assert lovasz_hinge_flat(logits, labels).item() == 0.0  # every margin reached: logit * sign >= 1
    assert torch.equal(logits.detach() > 0, labels.bool())
