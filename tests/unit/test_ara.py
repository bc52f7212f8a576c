"""ARA closed forms, minimal-perturbation search properties, the DDP-synced metric."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from robustx.robustness.ara import (
    ara_binned,
    ara_bootstrap_ci,
    ara_curve,
    ara_exact,
    evaluate_batch,
    minimal_perturbation,
    passes_criterion,
    robust_accuracy_at,
)
from robustx.robustness.metric import ARAMetric
from robustx.models import SmallCNN


def test_ara_closed_forms():
    for c in (2, 10, 100):
        for a in (0.01, 0.5):
            assert ara_exact(torch.full((37,), a), c) == pytest.approx((1 - 1 / c) * a)
    # r = [0, 0.1, 0.3], C = 2: A = 2/3 on [0, 0.1), 1/3 on [0.1, 0.3): only the first exceeds 1/2.
    assert ara_exact(torch.tensor([0.0, 0.1, 0.3]), 2) == pytest.approx(0.1 * (2 / 3 - 1 / 2))
    # C = 10: (2/3 - 0.1) * 0.1 + (1/3 - 0.1) * 0.2
    assert ara_exact(torch.tensor([0.3, 0.0, 0.1]), 10) == pytest.approx((2 / 3 - 0.1) * 0.1 + (1 / 3 - 0.1) * 0.2)
    assert ara_exact(torch.zeros(5), 10) == 0.0
    with pytest.raises(ValueError):
        ara_exact(torch.tensor([-0.1]), 10)


def test_binned_agrees_with_exact_and_ci_brackets():
    g = torch.Generator().manual_seed(0)
    r = torch.rand(1000, generator=g).pow(2) * 0.3
    exact, binned = ara_exact(r, 10), ara_binned(r, 10)
    assert abs(binned - exact) / exact < 0.005
    lo, hi = ara_bootstrap_ci(r, 10, samples=300)
    assert lo < exact < hi and hi - lo < 0.2 * exact


def test_curve_and_robust_accuracy():
    r = torch.tensor([0.0, 0.0, 0.1, 0.2, 0.2])
    radii, acc = ara_curve(r)
    assert radii.tolist() == pytest.approx([0.0, 0.1, 0.2])
    assert acc.tolist() == pytest.approx([0.6, 0.4, 0.0])
    assert robust_accuracy_at(r, 0.0) == pytest.approx(0.6)
    assert robust_accuracy_at(r, 0.15) == pytest.approx(0.4)


def _linear(d: int, c: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, c))


def _analytic_attack_rmse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """min_k (z_y - z_k) / ||w_y - w_k||, as an RMSE (unclipped)."""
    w = model[1].weight.detach()
    z = model(x).detach()
    d = x[0].numel()
    out = []
    for i in range(len(x)):
        out.append(min((z[i, y[i]] - z[i, k]) / (w[y[i]] - w[k]).norm() for k in range(z.size(1)) if k != y[i]))
    return torch.stack(out) / math.sqrt(d)


def test_paper_attack_matches_analytic_minimum_on_binary_linear_model():
    model = _linear(3 * 8 * 8, 2)
    x = torch.rand(48, 3, 8, 8)
    y = model(x).argmax(1)
    res = minimal_perturbation(model, x, y, mode="attack")  # the paper protocol: 450 steps, eps 20, momentum 0.9
    rel = res.r / _analytic_attack_rmse(model, x, y)
    assert res.found.all() and res.rechecked.all()
    assert (rel >= 1 - 1e-4).all() and (rel <= 1.02).all(), rel


def test_paper_attack_never_beats_the_true_minimum_on_multiclass_linear_model():
    # With C > 2 the CE gradient is not normal to the nearest decision boundary, so the paper's
    # search overestimates r_i (about 1.3x median here): the reason for the cross-check attack.
    model = _linear(3 * 8 * 8, 10)
    x = torch.rand(48, 3, 8, 8)
    y = model(x).argmax(1)
    res = minimal_perturbation(model, x, y, mode="attack")
    rel = res.r / _analytic_attack_rmse(model, x, y)
    assert (rel >= 1 - 1e-4).all()
    assert res.rechecked.all()


def test_fast_protocol_refinement_is_tight_and_only_shrinks_r():
    from robustx.robustness.ara import PROTOCOLS

    fast = PROTOCOLS["fast"]
    for c in (2, 10):
        model = _linear(3 * 8 * 8, c)
        x = torch.rand(48, 3, 8, 8)
        y = model(x).argmax(1)
        exact = _analytic_attack_rmse(model, x, y)
        coarse = minimal_perturbation(model, x, y, mode="attack", steps=fast["steps"], eps=fast["eps"], momentum=fast["momentum"])
        res = minimal_perturbation(model, x, y, mode="attack", **fast)
        assert res.found.all() and res.rechecked.all()  # refined examples still fail, in full precision
        assert (res.r <= coarse.r + 1e-7).all() and (res.r / exact >= 1 - 1e-4).all()
        if c == 2:  # one boundary: the bisection lands on it
            assert (res.r / exact <= 1.01).all()
    with pytest.raises(ValueError, match="refine"):
        minimal_perturbation(model, x, y, steps=2, refine=-1)


def _tiny_trained_cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = SmallCNN(channels=(8, 8, 8), hidden=16, mean=(0.5,), std=(0.25,))
    x = torch.rand(24, 1, 28, 28)
    y = torch.randint(10, (24,))
    return model.eval(), x, y


def test_eps_zero_is_clean_accuracy_and_examples_are_adversarial():
    model, x, y = _tiny_trained_cnn()
    y[:12] = model(x[:12]).argmax(1)  # half correct, half mostly wrong
    out = evaluate_batch(model, x, y, steps=40, eps=2.0, momentum=0.0)
    clean = (model(x).argmax(1) == y).double().mean().item()
    assert robust_accuracy_at(out["r_attack"], 0.0) == pytest.approx(clean)
    assert (out["r_attack"][~out["correct"]] == 0).all()
    assert (out["rechecked_attack"] == out["found_attack"]).all()
    assert (out["r_btr"] >= 0).all()


def test_bf16_search_reports_only_perturbations_that_fail_in_fp32():
    """A bf16 search stops short of the fp32 boundary on some images; those are stretched until they fail."""
    torch.manual_seed(1)
    model = SmallCNN(channels=(8, 8, 8), hidden=16, mean=(0.5,), std=(0.25,), activation="hhrelu").eval()
    x = torch.rand(48, 1, 28, 28)
    y = model(x).argmax(1)
    ref = minimal_perturbation(model, x, y, steps=60, eps=2.0, momentum=0.9)
    # (Before the stretch, 7 of these 45 bf16 perturbations passed the fp32 re-check.)
    res = minimal_perturbation(model, x, y, steps=60, eps=2.0, momentum=0.9, autocast_dtype=torch.bfloat16)
    assert res.found.float().mean() > 0.9 and torch.equal(res.rechecked, res.found)
    with torch.no_grad():
        logits = model(res.adversarial)
    assert (~passes_criterion(logits, y, "attack"))[res.found].all()
    both = res.found & ref.found
    assert ((res.r - ref.r).abs() / ref.r)[both].median() < 0.1  # stretching is small


class _AutocastBiased(nn.Module):
    """A linear classifier whose logits under autocast favour class 0 by ``shift`` (a stand-in for bf16 rounding)."""

    def __init__(self, shift: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(12, 3)
        self.shift = shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(x.flatten(1)).float()  # (B, 3)
        if torch.is_autocast_enabled(x.device.type):
            out = out + torch.tensor([self.shift, 0.0, 0.0])
        return out


def test_unperturbed_failure_is_decided_in_full_precision():
    """r = 0 only for images that fail in fp32: a reduced-precision clean pass does not decide it."""
    model = _AutocastBiased(shift=0.2).eval()
    x = torch.rand(64, 1, 3, 4)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    # Correct in fp32 but "misclassified" under autocast: class 0 within the shift of the top logit.
    near = (y != 0) & (logits.gather(1, y[:, None])[:, 0] - logits[:, 0] < 0.2)
    assert near.sum() >= 2
    res = minimal_perturbation(model, x, y, steps=40, eps=2.0, momentum=0.9, autocast_dtype=torch.bfloat16)
    assert (res.r[near] > 0).all()  # before the fix these got r = 0 with a failed re-check
    # Every r = 0 is an image that fp32 misclassifies unperturbed (none here: y is fp32's argmax).
    assert not (res.r == 0).any()


def test_results_independent_of_batch_size():
    model, x, y = _tiny_trained_cnn()
    y = model(x).argmax(1)
    full = minimal_perturbation(model, x, y, steps=30, eps=2.0, momentum=0.9).r
    parts = torch.cat([minimal_perturbation(model, x[i : i + 5], y[i : i + 5], steps=30, eps=2.0, momentum=0.9).r for i in range(0, 24, 5)])
    torch.testing.assert_close(full, parts, rtol=1e-4, atol=1e-6)


def test_images_failing_clean_skip_the_search_exactly():
    """r = 0 for images failing unperturbed, without a search step on them; the others as if searched alone."""
    model, x, y = _tiny_trained_cnn()
    y = model(x).argmax(1)
    y[::3] = (y[::3] + 1) % 10  # a third misclassified from the start
    wrong = torch.zeros(len(y), dtype=torch.bool)
    wrong[::3] = True
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args: seen.append(args[0].size(0)))
    try:
        res = minimal_perturbation(model, x, y, mode="attack", steps=30, eps=2.0, momentum=0.9)
    finally:
        hook.remove()
    # One full-precision clean pass and one re-check on all images; every search step on the rest.
    assert seen.count(len(y)) == 2 and seen.count(int((~wrong).sum())) >= 30
    assert (res.r[wrong] == 0).all() and res.found[wrong].all() and (res.first_fail_step[wrong] == 0).all()
    assert res.rechecked[wrong].all() and torch.equal(res.adversarial[wrong], x[wrong])
    alone = minimal_perturbation(model, x[~wrong], y[~wrong], mode="attack", steps=30, eps=2.0, momentum=0.9)
    torch.testing.assert_close(res.r[~wrong], alone.r, rtol=1e-4, atol=1e-6)
    assert torch.equal(res.first_fail_step[~wrong], alone.first_fail_step)
    # With no steps nothing is searched and nothing is found, as before.
    none = minimal_perturbation(model, x, y, mode="attack", steps=0)
    assert not none.found.any() and (none.first_fail_step == -1).all()


@pytest.mark.slow
def test_compiled_search_matches_eager_and_restores_parameters():
    """compile=True runs the same search: r_i equal up to fused-kernel rounding, params unfrozen after."""
    model, x, y = _tiny_trained_cnn()
    y = model(x).argmax(1)
    eager = minimal_perturbation(model, x, y, steps=30, eps=2.0, momentum=0.9)
    comp = minimal_perturbation(model, x, y, steps=30, eps=2.0, momentum=0.9, compile=True)
    assert torch.equal(comp.found, eager.found)
    torch.testing.assert_close(comp.r, eager.r, rtol=1e-3, atol=1e-6)
    assert all(p.requires_grad for p in model.parameters())


def _ddp_worker(rank: int, world: int, init_file: str, r_a, r_b, out_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    m = ARAMetric(10, bootstrap=200)
    ids = torch.arange(rank, len(r_a), world)
    m.update(r_a[ids], r_b[ids], ids)
    res = m.compute()
    values = {mode: m.values(mode) for mode in ("attack", "btr")}  # every rank: a collective
    if rank == 0:
        torch.save({**{k: torch.tensor(v) for k, v in res.items()}, **{f"values_{k}": v for k, v in values.items()}}, out_file)
    dist.destroy_process_group()


def test_metric_under_ddp_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(1)
    r_a, r_b = torch.rand(101, generator=g) * 0.1, torch.rand(101, generator=g) * 0.2
    out = tmp_path / "res.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), r_a, r_b, str(out)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    single = ARAMetric(10, bootstrap=200)
    single.update(r_a, r_b, torch.arange(101))
    ref = single.compute()
    for k, v in ref.items():
        assert float(ddp[k]) == pytest.approx(v, rel=1e-6), k
    # the r_i themselves (ara_*.json, the W&B curves): all 101, not rank 0's shard
    assert torch.equal(ddp["values_attack"], r_a.double()) and torch.equal(ddp["values_btr"], r_b.double())


def test_compile_unavailable_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    """No C++ compiler / Triton: compiled_forward logs once and runs the model eagerly."""
    import robustx.compiled as rc
    from torch._dynamo.exc import BackendCompilerFailed

    def broken(model, x):
        raise BackendCompilerFailed(lambda *a: None, RuntimeError("C++ compiler not found"), None)

    monkeypatch.setitem(rc._COMPILED_BY_KIND, False, broken)
    monkeypatch.setattr(rc, "_UNAVAILABLE", False)
    model, x, y = _tiny_trained_cnn()
    y = model(x).argmax(1)
    with caplog.at_level("WARNING", logger="robustx.compiled"):
        comp = minimal_perturbation(model, x, y, steps=10, eps=2.0, compile=True)
    eager = minimal_perturbation(model, x, y, steps=10, eps=2.0)
    torch.testing.assert_close(comp.r, eager.r)
    warnings = [r for r in caplog.records if "torch.compile is unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()


def test_repair_stretches_to_just_past_the_fp32_boundary():
    """stretch_to_fail: grid then bisection -> the smallest failing scale within 1/16 of its grid interval; others keep 1."""
    from robustx.robustness.ara import _REPAIR_BISECT, stretch_to_fail

    class Sum(nn.Module):  # logits (0, sum(x) - 1): class 0 until the pixel sum passes 1
        def forward(self, x):
            s = x.flatten(1).sum(1, keepdim=True)  # (B, 1)
            return torch.cat([torch.zeros_like(s), s - 1], 1)

    x = torch.zeros(4, 1, 2, 2)
    y = torch.zeros(4, dtype=torch.long)
    boundary = torch.tensor([1.0137, 0.5, 10.0, 1.0137], dtype=torch.float64)  # image 1 fails at 1, image 2 never
    delta = (1 / boundary).float().view(-1, 1, 1, 1).expand(-1, 1, 2, 2) / 4  # sum(s * delta) = s / boundary
    active = torch.tensor([True, True, True, False])
    scale = stretch_to_fail(Sum(), x, y, delta, active, mode="attack").double()
    assert scale[1] == 1.0 and scale[2] == 1.0 and scale[3] == 1.0
    assert 1.0137 < scale[0] <= 1.0137 + (1.02 - 1.01) / 2**_REPAIR_BISECT
