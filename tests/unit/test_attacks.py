import pytest
import torch
from torch import nn

from robustx.attacks import ce_input_grad, engine_attack, engine_update, pgd_l2, rmse, step_sizes, trades_adversary
from robustx.training.loss import AdversarialConfig, MethodConfig, make_adversarial, training_loss


def _linear(d=12, c=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, c))


def _mlp(seed=0):
    """Nonlinear, so the examples' gradients turn differently and their RMSEs part ways."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(4)
    return model


def test_step_sizes_fall_linearly_and_sum_to_eps():
    ss = step_sizes(0.1, 7)
    assert sum(ss) == pytest.approx(0.1)
    assert all(a > b for a, b in zip(ss, ss[1:]))
    assert ss[0] / ss[-1] == pytest.approx(7)
    assert sum(step_sizes(0.1, 35, overshoot=5)) == pytest.approx(0.5)


def test_l2_criterion_keeps_rmse_near_eps():
    model = _linear()
    x, y = torch.rand(16, 1, 3, 4), torch.randint(3, (16,))
    eps, steps = 0.05, 7
    adv = engine_attack(model, x, y, eps=eps, steps=steps, criterion="l2")
    r = rmse(adv - x)
    # Pull-back steps keep RMSE within one (first, largest) step of the budget.
    assert r.max() <= eps + step_sizes(eps, steps)[0] + 1e-6
    assert r.min() > 0.5 * eps


def test_engine_increases_loss_and_targeted_decreases_it():
    model = _linear()
    x, y = torch.rand(32, 1, 3, 4), torch.randint(3, (32,))
    ce = nn.functional.cross_entropy
    adv = engine_attack(model, x, y, eps=0.05, steps=7)
    assert ce(model(adv), y) > ce(model(x), y)
    adv_t = engine_attack(model, x, y, eps=0.05, steps=7, targeted=True)
    assert ce(model(adv_t), y) < ce(model(x), y)


def test_l2min_stops_pushing_once_misclassified():
    model = _linear()
    x = torch.rand(64, 1, 3, 4)
    y = model(x).argmax(1)  # all correct at the start
    adv = engine_attack(model, x, y, eps=5.0, steps=50, criterion="l2min")
    # With a large path budget every example crosses the boundary and is pulled back near it.
    flipped = (model(adv).argmax(1) != y).float().mean()
    assert flipped > 0.3
    z = model(x).detach()
    w = model[1].weight.detach()
    top2 = z.topk(2, dim=1)
    d_min = torch.stack([
        (z[i, y[i]] - z[i, k]) / (w[y[i]] - w[k]).norm() for i, k in enumerate(top2.indices[:, 1])
    ])
    # RMSE of the path's end stays within a small factor of the distance to the nearest boundary.
    assert (rmse(adv - x) < 3 * d_min / (12 ** 0.5) + 0.05).all()


def test_zero_budget_and_half_and_half():
    model = _linear()
    x, y = torch.rand(200, 1, 3, 4), torch.randint(3, (200,))
    assert torch.equal(engine_attack(model, x, y, eps=0.0, steps=7), x)
    assert torch.equal(engine_attack(model, x, y, eps=0.1, steps=0), x)
    cfg = AdversarialConfig(kind="l2", eps=0.05, steps=3, half_and_half=True)
    adv = make_adversarial(model, x, y, cfg, generator=torch.Generator().manual_seed(0))
    moved = (adv - x).flatten(1).abs().sum(1) > 0
    assert 0.35 < moved.float().mean() < 0.65


def test_pgd_and_trades_stay_in_ball_and_box():
    model = _linear()
    x, y = torch.rand(16, 1, 3, 4), torch.randint(3, (16,))
    for adv in (pgd_l2(model, x, y, eps=0.1, steps=5), trades_adversary(model, x, eps=0.1, steps=5)):
        assert (rmse(adv - x) <= 0.1 + 1e-5).all()
        assert adv.min() >= 0 and adv.max() <= 1
    ce = nn.functional.cross_entropy
    assert ce(model(pgd_l2(model, x, y, eps=0.1, steps=5, random_start=False)), y) > ce(model(x), y)


def test_bad_values():
    model = _linear()
    x, y = torch.rand(2, 1, 3, 4), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="eps must be >= 0"):
        engine_attack(model, x, y, eps=-1, steps=3)
    with pytest.raises(ValueError, match="Unknown attack criterion"):
        engine_attack(model, x, y, eps=0.1, steps=3, criterion="linf")
    with pytest.raises(ValueError, match="grad_fn or step_fn, not both"):
        engine_attack(model, x, y, eps=0.1, steps=3, grad_fn=lambda *a: None, step_fn=lambda *a, **k: None)
    with pytest.raises(ValueError, match="skip_unused_gradients needs criterion 'l2'"):
        engine_attack(model, x, y, eps=0.1, steps=3, criterion="l2min", skip_unused_gradients=True)
    with pytest.raises(ValueError, match="skip_unused_gradients needs criterion 'l2'"):
        engine_attack(model, x, y, eps=0.1, steps=3, on_step=lambda *a: None, skip_unused_gradients=True)
    with pytest.raises(ValueError, match="needs the model in eval mode"):
        engine_attack(model.train(), x, y, eps=0.1, steps=3, skip_unused_gradients=True)
    with pytest.raises(ValueError, match="Unknown adversarial kind"):
        MethodConfig.from_dict({"adversarial": {"kind": "fgsm"}})
    with pytest.raises(ValueError, match="Unknown method option"):
        MethodConfig.from_dict({"lambda": 3})
    with pytest.raises(ValueError, match="z must be > 0"):
        MethodConfig.from_dict({"z": 0})


def test_training_loss_feeds_reduced_ce_to_controller():
    model = _linear()
    x, y = torch.rand(8, 1, 3, 4), torch.randint(3, (8,))
    method = MethodConfig.from_dict({"penalty": True, "activation": "hhrelu"})
    psi = method.make_psi()
    out = training_loss(model, x, y, method, psi, reduce_mean=lambda t: torch.tensor(0.6))
    # The controller saw 0.6 (the "all-reduced" value), not the local CE.
    assert psi.integral == pytest.approx(-torch.log(torch.tensor(0.6 / 1.5)).item())
    assert out.psi == pytest.approx(psi.psi)
    assert out.loss.item() == pytest.approx(out.ce.item() + out.psi * out.penalty.item(), rel=1e-5)


@pytest.mark.parametrize(
    "kw",
    [
        dict(targeted=True, overshoot=5),  # the explanations' rule
        dict(momentum=0.7, clip=True, overshoot=3),
        dict(overshoot=4, affected=torch.tensor([True, False] * 4)),
    ],
)
def test_skip_unused_gradients_runs_only_following_rows_and_gives_the_same_images(kw):
    """skip_unused_gradients: the model sees exactly the (row, step) pairs with RMSE(delta) < eps; same images."""
    model = _mlp(seed=0).eval()
    g = torch.Generator().manual_seed(5)
    x, y = torch.rand(8, 1, 3, 4, generator=g), torch.randint(3, (8,), generator=g)
    eps, steps = 0.2, 20
    following = []  # per step: rows whose delta is inside the budget, from the full engine
    ref = engine_attack(model, x, y, eps=eps, steps=steps, on_step=lambda t, lg, d: following.append(int((rmse(d) < eps).sum())), **kw)
    assert len(set(following) - {0, 8}) >= 2  # rows part ways, or the test would prove nothing
    rows = []
    hook = model.register_forward_pre_hook(lambda m, inp: rows.append(inp[0].size(0)))
    got = engine_attack(model, x, y, eps=eps, steps=steps, skip_unused_gradients=True, **kw)
    hook.remove()
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    assert rows == [n for n in following if n > 0]


def test_skip_unused_gradients_gives_a_step_fn_no_single_row_batches():
    """With a step_fn, a lone following row runs as two copies (a compiled step would specialize batch size 1)."""
    model = _mlp(seed=0).eval()
    sizes = []

    def step_fn(x, d, m, y, ss, k, **rule):
        sizes.append(x.size(0))
        logits, grad = ce_input_grad(model, x + d, y)
        return (logits, *engine_update(x, d, m, logits, grad, y, ss, k, **rule))

    g = torch.Generator().manual_seed(6)
    x, y = torch.rand(5, 1, 3, 4, generator=g), torch.randint(3, (5,), generator=g)
    kw = dict(eps=0.2, steps=20, targeted=True, overshoot=5)
    following = []
    ref = engine_attack(model, x, y, on_step=lambda t, lg, d: following.append(int((rmse(d) < 0.2).sum())), **kw)
    assert 1 in following  # the case under test occurs
    got = engine_attack(model, x, y, step_fn=step_fn, skip_unused_gradients=True, **kw)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    assert sizes == [max(n, 2) for n in following if n > 0]


def test_losses_keep_float64_and_upcast_half_types():
    """A float64 model's training loss and attack gradient stay float64 (no rounding to float32);
    under bf16 autocast the cross-entropy is taken in float32."""
    model = _mlp(seed=0).double().eval()
    g = torch.Generator().manual_seed(7)
    x, y = torch.rand(6, 1, 3, 4, generator=g, dtype=torch.float64), torch.randint(3, (6,), generator=g)
    cfg = MethodConfig.from_dict({"name": "robust", "activation": "hhrelu", "penalty": True})
    out = training_loss(model, x, y, cfg, cfg.make_psi(), generator=torch.Generator().manual_seed(3))
    assert out.loss.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(out.ce.detach(), nn.functional.cross_entropy(model(x), y), rtol=1e-14, atol=0)
    logits, grad = ce_input_grad(model, x, y)
    assert grad.dtype == torch.float64
    xr = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(nn.functional.cross_entropy(model(xr), y, reduction="sum"), xr)
    torch.testing.assert_close(grad, ref, rtol=1e-12, atol=1e-15)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = _mlp(seed=0).eval()
        _, g16 = ce_input_grad(half, x.float(), y)
    assert g16.dtype == torch.float32
