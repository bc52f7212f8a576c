"""The independent attacks (adv-lib) against the analytic minimum of a linear model."""

import math

import pytest
import torch
from torch import nn

from robustx.robustness.crosscheck import ensemble_r, independent_minimal_perturbation, masking_report


def _linear_case(seed=0, n=40, scale=20.0):
    torch.manual_seed(seed)
    d, c = 3 * 8 * 8, 10
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, c))
    with torch.no_grad():
        model[1].weight.mul_(scale)
    x = 0.3 + 0.4 * torch.rand(n, 3, 8, 8)  # inside the box: the analytic (unclipped) minimum is reachable
    z = model(x).detach()
    y = z.argmax(1)
    w = model[1].weight.detach()
    dist = torch.stack([min((z[i, y[i]] - z[i, k]) / (w[y[i]] - w[k]).norm() for k in range(c) if k != y[i]) for i in range(n)])
    return model, x, y, dist / math.sqrt(d)


@pytest.mark.parametrize("attack", ["alma", "fmn"])
def test_attack_never_below_analytic_minimum(attack):
    model, x, y, exact = _linear_case()
    r, adv = independent_minimal_perturbation(model, x, y, attack=attack, steps=300)
    ok = torch.isfinite(r)
    assert ok.float().mean() >= 0.8
    assert (r[ok] >= exact[ok] * (1 - 1e-3)).all()
    assert (model(adv[ok]).argmax(1) != y[ok]).all()  # reported examples are adversarial


def test_ensemble_reaches_analytic_minimum():
    model, x, y, exact = _linear_case()
    r_alma, _ = independent_minimal_perturbation(model, x, y, attack="alma", steps=1000)
    r_fmn, _ = independent_minimal_perturbation(model, x, y, attack="fmn", steps=1000)
    rel = ensemble_r(r_alma, r_fmn) / exact.double()
    assert rel.median() < 1.01
    assert (rel < 1.05).float().mean() >= 0.9


def test_masking_report():
    rp = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.0])
    ri = torch.tensor([0.1, 0.04, 0.09, 0.2, 0.0])
    rep = masking_report(rp, ri)
    assert rep["share_much_smaller"] == pytest.approx(0.2) and rep["warn"]
    assert not masking_report(rp, rp)["warn"]
    with pytest.raises(ValueError, match="Unknown cross-check attack"):
        independent_minimal_perturbation(nn.Linear(2, 2), torch.rand(1, 2), torch.tensor([0]), attack="cw")
