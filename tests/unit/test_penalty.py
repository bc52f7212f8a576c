import math

import pytest
import torch
from torch import nn

from robustx.training.penalty import input_gradient_penalty, select_outputs


class Linear(nn.Module):
    def __init__(self, w, b):
        super().__init__()
        self.w = nn.Parameter(w)  # (C, D)
        self.b = nn.Parameter(b)

    def forward(self, x):
        return x.flatten(1) @ self.w.T + self.b  # (B, C)


def test_penalty_equals_analytic_value_on_linear_model():
    torch.manual_seed(0)
    c, d = 4, 12
    w, b = torch.randn(c, d, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
    model = Linear(w, b)
    x = torch.rand(6, 1, 3, 4, dtype=torch.float64)
    y = torch.randint(c, (6,))
    for z in (1.0, 2.0, 3.0):
        for zeta in (0.0, 0.5, 1.0):
            gen = torch.Generator().manual_seed(5)
            _, pen = input_gradient_penalty(model, x, y, z=z, zeta=zeta, generator=gen)
            # Replay the same random choices to build ds/dx by hand: a weight row, or w_y - w_j*.
            gen = torch.Generator().manual_seed(5)
            pick = torch.randint(c, (6,), generator=gen)
            tandem = torch.rand(6, generator=gen) < zeta if zeta > 0 else torch.zeros(6, dtype=torch.bool)
            logits = model(x).detach()
            rows = []
            for i in range(6):
                if tandem[i]:
                    others = logits[i].clone()
                    others[y[i]] = -math.inf
                    rows.append(w[y[i]] - w[others.argmax()])
                else:
                    rows.append(w[pick[i]])
            grads = torch.stack(rows)  # (B, D)
            expected = grads.abs().pow(z).mean()
            torch.testing.assert_close(pen, expected)


def test_penalty_is_differentiable_wrt_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.rand(4, 1, 2, 4, dtype=torch.float64)
    y = torch.randint(3, (4,))
    _, pen = input_gradient_penalty(model, x, y, zeta=0.0, generator=torch.Generator().manual_seed(1))
    pen.backward()
    # The output bias cannot change an input gradient; every weight must receive a gradient.
    for name, p in model.named_parameters():
        has_grad = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert has_grad == (name != "3.bias"), name

    names = [n for n, _ in model.named_parameters()]

    def pen_of(*params):
        state = dict(zip(names, params))
        f = lambda inp: torch.func.functional_call(model, state, (inp,))
        return input_gradient_penalty(f, x, y, zeta=0.3, generator=torch.Generator().manual_seed(1))[1]

    params = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())
    assert torch.autograd.gradcheck(pen_of, params)


def test_tandem_selection_frequency():
    gen = torch.Generator().manual_seed(0)
    n, c = 40000, 10
    logits = torch.randn(n, c) * 0 + torch.arange(c, dtype=torch.float32) * 10  # distinct values
    labels = torch.full((n,), 3)
    s = select_outputs(logits, labels, zeta=0.2, generator=gen)
    margin = 30.0 - 90.0
    frac_tandem = (s == margin).float().mean().item()
    assert abs(frac_tandem - 0.2) < 0.01
    fair = s[s != margin]
    counts = torch.bincount((fair / 10).long(), minlength=c).float() / fair.numel()
    assert torch.allclose(counts, torch.full((c,), 0.1), atol=0.01)


def test_bad_values():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    x, y = torch.rand(2, 1, 2, 2), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="z must be > 0"):
        input_gradient_penalty(model, x, y, z=0)
    with pytest.raises(ValueError, match="zeta must be in"):
        input_gradient_penalty(model, x, y, zeta=1.5)


def _param_grad(loss, params):
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, params)])


@pytest.mark.parametrize("z", [2.0, 3.0])
def test_finite_difference_gradient_matches_double_backprop(z):
    """The option's surrogate has (almost) the exact penalty gradient on a smooth (HHReLU) network, in float64."""
    from robustx.layers import HalfHuberReLU
    from robustx.training.penalty import finite_difference_penalty

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), HalfHuberReLU(), nn.Flatten(), nn.Linear(6 * 16, 5)
    ).double().train()
    x = torch.rand(8, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(5, (8,))
    params = list(model.parameters())
    _, exact_pen = input_gradient_penalty(model, x, y, z=z, zeta=0.5, generator=torch.Generator().manual_seed(3))
    exact = _param_grad(exact_pen, params)
    _, pen, sur = finite_difference_penalty(model, x, y, z=z, zeta=0.5, h=1e-6, generator=torch.Generator().manual_seed(3))
    approx = _param_grad(sur, params)
    assert pen.item() == pytest.approx(exact_pen.item(), rel=1e-10)  # the reported value is exact
    assert torch.nn.functional.cosine_similarity(exact, approx, 0) > 0.9999
    assert (approx.norm() / exact.norm()).item() == pytest.approx(1.0, abs=1e-3)


def test_finite_difference_probe_leaves_batchnorm_statistics_alone():
    """Only the real forward updates running statistics, as with double backprop."""
    from robustx.training.penalty import finite_difference_penalty

    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 16, 4)).train()  # noqa: E731
    a = make()
    b = make()
    b.load_state_dict(a.state_dict())
    x, y = torch.rand(5, 1, 6, 6), torch.randint(4, (5,))
    input_gradient_penalty(a, x, y)
    finite_difference_penalty(b, x, y)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), ka
    assert b[1].momentum == a[1].momentum


def test_penalty_impl_options_are_validated():
    from robustx.training.loss import MethodConfig

    with pytest.raises(ValueError, match="penalty_impl"):
        MethodConfig(penalty_impl="bogus")
    with pytest.raises(ValueError, match="fd_h"):
        MethodConfig(fd_h=0.0)
