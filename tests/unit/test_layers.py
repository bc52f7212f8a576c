import pytest
import torch
from torch import nn

from robustx.layers import HalfHuberReLU, half_huber_relu, make_activation, swap_activations
from robustx.models import TorchvisionClassifier


def test_half_huber_values():
    x = torch.tensor([-1.0, -0.1, 0.0, 0.1, 0.25, 0.5, 0.6, 2.0])
    d = 0.5
    expected = torch.tensor([0.0, 0.0, 0.0, 0.01 / 1.0, 0.0625 / 1.0, 0.25, 0.6 - 0.25, 2.0 - 0.25])
    torch.testing.assert_close(half_huber_relu(x, d), expected)


def test_half_huber_derivative_is_clamp_over_d():
    x = torch.linspace(-2, 2, 401, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(half_huber_relu(x, 0.5).sum(), x)
    torch.testing.assert_close(g, x.detach().clamp(0, 0.5) / 0.5)


def test_half_huber_gradcheck_first_and_second_order():
    # Avoid the kinks at 0 and d, where finite differences of f'' are not defined.
    x = torch.tensor([-0.7, -0.2, 0.1, 0.3, 0.45, 0.8, 1.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: half_huber_relu(t, 0.5), (x,))
    assert torch.autograd.gradgradcheck(lambda t: half_huber_relu(t, 0.5), (x,))


def test_double_backprop_through_module():
    act = HalfHuberReLU()
    w = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    x = torch.tensor([0.2, 0.4], dtype=torch.float64, requires_grad=True)
    y = act(w * x).sum()
    (gx,) = torch.autograd.grad(y, x, create_graph=True)
    # d/dw of sum(gx^2) where gx = w * clamp(w x, 0, d)/d = w^2 x / d in the bowl: 4 w^3 x^2 / d^2
    (gw,) = torch.autograd.grad(gx.pow(2).sum(), w)
    expected = sum(4 * 0.7**3 * xi**2 / 0.25 for xi in (0.2, 0.4))
    assert abs(gw.item() - expected) < 1e-9


def test_bad_width_and_name():
    import pytest

    with pytest.raises(ValueError, match="d must be > 0"):
        HalfHuberReLU(0.0)
    with pytest.raises(ValueError, match="Unknown activation"):
        make_activation("gelu2")


def test_swap_activations_everywhere():
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Sequential(nn.ReLU(), nn.Linear(3, 2)))
    swap_activations(net, "hhrelu")
    assert not any(isinstance(m, nn.ReLU) for m in net.modules())
    assert sum(isinstance(m, HalfHuberReLU) for m in net.modules()) == 2
    tv = TorchvisionClassifier(arch="resnet18", num_classes=4, activation="hhrelu")
    assert not any(isinstance(m, nn.ReLU) for m in tv.modules())
    assert tv(torch.rand(2, 3, 32, 32)).shape == (2, 4)


@pytest.mark.slow
def test_hhrelu_under_torch_compile_matches_eager():
    """Under torch.compile the module uses the composed expression; values and gradients agree."""
    from robustx.layers import HalfHuberReLU

    act = HalfHuberReLU(0.5)
    x = torch.linspace(-1, 2, 301, dtype=torch.float64)
    x[150] = 0.5  # the boundary d itself
    xe = x.clone().requires_grad_(True)
    xc = x.clone().requires_grad_(True)
    ye = act(xe)
    yc = torch.compile(act)(xc)
    assert torch.allclose(ye, yc, atol=1e-12)
    (ge,) = torch.autograd.grad(ye.sum(), xe)
    (gc,) = torch.autograd.grad(yc.sum(), xc)
    assert torch.allclose(ge, gc, atol=1e-12)
    assert torch.allclose(gc, x.clamp(0, 0.5) / 0.5, atol=1e-12)
