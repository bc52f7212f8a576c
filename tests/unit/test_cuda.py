"""The core on a CUDA device gives what it gives on the CPU (skipped where no GPU is present).

CI has no GPU, so these run only where one is (the project's device checks:
``scripts/gpu_check.sh``). Each check runs one function on the CPU and on CUDA in float64 with
the same inputs and the same random draws, and compares the results, so a tensor left on the
wrong device, a CPU-only generator or a dtype lost on the way fails here rather than in a
user's GPU run.

``ROBUSTX_TEST_DEVICE=cpu`` runs the same checks CPU-against-CPU, which tests the checks
themselves on a machine without a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from robustx.training.adaptive import AdaptivePsi
from robustx.robustness.ara import minimal_perturbation, summarize
from robustx.attacks import engine_attack, pgd_l2, trades_adversary
from robustx.explain.adversarial import adversarial_explanations
from robustx.models import SmallCNN, resnet44
from robustx.training.penalty import finite_difference_penalty, input_gradient_penalty
from robustx.training.loss import MethodConfig, training_loss

_DEVICE = os.environ.get("ROBUSTX_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    _DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="needs a CUDA device"
)

CUDA = torch.device(_DEVICE)


@pytest.fixture(autouse=True)
def _exact_cuda_math():
    # TF32 would make CUDA float32 differ from the CPU; these checks are float64 anyway, but keep
    # any float32 path exact too.
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _cnn(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """The same float64 SmallCNN (eval mode) on the CPU and on the device under test."""
    torch.manual_seed(seed)
    cpu = SmallCNN(activation="hhrelu").double().eval()
    dev = SmallCNN(activation="hhrelu").double().eval()
    dev.load_state_dict(cpu.state_dict())
    return cpu, dev.to(CUDA)


def _batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g, dtype=torch.float64), torch.randint(10, (n,), generator=g)


def test_penalty_matches_cpu():
    cpu, gpu = _cnn()
    x, y = _batch()
    out_c, pen_c = input_gradient_penalty(cpu, x, y, generator=torch.Generator().manual_seed(3))
    out_g, pen_g = input_gradient_penalty(gpu, x.to(CUDA), y.to(CUDA), generator=torch.Generator().manual_seed(3))
    assert pen_g.device == x.to(CUDA).device
    torch.testing.assert_close(out_g.cpu(), out_c)
    torch.testing.assert_close(pen_g.cpu(), pen_c)
    assert pen_c > 0
    # double backprop: the parameter gradient of the penalty agrees too.
    (g_c,) = torch.autograd.grad(pen_c, cpu.features[0].weight)
    (g_g,) = torch.autograd.grad(pen_g, gpu.features[0].weight)
    assert g_c.abs().sum() > 0
    torch.testing.assert_close(g_g.cpu(), g_c)


def test_penalty_with_a_generator_on_the_device():
    _, gpu = _cnn()
    x, y = _batch()
    _, pen = input_gradient_penalty(gpu, x.to(CUDA), y.to(CUDA), generator=torch.Generator(device=CUDA).manual_seed(3))
    assert pen.device.type == CUDA.type and pen > 0


def test_finite_difference_penalty_runs_on_cuda():
    _, gpu = _cnn()
    x, y = _batch()
    gpu.train()
    _, pen, surrogate = finite_difference_penalty(gpu, x.to(CUDA), y.to(CUDA), generator=torch.Generator().manual_seed(3))
    assert pen.device.type == CUDA.type and torch.isfinite(pen).all() and pen > 0
    surrogate.backward()
    assert torch.isfinite(gpu.features[0].weight.grad).all()


def test_engine_attack_matches_cpu():
    cpu, gpu = _cnn()
    x, _ = _batch()
    with torch.no_grad():
        y = cpu(x).argmax(1)  # correctly classified, so L2,min perturbs them too
    for criterion, eps in (("l2", 0.01), ("l2min", 0.1)):
        adv_c = engine_attack(cpu, x, y, eps=eps, steps=7, criterion=criterion)
        adv_g = engine_attack(gpu, x.to(CUDA), y.to(CUDA), eps=eps, steps=7, criterion=criterion)
        assert adv_g.device.type == CUDA.type
        torch.testing.assert_close(adv_g.cpu(), adv_c)
        assert (adv_c - x).abs().max() > 0


def test_baseline_adversaries_run_on_cuda():
    _, gpu = _cnn()
    x, y = _batch()
    x, y = x.to(CUDA), y.to(CUDA)
    # A CPU generator drives a run on the device (draws moved after) and a device generator too.
    for gen in (torch.Generator().manual_seed(0), torch.Generator(device=CUDA).manual_seed(0), None):
        adv = pgd_l2(gpu, x, y, eps=0.02, steps=5, generator=gen)
        assert adv.device.type == CUDA.type and adv.shape == x.shape and (adv - x).abs().max() > 0
        adv = trades_adversary(gpu, x, eps=0.02, steps=5, generator=gen)
        assert adv.device.type == CUDA.type and adv.shape == x.shape and (adv - x).abs().max() > 0
    # Same CPU generator seed: the same random start as on the CPU.
    cpu, _ = _cnn()
    xc, yc = _batch()
    torch.testing.assert_close(
        pgd_l2(gpu, x, y, eps=0.02, steps=5, generator=torch.Generator().manual_seed(1)).cpu(),
        pgd_l2(cpu, xc, yc, eps=0.02, steps=5, generator=torch.Generator().manual_seed(1)),
    )


def test_minimal_perturbation_matches_cpu():
    cpu, gpu = _cnn()
    x, y = _batch(16)
    for mode in ("attack", "btr"):
        r_c = minimal_perturbation(cpu, x, y, mode=mode, steps=60, eps=2.0, momentum=0.9).r
        r_g = minimal_perturbation(gpu, x.to(CUDA), y.to(CUDA), mode=mode, steps=60, eps=2.0, momentum=0.9).r
        torch.testing.assert_close(r_g.cpu(), r_c)
        assert summarize(r_g.cpu(), 10, bootstrap=50)["ara"] == pytest.approx(summarize(r_c, 10, bootstrap=50)["ara"])


def test_minimal_perturbation_bf16_autocast_on_cuda_is_adversarial_in_fp32():
    torch.manual_seed(0)
    model = SmallCNN(activation="hhrelu").to(CUDA).eval()
    x, y = _batch(32)
    x, y = x.float().to(CUDA), y.to(CUDA)
    res = minimal_perturbation(model, x, y, mode="attack", steps=60, eps=2.0, momentum=0.9,
                               autocast_dtype=torch.bfloat16)
    assert res.r.device.type in (CUDA.type, "cpu") and torch.isfinite(res.r).all()
    assert (res.r >= 0).all()


def test_adversarial_explanations_match_cpu():
    cpu, gpu = _cnn()
    x, y = _batch(4)
    ae_c = adversarial_explanations(cpu, x, y, targets="all", rho=0.1, steps=10)
    ae_g = adversarial_explanations(gpu, x.to(CUDA), y.to(CUDA), targets="all", rho=0.1, steps=10)
    torch.testing.assert_close(ae_g.images.cpu(), ae_c.images)
    torch.testing.assert_close(ae_g.rmse.cpu(), ae_c.rmse)
    assert ae_c.rmse.max() > 0


def test_compiled_explanations_and_search_on_cuda_match_cpu_eager():
    """compile=True (explanations: the engine step as one compiled graph; the search: compiled forward) on the device."""
    cpu, gpu = _cnn()
    cpu, gpu = cpu.float(), gpu.float()
    x, y = _batch(4)
    x = x.float()
    ae_c = adversarial_explanations(cpu, x, y, targets=["true", "second"], rho=0.1, steps=10)
    ae_g = adversarial_explanations(gpu, x.to(CUDA), y.to(CUDA), targets=["true", "second"], rho=0.1, steps=10, compile=True)
    torch.testing.assert_close(ae_g.images.cpu(), ae_c.images, rtol=0, atol=1e-3)
    # Every pair every step (the subsets of the default change size each step: one dynamic-batch graph).
    ae_all = adversarial_explanations(gpu, x.to(CUDA), y.to(CUDA), targets=["true", "second"], rho=0.1, steps=10, compile=True,
                                      skip_unused_gradients=False)
    torch.testing.assert_close(ae_all.images.cpu(), ae_c.images, rtol=0, atol=1e-3)
    mp_c = minimal_perturbation(cpu, x, y, steps=20, eps=2.0)
    mp_g = minimal_perturbation(gpu, x.to(CUDA), y.to(CUDA), steps=20, eps=2.0, compile=True)
    torch.testing.assert_close(mp_g.r.cpu(), mp_c.r, rtol=1e-2, atol=1e-5)
    assert all(p.requires_grad for p in gpu.parameters())


def test_fused_double_backprop_matches_cpu_autograd():
    """method.penalty_impl=double_backprop_fused compiled on the device = CPU autograd (float64)."""
    torch.manual_seed(0)
    cpu = SmallCNN(activation="hhrelu").double().train()
    dev = SmallCNN(activation="hhrelu").double().train()
    dev.load_state_dict(cpu.state_dict())
    dev = dev.to(CUDA)
    x, y = _batch(8)
    grads = []
    for model, impl, xx, yy in ((cpu, "double_backprop", x, y), (dev, "double_backprop_fused", x.to(CUDA), y.to(CUDA))):
        cfg = MethodConfig.from_dict({"name": "robust", "activation": "hhrelu", "penalty": True, "penalty_impl": impl})
        out = training_loss(model, xx, yy, cfg, cfg.make_psi(), generator=torch.Generator().manual_seed(3))
        grads.append(torch.autograd.grad(out.loss, list(model.parameters())))
    for g_dev, g_cpu in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_dev.cpu(), g_cpu, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", ["robust", "all", "all_compiled_attack", "pgd", "trades"])
def test_training_loss_on_cuda(name):
    methods = {
        "robust": {"name": "robust", "activation": "hhrelu", "penalty": True},
        "all": {"name": "all", "activation": "hhrelu", "penalty": True,
                "adversarial": {"kind": "l2min", "eps": 0.1, "steps": 7, "half_and_half": True}},
        "all_compiled_attack": {"name": "all", "activation": "hhrelu", "penalty": True,
                                "adversarial": {"kind": "l2min", "eps": 0.1, "steps": 7, "half_and_half": True, "compile": True}},
        "pgd": {"name": "pgd", "adversarial": {"kind": "pgd", "eps": 0.02, "steps": 5}},
        "trades": {"name": "trades", "adversarial": {"kind": "trades", "eps": 0.02, "steps": 5}},
    }
    cfg = MethodConfig.from_dict(methods[name])
    torch.manual_seed(0)
    model = resnet44(activation=cfg.activation).to(CUDA).train()
    psi = cfg.make_psi()
    x = torch.rand(16, 3, 32, 32, device=CUDA)
    y = torch.randint(10, (16,), device=CUDA)
    with torch.autocast(CUDA.type, dtype=torch.bfloat16):
        out = training_loss(model, x, y, cfg, psi)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.device.type == CUDA.type and torch.isfinite(g).all() for g in grads)
    if isinstance(psi, AdaptivePsi):
        assert isinstance(psi.psi, float)


@pytest.mark.parametrize("method", ["ae", "gradcam", "integrated_gradients", "saliency", "smoothgrad"])
def test_attribution_maps_match_cpu(method):
    from robustx.explain.attribution import attribution_maps

    cpu, gpu = _cnn()
    x, _ = _batch(2)
    t = torch.tensor([3, 7])
    kw = {"ae_steps": 8, "ig_steps": 8, "smoothgrad_samples": 4}
    m_c = attribution_maps(cpu, x, t, method=method, **kw)
    m_g = attribution_maps(gpu, x.to(CUDA), t.to(CUDA), method=method, **kw)
    assert m_g.shape == (2, 28, 28) and m_c.abs().sum() > 0
    if method == "smoothgrad":
        # The noise is drawn on the device's own generator (seeded): same statistics, not the same draws.
        assert torch.isfinite(m_g).all() and m_g.abs().sum() > 0
    else:
        torch.testing.assert_close(m_g.cpu(), m_c, rtol=1e-5, atol=1e-6)


def test_lime_runs_on_cuda():
    from robustx.explain.attribution import attribution_maps

    _, gpu = _cnn()
    x, _ = _batch(1)
    m = attribution_maps(gpu, x.to(CUDA), torch.tensor([3], device=CUDA), method="lime", lime_samples=32, lime_segments=10)
    assert m.shape == (1, 28, 28) and torch.isfinite(m).all()
