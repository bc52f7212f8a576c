"""robustx.compiled: the engine step as one compiled graph (input gradient alone, or with the update rule), and the fallbacks."""

import pytest
import torch
import torch.nn.functional as F

import robustx.compiled as rc
from robustx.utils import frozen_parameters
from robustx.attacks import engine_attack
from robustx.models import PreActResNet


def _net():
    torch.manual_seed(0)
    return PreActResNet(depth=8, widths=(4, 8, 8), num_classes=10, activation="hhrelu", zero_init_residual=False).eval()


def _eager(model, x, y):
    x = x.clone().requires_grad_(True)
    logits = model(x)
    (g,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x)
    return logits.detach(), g


@pytest.mark.slow
def test_compiled_input_grad_equals_autograd_and_engine_result():
    """Logits and d sum CE / dx equal eager autograd's (fp32, rounding only); the engine gives the same images."""
    model = _net()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(6, 3, 32, 32, generator=g), torch.randint(10, (6,), generator=g)
    ref_logits, ref_grad = _eager(model, x, y)
    with frozen_parameters(model):
        fn = rc.compiled_input_grad(model)
        logits, grad = fn(x, y)
        fused = engine_attack(model, x, y, eps=0.1, steps=5, criterion="l2", targeted=True, overshoot=5, grad_fn=fn)
    assert not logits.requires_grad and not grad.requires_grad
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6 * float(ref_grad.abs().max()))
    plain = engine_attack(model, x, y, eps=0.1, steps=5, criterion="l2", targeted=True, overshoot=5)
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-5)
    assert all(p.requires_grad for p in model.parameters())


def test_compiled_input_grad_falls_back_with_one_warning(monkeypatch, caplog):
    """A model dynamo cannot trace under torch.func.grad: one warning line, then the forward-only path, same values."""
    from torch._dynamo.exc import Unsupported

    def broken(model, x, labels):
        raise Unsupported("graph break inside torch.func.grad")

    model = _net()
    monkeypatch.setattr(rc, "_COMPILED_GRAD", {"cpu": broken})
    monkeypatch.setattr(rc, "_GRAD_UNAVAILABLE", False)
    monkeypatch.setattr(rc, "_UNAVAILABLE", True)  # and no compiler at all: the fallback runs eagerly
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(3, 3, 32, 32, generator=g), torch.randint(10, (3,), generator=g)
    fn = rc.compiled_input_grad(model)
    with caplog.at_level("WARNING", logger="robustx.compiled"):
        first = fn(x, y)
        second = fn(x, y)
    ref = _eager(model, x, y)
    for got in (first, second):
        torch.testing.assert_close(got[0], ref[0])
        torch.testing.assert_close(got[1], ref[1])
    warnings = [r for r in caplog.records if "one graph failed" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()


@pytest.mark.slow
def test_compiled_engine_step_equals_the_eager_engine():
    """The whole step as one graph: the engine's images and its on_step values equal the eager engine's.

    Covers the explanations' rule (l2, targeted, overshoot 5), the search-like rule (l2min,
    momentum, clip), a second batch shape through the same step function (its guards are then
    checked again, not skipped) and a callable criterion (compiled input gradient + eager rule).
    """
    model = _net()
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(6, 3, 32, 32, generator=g), torch.randint(10, (6,), generator=g)
    settings = [
        dict(eps=0.1, steps=6, criterion="l2", targeted=True, overshoot=5),
        dict(eps=0.5, steps=6, criterion="l2min", momentum=0.9, clip=True),
        dict(eps=0.5, steps=4, criterion=lambda logits, labels, delta: logits.argmax(1) == labels),
    ]
    with frozen_parameters(model):
        for kw in settings:
            step = rc.compiled_engine_step(model)
            for n in (6, 4):  # the same function, then another batch size
                seen, ref_seen = [], []
                got = engine_attack(model, x[:n], y[:n], step_fn=step, on_step=lambda t, lg, d: seen.append((lg, d.clone())), **kw)
                ref = engine_attack(model, x[:n], y[:n], on_step=lambda t, lg, d: ref_seen.append((lg, d.clone())), **kw)
                torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
                assert len(seen) == len(ref_seen) == kw["steps"]
                for (lg, d), (rlg, rd) in zip(seen, ref_seen):
                    torch.testing.assert_close(lg, rlg, rtol=1e-4, atol=1e-4)
                    torch.testing.assert_close(d, rd, rtol=0, atol=1e-5)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.slow
def test_compiled_engine_step_serves_every_subset_size_with_one_graph():
    """engine_attack(skip_unused_gradients=True) through the compiled step: the following rows' subsets
    change size every step, dynamo compiles one graph for all of them, and the images equal the
    eager engine's that runs every row every step."""
    from torch._dynamo.utils import counters

    from robustx.attacks import rmse

    torch._dynamo.reset()
    counters.clear()
    model = _net()
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(6, 3, 32, 32, generator=g), torch.randint(10, (6,), generator=g)
    kw = dict(eps=0.1, steps=12, criterion="l2", targeted=True, overshoot=5)
    following, sizes = [], []
    with frozen_parameters(model):
        ref = engine_attack(model, x, y, on_step=lambda t, lg, d: following.append(int((rmse(d) < 0.1).sum())), **kw)
        step = rc.compiled_engine_step(model)
        got = engine_attack(model, x, y, step_fn=lambda *a, **k: sizes.append(a[0].size(0)) or step(*a, **k), skip_unused_gradients=True, **kw)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert sizes == [max(n, 2) for n in following if n > 0]
    assert len(set(sizes)) >= 3  # several subset sizes occurred
    assert counters["stats"]["unique_graphs"] == 1


def test_compiled_engine_step_falls_back_with_one_warning(monkeypatch, caplog):
    """A step that cannot be compiled: one warning line, then the input-gradient path and the eager rule, same images."""
    from torch._dynamo.exc import Unsupported

    def broken(*args, **kwargs):
        raise Unsupported("graph break in the engine step")

    model = _net()
    monkeypatch.setattr(rc, "_COMPILED_STEP", {"cpu": broken})
    monkeypatch.setattr(rc, "_STEP_UNAVAILABLE", False)
    monkeypatch.setattr(rc, "_GRAD_UNAVAILABLE", True)
    monkeypatch.setattr(rc, "_UNAVAILABLE", True)  # nothing compiles: all eager
    g = torch.Generator().manual_seed(4)
    x, y = torch.rand(3, 3, 32, 32, generator=g), torch.randint(10, (3,), generator=g)
    kw = dict(eps=0.1, steps=3, criterion="l2", targeted=True, overshoot=5)
    with caplog.at_level("WARNING", logger="robustx.compiled"):
        first = engine_attack(model, x, y, step_fn=rc.compiled_engine_step(model), **kw)
        second = engine_attack(model, x, y, step_fn=rc.compiled_engine_step(model), **kw)
    ref = engine_attack(model, x, y, **kw)
    torch.testing.assert_close(first, ref, rtol=0, atol=0)
    torch.testing.assert_close(second, ref, rtol=0, atol=0)
    warnings = [r for r in caplog.records if "engine step as one graph failed" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
