"""Activation layers: the half-Huber ReLU and a helper to swap activations in any module."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["half_huber_relu", "HHRELU_KERNELS", "HalfHuberReLU", "swap_activations", "make_activation"]


def hhrelu_value(x: torch.Tensor, d: float) -> torch.Tensor:
    """f(x) (see :func:`half_huber_relu`)."""
    c = x.clamp(0, d)
    # c^2/(2d) covers the bowl; relu(x - d) adds the linear part past d.
    return c.mul_(c).mul_(0.5 / d).add_(torch.relu(x - d))


def hhrelu_grad(x: torch.Tensor, grad_out: torch.Tensor, d: float) -> torch.Tensor:
    """grad_out * f'(x) with f'(x) = clamp(x, 0, d) / d."""
    return grad_out * x.clamp(0, d).mul_(1.0 / d)


def hhrelu_second_order(x: torch.Tensor, grad_out: torch.Tensor, gg: torch.Tensor, d: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of grad_in = grad_out * f'(x) w.r.t. (x, grad_out) for the upstream gradient gg.

    f'(x) = clamp(x, 0, d) / d and f''(x) = 1/d inside the quadratic bowl (0 < x < d), 0 elsewhere.
    All arguments have the same shape; d > 0.
    """
    slope = x.clamp(0, d) * (1.0 / d)
    bowl = ((x > 0) & (x < d)).to(gg.dtype) * (1.0 / d)
    return gg * grad_out * bowl, gg * slope


#: The half-Huber ReLU's three kernels (value, gradient, second-order step), in the order
#: :class:`HalfHuberReLU` keeps them; robustx.training.double_backprop swaps in compiled versions.
HHRELU_KERNELS = (hhrelu_value, hhrelu_grad, hhrelu_second_order)


class _HHReLUGrad(torch.autograd.Function):
    """grad_in = grad_out * clamp(x, 0, d) / d, itself differentiable once (for double backprop)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, grad_out: torch.Tensor, d: float, kernels) -> torch.Tensor:
        ctx.save_for_backward(x, grad_out)
        ctx.d, ctx.kernels = d, kernels
        return kernels[1](x, grad_out, d)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gg: torch.Tensor):
        x, grad_out = ctx.saved_tensors
        gx, ggrad = ctx.kernels[2](x, grad_out, gg, ctx.d)
        return gx, ggrad, None, None


class _HHReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, d: float, kernels) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.d, ctx.kernels = d, kernels
        return kernels[0](x, d)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        return _HHReLUGrad.apply(x, grad_out, ctx.d, ctx.kernels), None, None


def half_huber_relu(x: torch.Tensor, d: float | torch.Tensor = 0.5) -> torch.Tensor:
    """Half-Huber ReLU (paper, Methods "Half-Huber ReLU").

    f(x) = 0 for x < 0, x^2 / (2d) for 0 <= x <= d, x - d/2 for x > d, so that
    f'(x) = clamp(x, 0, d) / d is continuous and the input-gradient penalty has a
    non-zero second derivative to train through.

    A custom autograd.Function whose backward is itself differentiable, so double backprop
    (the penalty's training signal) costs a few fused elementwise kernels instead of the
    long chain autograd would record for the composed expression.

    Args:
        x: any shape, any float dtype.
        d: width of the quadratic region, > 0 (paper: 0.5).
    """
    return _HHReLU.apply(x, float(d), HHRELU_KERNELS)


class HalfHuberReLU(nn.Module):
    """Module form of :func:`half_huber_relu`; ``d`` is a buffer as in the authors' networks.

    ``kernels`` compute its value, gradient and second-order step (:data:`HHRELU_KERNELS`, or
    compiled versions set by :func:`robustx.training.double_backprop.use_fused_double_backprop`).
    """

    kernels: tuple[Callable, ...] = HHRELU_KERNELS

    def __init__(self, d: float = 0.5) -> None:
        super().__init__()
        if not d > 0:
            raise ValueError(f"HalfHuberReLU width d must be > 0, got {d}; use d=0.5 as in the paper.")
        self.register_buffer("d", torch.tensor(float(d)))
        self._d = float(d)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._d = float(self.d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # Under torch.compile the composed expression lets the compiler derive and fuse the
            # backward with the neighbouring BatchNorm; the custom Function would stay opaque.
            # (Double backprop through compiled graphs is not supported by torch.compile.)
            # (relu + where rather than clamp: compiled clamp passes no gradient at x == d.)
            d = self._d
            r = torch.relu(x)
            return torch.where(x > d, x - 0.5 * d, r * r * (0.5 / d))
        # Reading a CPU buffer is free; on accelerators use the cached value (no device sync).
        d = float(self.d) if self.d.device.type == "cpu" else self._d
        return _HHReLU.apply(x, d, self.kernels)

    def extra_repr(self) -> str:
        return f"d={float(self.d):g}"


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(),
    "hhrelu": lambda: HalfHuberReLU(0.5),
}


def make_activation(name: str) -> nn.Module:
    """Build an activation by name (``relu`` or ``hhrelu``)."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"Unknown activation '{name}'; choose one of {sorted(ACTIVATIONS)}."
        ) from None


def swap_activations(
    module: nn.Module,
    factory: Callable[[], nn.Module] | str = "hhrelu",
    *,
    types: tuple[type[nn.Module], ...] = (nn.ReLU,),
) -> nn.Module:
    """Replace every activation of the given types inside ``module`` (in place) and return it.

    Functional activations called inside ``forward`` (``F.relu``) cannot be found this way;
    torchvision's ResNets use modules, so they can be swapped.

    Args:
        module: any nn.Module.
        factory: a callable returning a fresh activation module, or a name for :func:`make_activation`.
        types: activation classes to replace.
    """
    make = (lambda: make_activation(factory)) if isinstance(factory, str) else factory
    for name, child in list(module.named_children()):
        if isinstance(child, types):
            setattr(module, name, make())
        else:
            swap_activations(child, make, types=types)
    return module
