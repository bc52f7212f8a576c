"""Fused second-order kernels for the penalty's double backprop (exact; not in the paper).

The penalty's parameter gradient (paper, Methods, "Lipschitz-inspired penalty") differentiates
the input gradient once more. On a CPU autograd's second derivatives, not the convolutions'
arithmetic, were then the main cost of a bf16 resnet44 robust step (BENCHMARKS.md): BatchNorm's
double backward ran as some forty separate elementwise and reduction kernels per layer (~40% of
the step), the half-Huber ReLU's as seven more, and a convolution's got its weight term from a
convolution whose kernel is the whole feature map (~15%). Here each is written out analytically:
BatchNorm's and the activation's compiled with ``torch.compile`` into one or two fused kernels,
the convolution's from ``conv(v, W)`` and the weight-gradient kernel. The arithmetic is the same
derivative (tests/unit/test_double_backprop.py compares it with autograd's to float64 rounding).

:func:`use_fused_double_backprop` switches a model over in place (``method.penalty_impl=
double_backprop_fused``): ``nn.BatchNorm2d`` -> :class:`FusedBatchNorm2d`, ``nn.Conv2d`` ->
:class:`FusedConv2d` (same parameters, buffers and state_dict) and half-Huber ReLUs get compiled
kernels.

BatchNorm in training mode, per channel over the M = N*H*W elements:
``xh = (x - mean) * r`` with ``r = 1/sqrt(var + eps)``, ``y = w * xh + b``; its input gradient is
``gx = w * r * P(a)`` for the output gradient ``a``, with the projection
``P(u) = u - mean(u) - xh * mean(u * xh)``. For an upstream gradient ``v`` of ``gx``:

* d/da:  ``w * r * P(v)``
* d/dw:  ``r * Q`` with ``Q = sum(v * P(a))``
* d/dx:  ``-w * r^2 * (Q/M * xh + mean(a * xh) * P(v) + mean(v * xh) * P(a))``

plus, for upstream gradients ``vw``, ``vb`` of the weight and bias gradients (``sum(a * xh)``,
``sum(a)``): ``vw * xh + vb`` to a and ``vw * r * P(a)`` to x.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import Tensor, nn

from robustx.compiled import _compile_errors
from robustx.utils import one_line
from robustx.layers import HHRELU_KERNELS, HalfHuberReLU

__all__ = ["bn_double_backward", "FusedBatchNorm2d", "FusedConv2d", "use_fused_double_backprop"]

log = logging.getLogger(__name__)


def bn_double_backward(
    x: Tensor,
    a: Tensor,
    v: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    vw: Tensor | None,
    vb: Tensor | None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of BatchNorm's training-mode backward w.r.t. (x, a, weight) (module docstring).

    Computed in float32 at least (float64 stays float64); the caller casts back.

    Args:
        x: (N, C, *) the BatchNorm input.
        a: (N, C, *) the output gradient its backward received.
        v: (N, C, *) upstream gradient of the input gradient, or None.
        mean, invstd: (C,) the batch statistics saved by the forward.
        weight: (C,) or None (affine=False).
        vw, vb: (C,) upstream gradients of the weight and bias gradients, or None.
    Returns:
        (d/dx (N, C, *), d/da (N, C, *), d/dweight (C,)); None where nothing flows.
    """
    ct = torch.promote_types(x.dtype, torch.float32)
    shape = (1, -1) + (1,) * (x.dim() - 2)  # per-channel values broadcast over (N, C, *)
    dims = [0, *range(2, x.dim())]
    m = x.numel() // x.size(1)
    r = invstd.to(ct).view(shape)
    xh = (x.to(ct) - mean.to(ct).view(shape)) * r
    af = a.to(ct)
    a_xh = (af * xh).mean(dims, keepdim=True)
    pa = af - af.mean(dims, keepdim=True) - xh * a_xh  # P(a)
    w = weight.to(ct).view(shape) if weight is not None else None
    gx = ga = gw = None
    if v is not None:
        vf = v.to(ct)
        v_xh = (vf * xh).mean(dims, keepdim=True)
        pv = vf - vf.mean(dims, keepdim=True) - xh * v_xh  # P(v)
        q = (vf * pa).sum(dims, keepdim=True)
        wr = r if w is None else w * r
        ga = wr * pv
        gx = -(wr * r) * (q * (1.0 / m) * xh + a_xh * pv + v_xh * pa)
        gw = (r * q).flatten() if weight is not None else None
    if vw is not None:
        vw_ = vw.to(ct).view(shape)
        ga = vw_ * xh if ga is None else ga + vw_ * xh
        gx = vw_ * r * pa if gx is None else gx + vw_ * r * pa
    if vb is not None:
        vb_ = vb.to(ct).view(shape)
        ga = vb_ + torch.zeros_like(af) if ga is None else ga + vb_
    return gx, ga, gw


