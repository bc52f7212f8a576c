"""Fused second-order kernels (robustx.training.double_backprop): the same gradients as autograd's own."""

import copy
import pickle

import pytest
import torch
from torch import nn

from robustx.training.double_backprop import FusedBatchNorm2d, FusedConv2d, _Kernel, bn_double_backward, use_fused_double_backprop
from robustx.layers import HalfHuberReLU
from robustx.models import PreActResNet, SmallCNN
from robustx.training.loss import MethodConfig, training_loss


def _penalty_grads(layer: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """d/d(x, weight, bias) of |d sum(sin(layer(x))) / dx|^2: a penalty-shaped second-order quantity."""
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(layer(x).sin().sum(), x, create_graph=True)
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    return list(torch.autograd.grad(g.pow(2).sum(), [x, *params], allow_unused=True))


def _assert_same_second_order(native: nn.Module, fused_type: type, x: torch.Tensor, channels_last: bool) -> nn.Module:
    """A fused copy of ``native`` gives autograd's penalty-shaped second-order gradients (float64)."""
    fused = use_fused_double_backprop(copy.deepcopy(native), compile=False)
    assert type(fused) is fused_type
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for a, b in zip(_penalty_grads(native, x), _penalty_grads(fused, x)):
        if a is None:
            assert b is None or b.abs().max() == 0
            continue
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    return fused


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batchnorm_second_order_matches_autograd_float64(affine, channels_last):
    torch.manual_seed(0)
    native = nn.BatchNorm2d(3, affine=affine).double()
    if affine:
        with torch.no_grad():
            native.weight.normal_()
            native.bias.normal_()
    fused = _assert_same_second_order(native, FusedBatchNorm2d, torch.randn(4, 3, 5, 6, dtype=torch.float64), channels_last)
    # The forward's running-statistics bookkeeping is nn.BatchNorm2d's.
    torch.testing.assert_close(fused.running_mean, native.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(fused.running_var, native.running_var, rtol=0, atol=0)
    assert int(fused.num_batches_tracked) == int(native.num_batches_tracked) == 1


def test_batchnorm_gradgradcheck_and_momentum_none():
    torch.manual_seed(1)
    bn = use_fused_double_backprop(nn.BatchNorm2d(2, momentum=None).double(), compile=False)
    with torch.no_grad():
        bn.weight.normal_()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(bn, (x,))
    assert torch.autograd.gradgradcheck(bn, (x,))
    # momentum=None: a cumulative average of the batch statistics, as nn.BatchNorm2d keeps it.
    ref, fused = nn.BatchNorm2d(2, momentum=None).double(), use_fused_double_backprop(nn.BatchNorm2d(2, momentum=None).double())
    for scale in (1.0, 3.0, 0.5):
        ref(x * scale)
        fused(x * scale)
    torch.testing.assert_close(fused.running_var, ref.running_var, rtol=0, atol=0)
    torch.testing.assert_close(fused.running_mean, ref.running_mean, rtol=0, atol=0)


def test_weight_and_bias_gradient_paths_of_the_backward():
    """Upstream gradients of BN's weight/bias gradients (unused by the penalty) are handled too."""
    torch.manual_seed(2)
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    a = torch.randn_like(x)
    w = torch.randn(3, dtype=torch.float64)
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    invstd = (var + 1e-5).rsqrt()
    v, vw, vb = torch.randn_like(x), torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)

    xs, as_, ws = (t.clone().requires_grad_(True) for t in (x, a, w))
    bias = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    y = torch.nn.functional.batch_norm(xs, None, None, ws, bias, True, 0.1, 1e-5)
    gi, gw, gb = torch.autograd.grad(y, [xs, ws, bias], as_, create_graph=True)
    expected = torch.autograd.grad((gi * v).sum() + (gw * vw).sum() + (gb * vb).sum(), [xs, as_, ws])
    gx, ga, gwt = bn_double_backward(x, a, v, mean, invstd, w, vw, vb)
    for got, want in zip((gx, ga, gwt), expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def _model_grads(model: nn.Module, x, y, impl: str) -> list[torch.Tensor]:
    method = MethodConfig.from_dict({"name": "robust", "activation": "hhrelu", "penalty": True, "penalty_impl": impl})
    out = training_loss(model, x, y, method, method.make_psi(), generator=torch.Generator().manual_seed(5))
    return [g for g in torch.autograd.grad(out.loss, list(model.parameters()))]


def test_whole_network_fused_equals_double_backprop_float64_compiled():
    """A pre-activation ResNet with HHReLU: compiled fused kernels give autograd's parameter gradients."""
    torch.manual_seed(3)
    model = PreActResNet(depth=8, widths=(4, 8, 8), activation="hhrelu").double().train()
    fused = copy.deepcopy(model)
    x = torch.rand(6, 3, 12, 12, dtype=torch.float64)
    y = torch.randint(10, (6,))
    want = _model_grads(model, x, y, "double_backprop")
    got = _model_grads(fused, x, y, "double_backprop_fused")
    assert any(type(m) is FusedBatchNorm2d for m in fused.modules())
    assert not _Kernel._unavailable  # the kernels compiled (no eager fallback)
    assert all(all(isinstance(k, _Kernel) for k in m.kernels) for m in fused.modules() if isinstance(m, HalfHuberReLU))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)
    # Running statistics and every state_dict entry stay the same.
    assert fused.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[k], v, rtol=0, atol=0)


