"""Fixed-radius accuracy (AutoAttack's attacks), the minimal-norm ensemble and its optimality, masking flags: analytic cases."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from robustx.robustness.crosscheck import PRESETS, ensemble_r, independent_minimal_perturbation, optimality, resolve_attacks
from robustx.robustness.fixed_radius import fixed_radius_attack, perturbation_norm, rmse_of_radius
from robustx.robustness.flags import contradiction_flags, model_checks, raised_lines, square_flag

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _linear(d: int, c: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, c)).eval()


def _nearest_boundary(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(predicted class, exact minimal L2 distance to another class's region, unit direction to it (B, D)) of a linear classifier."""
    w, b = model[1].weight.detach().double(), model[1].bias.detach().double()
    z = x.flatten(1).double() @ w.T + b  # (B, C)
    y = z.argmax(1)
    margins = z.gather(1, y[:, None]) - z  # (B, C)
    dw = w[y][:, None, :] - w[None]  # (B, C, D)
    dist = margins / dw.norm(dim=2).clamp_min(1e-12)  # (B, C)
    dist[torch.arange(len(y)), y] = math.inf
    d, c = dist.min(1)
    toward = -dw[torch.arange(len(y)), c]  # (B, D)
    return y, d, toward / toward.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _exact_l2(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class, exact minimal L2 distance to another class's region) of a linear classifier."""
    y, dist, _ = _nearest_boundary(model, x)
    return y, dist


@pytest.mark.parametrize("version", ["quick", "standard"])
def test_fixed_radius_on_a_linear_model_is_the_analytic_verdict(version):
    # Images near 0.5 and radii below 0.4: no perturbation within the radius leaves [0, 1], so the
    # box does not bind and robust <=> exact distance > eps.
    model = _linear(3 * 6 * 6, 10)
    x = 0.4 + 0.2 * torch.rand(24, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    y, r = _exact_l2(model, x)
    eps = float(r.detach().median())
    out = fixed_radius_attack(model, x, y, norm="L2", eps=eps, version=version, n_queries=100)
    assert torch.equal(out["robust"], r > eps)
    assert out["correct"].all() and 0 < int(out["robust"].sum()) < 24
    broken = ~out["robust"]
    assert (out["norm_found"][broken] <= eps * (1 + 1e-5)).all() and out["norm_found"][~broken].isnan().all()
    assert list(out["robust_after"]) == list(("apgd-ce", "apgd-t", "fab-t", "square") if version == "standard" else ("apgd-ce", "apgd-t"))
    # each attack only sees what is still robust
    assert out["attacked"]["apgd-t"] == out["robust_after"]["apgd-ce"]


def test_fixed_radius_eps_zero_limit_is_clean_accuracy_and_batch_size_independent():
    model = _linear(2 * 5 * 5, 4, seed=3)
    g = torch.Generator().manual_seed(2)
    x = 0.45 + 0.1 * torch.rand(16, 2, 5, 5, generator=g)
    y = torch.randint(0, 4, (16,), generator=g)  # some images misclassified unperturbed
    tiny = fixed_radius_attack(model, x, y, norm="Linf", eps=1e-7, version="quick")
    assert torch.equal(tiny["robust"], tiny["correct"])  # a vanishing radius leaves the clean accuracy
    whole = fixed_radius_attack(model, x, y, norm="L2", eps=0.05, version="quick")
    halves = [fixed_radius_attack(model, x[i : i + 8], y[i : i + 8], norm="L2", eps=0.05, version="quick") for i in (0, 8)]
    assert torch.equal(whole["robust"], torch.cat([h["robust"] for h in halves]))


def test_rmse_and_norms():
    assert rmse_of_radius("L2", 0.5, 3072) == pytest.approx(0.5 / math.sqrt(3072))
    assert rmse_of_radius("Linf", 8 / 255, 3072) == pytest.approx(8 / 255)
    d = torch.zeros(2, 1, 2, 2)
    d[0, 0, 0, 0], d[1] = 3.0, 0.5
    assert perturbation_norm(d, "L2").tolist() == [3.0, 1.0] and perturbation_norm(d, "Linf").tolist() == [3.0, 0.5]


@pytest.mark.parametrize("kwargs, message", [
    ({"norm": "L1"}, "norm must be one of"),
    ({"eps": 0.0}, "eps must be a finite number > 0"),
    ({"eps": float("nan")}, "eps must be a finite number > 0"),
    ({"version": "plus"}, "version must be one of"),
])
def test_fixed_radius_bad_settings_one_line(kwargs, message):
    model = _linear(4, 3)
    with pytest.raises(ValueError, match=message) as err:
        fixed_radius_attack(model, torch.rand(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), **{"eps": 0.1, **kwargs})
    assert "\n" not in str(err.value)


def test_images_outside_the_unit_box_are_refused():
    with pytest.raises(ValueError, match=r"images must lie in \[0, 1\]"):
        fixed_radius_attack(_linear(4, 3), torch.rand(2, 1, 2, 2) * 255, torch.zeros(2, dtype=torch.long), eps=0.1)


@pytest.mark.parametrize("classes", [2, 4])
def test_ensemble_attacks_match_the_analytic_minimal_l2_of_a_linear_model(classes):
    # Two classes: |w.x + b| / ||w|| with w, b the logit differences; more: the nearest of the
    # class boundaries' hyperplanes. As RMSE = L2 / sqrt(D); again the box does not bind.
    d = 3 * 4 * 4
    model = _linear(d, classes, seed=5)
    x = 0.45 + 0.1 * torch.rand(12, 3, 4, 4, generator=torch.Generator().manual_seed(6))
    y, r_exact = _exact_l2(model, x)
    r_exact = r_exact / math.sqrt(d)
    if classes == 2:
        w, b = model[1].weight.detach().double(), model[1].bias.detach().double()
        margin = (x.flatten(1).double() @ (w[1] - w[0]) + (b[1] - b[0])).abs()
        assert torch.allclose(r_exact, margin / (w[1] - w[0]).norm() / math.sqrt(d))
        with pytest.raises(ValueError, match="needs at least 3 classes"):
            independent_minimal_perturbation(model, x, y, attack="alma", steps=5)
    rs = {}
    for name in ("ddn", "fmn", "fab") if classes == 2 else ("ddn", "fmn", "alma", "fab"):
        r, adv = independent_minimal_perturbation(model, x, y, attack=name, steps=200 if name != "fab" else 50)
        found = torch.isfinite(r)
        assert found.double().mean() >= 0.9, name  # an attack may miss an image (FMN does here); the ensemble must not
        assert (r[found] >= r_exact.float()[found] * (1 - 1e-3)).all(), name  # nobody beats the true minimum
        rs[name] = r
    best = ensemble_r(*rs.values())
    assert torch.allclose(best, r_exact, rtol=0.02), (best / r_exact)
    assert optimality(best, best) == 1.0
    assert all(0.5 < optimality(r, best) <= 1.0 for r in rs.values())


def test_optimality_is_attackbench_s_normalized_area():
    best = torch.tensor([0.0, 1.0, 2.0, 4.0], dtype=torch.float64)  # one image misclassified unperturbed
    assert optimality(torch.tensor([0.0, math.inf, math.inf, math.inf]), best) == 0.0  # never succeeds within M
    assert optimality(best.clone(), best) == 1.0
    # areas over [0, M=4]: best = (0+1+2+4)/4 = 1.75, worst = 0.75*4 = 3, attack (0, 2, 2, 4) -> 2
    assert optimality(torch.tensor([0.0, 2.0, 2.0, 4.0]), best) == pytest.approx(1 - (2 - 1.75) / (3 - 1.75))


def test_presets_and_explicit_lists():
    assert resolve_attacks(preset="quick") == {"ddn": 1000}
    assert set(resolve_attacks(preset="thorough")) == {"ddn", "fmn", "alma", "fab"} == set(PRESETS["thorough"])
    assert resolve_attacks(attacks=["alma"], steps=30) == {"alma": 30}
    assert resolve_attacks(attacks=[]) == {}
    with pytest.raises(ValueError, match="unknown minimal-norm attack"):
        resolve_attacks(attacks=["cw"])
    with pytest.raises(ValueError, match="unknown ensemble preset"):
        resolve_attacks(preset="everything")


class _Noisy(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) + 0.1 * torch.randn(x.size(0), 3)


class _Softmax(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).softmax(1)


class _Quantized(nn.Module):
    """A step function of the input: zero gradient almost everywhere (shattered gradients)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 4) / 4)


def test_masked_models_raise_the_right_flags():
    inner = _linear(4, 3)
    x, y = torch.rand(8, 1, 2, 2), torch.randint(0, 3, (8,))
    clean = model_checks(inner, x, y)
    assert not any(f["raised"] for f in clean.values()), raised_lines(clean)
    assert model_checks(_Noisy(inner), x, y)["randomness"]["raised"]
    soft = model_checks(_Softmax(inner), x, y)
    assert soft["softmax_outputs"]["raised"] and not soft["randomness"]["raised"]
    quant = model_checks(_Quantized(inner), x, y)
    assert quant["zero_gradients"]["raised"] and quant["zero_gradients"]["value"] == 1.0
    assert [line.split(":")[0] for line in raised_lines(quant)] == ["zero_gradients"]


def test_square_and_contradiction_flags():
    assert square_flag({"apgd-ce": 50, "apgd-t": 48, "fab-t": 48, "square": 40}, num_images=100)["raised"]
    assert not square_flag({"apgd-ce": 50, "apgd-t": 48, "fab-t": 48, "square": 48}, num_images=100)["raised"]
    robust = torch.tensor([True, True, False, False])
    correct = torch.tensor([True, True, True, False])
    r_min = torch.tensor([0.5, 0.05, 0.5, 0.0])  # image 1: a perturbation inside the radius exists; image 2: none found
    f = contradiction_flags(robust, correct, r_min, eps_rmse=0.1, label="L2 0.5")
    assert f["fixed_radius_above_minimal_norm"]["raised"] and f["fixed_radius_above_minimal_norm"]["value"] == 0.25
    assert f["minimal_norm_above_fixed_radius"]["raised"] and f["minimal_norm_above_fixed_radius"]["value"] == 0.25
    ok = contradiction_flags(torch.tensor([True, False]), torch.tensor([True, True]), torch.tensor([0.5, 0.05]), eps_rmse=0.1, label="x")
    assert not any(v["raised"] for v in ok.values())


def test_datamodule_threat_models_default_and_validation():
    from datamodules import CIFAR10DataModule, FashionMNISTDataModule
    from datamodules.base import DataError

    assert CIFAR10DataModule().threat_models == [{"norm": "L2", "eps": 0.5}, {"norm": "Linf", "eps": 8 / 255}]
    assert FashionMNISTDataModule(threat_models=[{"norm": "Linf", "eps": 0.1}]).threat_models == [{"norm": "Linf", "eps": 0.1}]
    for bad, message in (([{"norm": "L3", "eps": 1.0}], "norm must be one of"), ([{"norm": "L2", "eps": -1}], "eps must be"),
                         ([{"norm": "L2"}], "entries are")):
        with pytest.raises(DataError, match=message) as err:
            CIFAR10DataModule(threat_models=bad)
        assert "\n" not in str(err.value)