class _Kernel:
    """A second-order kernel, compiled once per process on first use (eager where that fails).

    Picklable (it holds a module-level function and a flag), so a model carrying it can be
    copied to spawned processes.
    """

    _compiled: dict[Callable, Callable] = {}
    _unavailable = False

    def __init__(self, fn: Callable, compile: bool) -> None:
        self.fn, self.compile = fn, compile

    def __call__(self, *args):
        cls = type(self)
        if not self.compile or cls._unavailable:
            return self.fn(*args)
        compiled = cls._compiled.get(self.fn)
        if compiled is None:
            # dynamic=None: the first shape compiles static, later shapes one dynamic kernel.
            compiled = cls._compiled[self.fn] = torch.compile(self.fn, fullgraph=True)
        try:
            # Each layer shape, dtype and memory layout may compile once: allow them all.
            with torch._dynamo.config.patch(recompile_limit=64):
                return compiled(*args)
        except _compile_errors() as err:
            cls._unavailable = True
            log.warning("torch.compile is unavailable here (%s); fused double-backprop kernels run eagerly.", one_line(err, limit=300))
            return self.fn(*args)


class _BatchNormBackward(torch.autograd.Function):
    """BatchNorm's training-mode backward as a function of (a, x, weight), differentiable once."""

    @staticmethod
    def forward(ctx, a, x, weight, mean, invstd, eps: float, kernel):
        ctx.set_materialize_grads(False)  # unused outputs (weight/bias gradients) send None, not zeros
        ctx.save_for_backward(x, a, weight, mean, invstd)
        ctx.kernel = kernel
        affine = weight is not None
        return torch.ops.aten.native_batch_norm_backward(a, x, weight, None, None, mean, invstd, True, eps, [True, affine, affine])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, v, vw, vb):
        x, a, weight, mean, invstd = ctx.saved_tensors
        gx, ga, gw = ctx.kernel(x, a, v, mean, invstd, weight, vw, vb)

        def cast(t, like):
            return None if t is None or like is None else t.to(like.dtype)

        return cast(ga, a), cast(gx, x), cast(gw, weight), None, None, None, None


class _BatchNormTrain(torch.autograd.Function):
    """Training-mode BatchNorm (native kernels) whose backward is :class:`_BatchNormBackward`."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum: float, eps: float, kernel):
        out, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps, ctx.kernel = eps, kernel
        return out

    @staticmethod
    def backward(ctx, a):
        x, weight, mean, invstd = ctx.saved_tensors
        gx, gw, gb = _BatchNormBackward.apply(a, x, weight, mean, invstd, ctx.eps, ctx.kernel)
        return gx, gw, gb, None, None, None, None, None


class FusedBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training-mode double backward runs the fused kernel.

    Same parameters, buffers, state_dict and first-order arithmetic (the native kernels);
    eval mode and no-grad calls are ``nn.BatchNorm2d``'s own. Made by
    :func:`use_fused_double_backprop`, which sets ``second_order`` (compiled or eager).
    """

    second_order: Callable = _Kernel(bn_double_backward, True)

    def forward(self, x: Tensor) -> Tensor:
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        if not bn_training or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return super().forward(x)
        self._check_input_dim(x)
        # Running-statistics bookkeeping exactly as nn.BatchNorm2d.forward does it.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        track = not self.training or self.track_running_stats
        return _BatchNormTrain.apply(
            x, self.weight, self.bias, self.running_mean if track else None, self.running_var if track else None,
            factor, self.eps, self.second_order,
        )


def _engine_needs(t: Tensor) -> bool:
    """Will the running backward pass deliver a gradient to ``t`` (False: skip computing it)?"""
    try:
        from torch.autograd.graph import _get_grad_fn_or_grad_acc

        return bool(torch._C._will_engine_execute_node(_get_grad_fn_or_grad_acc(t)))
    except (AttributeError, ImportError, RuntimeError):  # private API moved, or not inside a backward
        return True