def test_bf16_autocast_gradient_close_to_native():
    torch.manual_seed(4)
    model = SmallCNN(activation="hhrelu").train()
    fused = use_fused_double_backprop(copy.deepcopy(model), compile=False)
    x, y = torch.rand(16, 1, 28, 28), torch.randint(10, (16,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = torch.cat([g.flatten() for g in _model_grads(model, x, y, "double_backprop")])
        got = torch.cat([g.flatten() for g in _model_grads(fused, x, y, "double_backprop")])
    cos = torch.nn.functional.cosine_similarity(got.float(), want.float(), dim=0)
    assert cos > 0.999, float(cos)


def test_fused_model_pickles_and_eval_mode_is_native():
    model = use_fused_double_backprop(SmallCNN(activation="hhrelu"))
    clone = pickle.loads(pickle.dumps(model))
    assert type(clone.features[1]) is FusedBatchNorm2d
    model.eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(clone.eval()(x), model(x))


@pytest.mark.parametrize("stride,groups,bias,channels_last", [(1, 1, False, False), (2, 1, True, True), (2, 2, True, False)])
def test_conv_second_order_matches_autograd_float64(stride, groups, bias, channels_last):
    torch.manual_seed(6)
    native = nn.Conv2d(4, 6, 3, stride=stride, padding=1, groups=groups, bias=bias).double()
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64)
    fused = _assert_same_second_order(native, FusedConv2d, x, channels_last)
    xr = x.clone().requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda t: fused(t).tanh(), (xr,))


def test_conv_under_autocast_is_natives_arithmetic():
    """First order, bf16 autocast: the same output and gradients as nn.Conv2d, bit for bit."""
    torch.manual_seed(7)
    native = nn.Conv2d(3, 8, 3, padding=1)
    fused = use_fused_double_backprop(copy.deepcopy(native))
    x = torch.rand(4, 3, 9, 9)
    outs = []
    for m in (native, fused):
        xr = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(xr)
        grads = torch.autograd.grad(y.float().square().sum(), [xr, m.weight, m.bias])
        outs.append((y, *grads))
    for a, b in zip(*outs):
        assert a.dtype == b.dtype
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_compiled_attack_in_train_mode_matches_eager():
    """method.adversarial.compile: the same L2,min attack (train-mode BatchNorm), parameters restored."""
    from robustx.training.loss import AdversarialConfig, make_adversarial

    torch.manual_seed(8)
    model = SmallCNN(activation="hhrelu").train()
    twin = copy.deepcopy(model)
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        y = copy.deepcopy(model)(x).argmax(1)  # correct to start with, so L2,min pushes every image
    cfg = AdversarialConfig(kind="l2min", eps=0.1, steps=7, half_and_half=True)
    eager = make_adversarial(model, x, y, cfg, generator=torch.Generator().manual_seed(1))
    compiled = make_adversarial(twin, x, y, AdversarialConfig(**{**cfg.__dict__, "compile": True}), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-4)
    assert (compiled != x).flatten(1).any(1).sum() >= 2  # half-and-half: about half of the 8 perturbed
    # Train-mode BatchNorm statistics moved the same way; parameters require grad again.
    torch.testing.assert_close(twin.features[1].running_mean, model.features[1].running_mean, rtol=1e-4, atol=1e-5)
    assert all(p.requires_grad for p in twin.parameters())
