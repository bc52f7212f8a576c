"""Deletion / insertion AUC (robustx.explain.faithfulness) on a linear model whose faithful map is known."""

import pytest
import torch
from torch import nn

from robustx.explain.faithfulness import (
    auc,
    baseline_images,
    deletion_auc,
    insertion_auc,
    perturbation_curve,
    pixel_order,
    random_maps,
)


class _Linear(nn.Module):
    """logit_1 = sum(w * x) - bias, logit_0 = 0: pixel (h, w)'s contribution to class 1 is w[h, w] * sum_c x[c, h, w]."""

    def __init__(self, w: torch.Tensor, bias: float) -> None:
        super().__init__()
        self.register_buffer("w", w)  # (H, W)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.sum(1) * self.w).flatten(1).sum(1) - self.bias  # (B,)
        return torch.stack([torch.zeros_like(z), z], 1)  # (B, 2)


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(8, 8, generator=g) ** 3  # a few pixels carry most of the evidence
    x = 0.5 + 0.5 * torch.rand(4, 3, 8, 8, generator=g)
    total = float((x.sum(1) * w).flatten(1).sum(1).mean())
    model = _Linear(w * 12.0 / total, bias=6.0).eval()  # clean logit about +6: confidently class 1
    contrib = x.sum(1) * model.w  # (B, H, W): the exact per-pixel evidence
    return model, x, contrib, torch.ones(4, dtype=torch.long)


def test_deletion_auc_orders_perfect_random_anti_maps():
    model, x, perfect, y = _setup()
    rand = random_maps(tuple(perfect.shape), seed=1)
    d_perfect = deletion_auc(model, x, perfect, y, steps=16)
    d_random = deletion_auc(model, x, rand, y, steps=16)
    d_anti = deletion_auc(model, x, -perfect, y, steps=16)
    assert d_perfect.shape == (4,)
    assert (d_perfect < d_random).all() and (d_random < d_anti).all()


def test_insertion_auc_is_reversed():
    model, x, perfect, y = _setup()
    rand = random_maps(tuple(perfect.shape), seed=1)
    i_perfect = insertion_auc(model, x, perfect, y, steps=16, baseline="zero")
    i_random = insertion_auc(model, x, rand, y, steps=16, baseline="zero")
    i_anti = insertion_auc(model, x, -perfect, y, steps=16, baseline="zero")
    assert (i_perfect > i_random).all() and (i_random > i_anti).all()


def test_curve_endpoints_are_clean_and_baseline():
    model, x, perfect, y = _setup()
    p_clean = model(x).softmax(1)[:, 1]
    p_zero = model(torch.zeros_like(x)).softmax(1)[:, 1]
    dele = perturbation_curve(model, x, perfect, y, mode="deletion", steps=8, baseline="zero")
    ins = perturbation_curve(model, x, perfect, y, mode="insertion", steps=8, baseline="zero")
    assert dele.shape == ins.shape == (4, 9)
    assert torch.allclose(dele[:, 0], p_clean, atol=1e-6) and torch.allclose(dele[:, -1], p_zero, atol=1e-6)
    assert torch.allclose(ins[:, 0], p_zero, atol=1e-6) and torch.allclose(ins[:, -1], p_clean, atol=1e-6)
    # small batch_size splits the forward passes without changing the curve
    assert torch.allclose(perturbation_curve(model, x, perfect, y, mode="deletion", steps=8, baseline="zero", batch_size=5), dele)


def test_auc_of_simple_curves():
    assert auc(torch.full((2, 11), 0.3)).tolist() == pytest.approx([0.3, 0.3])
    assert auc(torch.linspace(1, 0, 5)[None]).item() == pytest.approx(0.5)


def test_pixel_order_puts_important_pixels_first_and_breaks_ties_randomly():
    m = torch.zeros(1, 4, 4)
    m[0, 3, 3] = 2.0
    m[0, 0, 1] = 1.0
    order = pixel_order(m, seed=0)
    assert order[0, :2].tolist() == [15, 1]
    rest = order[0, 2:].tolist()
    assert sorted(rest) == sorted(set(range(16)) - {15, 1})
    assert rest != sorted(rest)  # ties are not left in raster order
    assert torch.equal(pixel_order(m, seed=0), order)


def test_baselines_and_errors():
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(baseline_images(x, "zero"), torch.zeros_like(x))
    mean = baseline_images(x, "mean")
    assert torch.allclose(mean[:, :, 0, 0], x.mean((2, 3)))
    blur = baseline_images(x, "blur")
    assert blur.shape == x.shape and blur.std() < x.std()
    with pytest.raises(ValueError, match="choose zero, blur or mean"):
        baseline_images(x, "noise")
    model, xs, perfect, y = _setup()
    with pytest.raises(ValueError, match="deletion or insertion"):
        perturbation_curve(model, xs, perfect, y, mode="both")
    with pytest.raises(ValueError, match="maps"):
        deletion_auc(model, xs, perfect[:, :4], y)