class _ConvInputGrad(torch.autograd.Function):
    """A convolution's input gradient as a function of (output gradient, weight), differentiable once.

    Autograd's own second derivative of a convolution gets the weight term from a convolution
    whose kernel is the whole feature map (batch and channels swapped), which oneDNN runs about
    5x slower than the weight-gradient kernel used here for the same numbers.
    """

    @staticmethod
    def forward(ctx, grad_out, x, weight, args):
        ctx.save_for_backward(grad_out, weight)
        ctx.args = args
        stride, padding, dilation, groups = args
        return torch.ops.aten.convolution_backward(
            grad_out, x, weight, None, stride, padding, dilation, False, [0, 0], groups, [True, False, False]
        )[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, v):
        grad_out, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.args
        if v is None:
            return None, None, None, None
        g_out = g_w = None
        if ctx.needs_input_grad[0]:  # d<v, conv^T(grad_out; W)>/d grad_out = conv(v; W)
            g_out = torch.ops.aten.convolution(v, weight, None, stride, padding, dilation, False, [0, 0], groups)
        if ctx.needs_input_grad[2]:  # ... and d/dW: the weight gradient of conv(v; W) for grad_out
            g_w = torch.ops.aten.convolution_backward(
                grad_out, v, weight, None, stride, padding, dilation, False, [0, 0], groups, [False, True, False]
            )[1]
        return g_out, None, g_w, None


class _ConvTrain(torch.autograd.Function):
    """``conv2d`` whose input gradient is :class:`_ConvInputGrad` (same kernels to first order)."""

    @staticmethod
    def forward(ctx, x, weight, bias, args):
        stride, padding, dilation, groups = args
        ctx.save_for_backward(x, weight)
        ctx.args, ctx.has_bias = args, bias is not None
        return torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, False, [0, 0], groups)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.args
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        # The penalty's pass asks autograd.grad for the input gradient only: skip the weight's.
        need_w = need_w and _engine_needs(weight)
        gx = _ConvInputGrad.apply(grad_out, x, weight, ctx.args) if need_x else None
        gw = gb = None
        if need_w or (need_b and ctx.has_bias):
            _, gw, gb = torch.ops.aten.convolution_backward(
                grad_out, x, weight, [weight.size(0)] if ctx.has_bias else None, stride, padding, dilation, False, [0, 0],
                groups, [False, need_w, need_b and ctx.has_bias],
            )
        return gx, gw, gb, None


class FusedConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose second derivative (double backprop) uses the weight-gradient kernel.

    Same parameters, state_dict and first-order arithmetic; only training-mode calls with
    gradients on take the custom path (zero padding only; other padding modes stay native).
    Under autocast the inputs are cast as autocast would cast them.
    """

    def forward(self, x: Tensor) -> Tensor:
        native = not (self.training and torch.is_grad_enabled()) or torch.compiler.is_compiling()
        if native or self.padding_mode != "zeros" or isinstance(self.padding, str):  # "same"/"valid" stay native too
            return super().forward(x)
        weight, bias = self.weight, self.bias
        kind = x.device.type
        if torch.is_autocast_enabled(kind):
            # Autocast's rule for convolutions: floating inputs other than float64 go to its dtype.
            dtype = torch.get_autocast_dtype(kind)
            x, weight = (t.to(dtype) if t.dtype != torch.float64 else t for t in (x, weight))
            bias = bias if bias is None or bias.dtype == torch.float64 else bias.to(dtype)
        with torch.autocast(kind, enabled=False):
            return _ConvTrain.apply(x, weight, bias, (list(self.stride), list(self.padding), list(self.dilation), self.groups))


def use_fused_double_backprop(model: nn.Module, *, compile: bool | None = None) -> nn.Module:
    """Give ``model`` the fused second-order kernels, in place, and return it.

    Every ``nn.BatchNorm2d`` (exactly that class: subclasses such as SyncBatchNorm are left
    alone) becomes a :class:`FusedBatchNorm2d`, every ``nn.Conv2d`` a :class:`FusedConv2d`, and
    every :class:`~robustx.layers.HalfHuberReLU` gets compiled kernels (value, gradient, second
    derivative). Parameters, buffers and state_dict keys do not change, so checkpoints and exports are
    unaffected. Calling it again is cheap and converts only what is new.

    Args:
        model: any nn.Module.
        compile: compile the kernels with ``torch.compile`` (the first training steps compile,
            about 10-30 s on a CPU); False runs them eagerly (for debugging: on a CPU that is no
            faster than autograd's own double backward). None: True for layers converted now,
            unchanged for layers converted before.
    """
    for m in model.modules():
        if type(m) is nn.Conv2d:
            m.__class__ = FusedConv2d
        elif type(m) is nn.BatchNorm2d or (type(m) is FusedBatchNorm2d and compile is not None):
            m.__class__ = FusedBatchNorm2d
            m.second_order = _Kernel(bn_double_backward, True if compile is None else compile)
        elif isinstance(m, HalfHuberReLU) and (compile is not None or m.kernels is HHRELU_KERNELS):
            m.kernels = tuple(_Kernel(fn, True if compile is None else compile) for fn in HHRELU_KERNELS)
    return model
