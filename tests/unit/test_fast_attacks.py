"""Attacks on a faster stand-in model (eval.py fast_attacks=true): misclassified images skipped, fp32 re-checks, stretch, refinement and rerun."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustx.compiled import FastForward, retain_graph_allowed
from robustx.robustness.crosscheck import independent_minimal_perturbation
from robustx.robustness.fixed_radius import fixed_radius_attack

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _linear(d: int, c: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, c)).eval()


class _Shifted(nn.Module):
    """The same linear model with its logits nudged: its decision boundary sits a little off the fp32 one."""

    def __init__(self, model: nn.Module, shift: torch.Tensor) -> None:
        super().__init__()
        self.model, self.shift = model, shift

    def forward(self, x):
        z = self.model(x)
        return z + self.shift.to(z.dtype)


def _images(n: int, shape=(3, 6, 6), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return 0.4 + 0.2 * torch.rand(n, *shape, generator=g), g


def test_misclassified_images_are_not_attacked_and_the_rest_match_a_separate_run():
    model = _linear(3 * 6 * 6, 5)
    x, g = _images(12)
    y = model(x).argmax(1)
    y[:4] = (y[:4] + 1) % 5  # four images misclassified unperturbed
    seen = []

    class Spy(nn.Module):
        def forward(self, t):
            seen.append(t.size(0))
            return model(t)

    r, adv = independent_minimal_perturbation(Spy(), x, y, attack="ddn", steps=30)
    assert (r[:4] == 0).all() and torch.equal(adv[:4], x[:4])
    assert max(seen[1:-1]) == 8  # only the 8 correctly classified images go to the attack
    alone, _ = independent_minimal_perturbation(model, x[4:], y[4:], attack="ddn", steps=30)
    torch.testing.assert_close(r[4:], alone, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("attack", ["ddn", "fab"])
def test_an_attack_on_a_shifted_model_reports_only_fp32_adversarial_examples(attack):
    model = _linear(3 * 6 * 6, 5, seed=2)
    x, _ = _images(10, seed=3)
    y = model(x).argmax(1)
    stand_in = _Shifted(model, torch.tensor([0.0, 0.02, 0.02, 0.02, 0.02]))  # fooled a hair earlier than fp32
    r, adv = independent_minimal_perturbation(model, x, y, attack=attack, steps=60, attack_model=stand_in)
    found = torch.isfinite(r)
    assert found.sum() >= 8
    assert (model(adv[found]).argmax(1) != y[found]).all()  # every reported example fails in fp32
    assert adv.min() >= 0 and adv.max() <= 1
    plain, _ = independent_minimal_perturbation(model, x, y, attack=attack, steps=60)
    both = found & torch.isfinite(plain)
    assert float(((r[both] - plain[both]).abs() / plain[both]).median()) < 0.05  # the stretch is small


@pytest.mark.parametrize("refine_steps", [0, 20])
def test_fixed_radius_with_a_fast_stand_in_keeps_the_fp32_verdict(refine_steps):
    from tests.unit.test_fixed_radius_and_ensemble import _exact_l2

    model = _linear(3 * 6 * 6, 10, seed=4)
    with torch.no_grad():
        model[1].bias[0] += 0.5  # every image in class 0
    x, _ = _images(20, seed=5)
    y, dist = _exact_l2(model, x)
    eps = float(dist.median())
    # The stand-in is fooled earlier than fp32 (the other classes raised): near the radius its examples fail only for it.
    stand_in = _Shifted(model, torch.full((10,), 0.02).index_fill(0, torch.tensor([0]), 0.0))
    alone = fixed_radius_attack(stand_in, x, y, norm="L2", eps=eps, version="quick")
    assert int(alone["robust"].sum()) < int((dist > eps).sum())  # believed alone, it breaks too many
    out = fixed_radius_attack(model, x, y, norm="L2", eps=eps, version="quick", attack_model=stand_in, refine_steps=refine_steps)
    assert torch.equal(out["robust"], dist > eps)  # the analytic fp32 verdict
    handled = sum(out["rerun_fp32"].values()) + sum(out["refined_fp32"].values())
    assert handled > 0  # the stand-in's near-misses were finished in fp32
    if not refine_steps:
        assert not out["refined_fp32"]
    broken = ~out["robust"]
    assert (out["norm_found"][broken] <= eps * (1 + 1e-5)).all()


def test_fast_forward_matches_the_model_within_bf16_and_gives_fp32_logits():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.rand(5, 3, 8, 8, requires_grad=True)
    fast = FastForward(model, bf16=True, channels_last=True, compile=False)
    out = fast(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, model(x), rtol=0.05, atol=0.05)
    (g,) = torch.autograd.grad(out.sum(), x)  # differentiable w.r.t. the input, as attacks need
    assert g.shape == x.shape and torch.isfinite(g).all()
    plain = FastForward(model, bf16=False, channels_last=False, compile=False)
    torch.testing.assert_close(plain(x), model(x))


def test_compiled_fast_forward_allows_several_backwards_on_one_graph():
    """FAB differentiates each class's logit on one graph (retain_graph=True); the compiled FastForward allows it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
    fast = FastForward(model, bf16=False, channels_last=False, compile=True)
    x = torch.rand(5, 3, 8, 8, requires_grad=True)
    with retain_graph_allowed():
        out = fast(x)  # (5, 3)
        grads = [torch.autograd.grad(out[:, k].sum(), x, retain_graph=True)[0] for k in range(3)]
    x_ref = x.detach().clone().requires_grad_(True)
    ref = model(x_ref)
    for k in range(3):
        torch.testing.assert_close(grads[k], torch.autograd.grad(ref[:, k].sum(), x_ref, retain_graph=True)[0], rtol=1e-4, atol=1e-5)


def test_refinement_finishes_a_near_miss_inside_the_radius_in_fp32():
    """A point 98% of the way to a linear model's nearest boundary, radius 1.2x the distance: a few fp32 APGD-CE steps cross it inside the radius."""
    from robustx.robustness.fixed_radius import _refine, counts_at_radius, perturbation_norm
    from tests.unit.test_fixed_radius_and_ensemble import _nearest_boundary

    model = _linear(3 * 6 * 6, 4, seed=6)
    x, _ = _images(6, seed=7)
    y, dist, direction = _nearest_boundary(model, x)
    start = (x.flatten(1).double() + 0.98 * dist[:, None] * direction).float().view_as(x)  # (B, C, H, W)
    eps = float(1.2 * dist.max())
    assert not counts_at_radius(model, start, x, y, norm="L2", eps=eps)[0].any()  # a near-miss, still classified y
    adv = _refine(model, x, y, start, norm="L2", eps=eps, steps=10)
    ok, size = counts_at_radius(model, adv, x, y, norm="L2", eps=eps)
    assert ok.all() and (size <= eps * (1 + 1e-5)).all()
    assert torch.allclose(perturbation_norm(adv - x, "L2"), size)
