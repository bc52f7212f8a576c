"""The Lipschitz-inspired input-gradient penalty (paper, Methods, "Lipschitz continuity")."""

from __future__ import annotations

import torch
from torch import nn

from robustx.utils import at_least_fp32, draw_device

__all__ = ["select_outputs", "input_gradient_penalty", "finite_difference_penalty", "PENALTY_IMPLS"]

#: ``double_backprop``: the paper's exact gradient of the penalty; ``double_backprop_fused``: the
#: same gradient with fused, compiled second-order kernels for BatchNorm and the half-Huber ReLU
#: (robustx.training.double_backprop); ``finite_difference``: an option that replaces the double backward
#: by one extra forward/backward (an approximation, see below).
PENALTY_IMPLS = ("double_backprop", "double_backprop_fused", "finite_difference")


def select_outputs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    zeta: float = 0.2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the scalar s per example whose input gradient is penalized.

    Per example, s is one logit chosen uniformly at random ("fair"), or, with probability
    ``zeta``, the margin logit_true - max_{j != true} logit_j ("tandem", L_adv,tandem).

    Args:
        logits: (B, C) network outputs.
        labels: (B,) true classes in [0, C).
        zeta: probability of the tandem margin, in [0, 1].
        generator: RNG for reproducible selection (on the logits' device).
    Returns:
        (B,) selected outputs, differentiable w.r.t. ``logits``.
    """
    if not 0.0 <= zeta <= 1.0:
        raise ValueError(f"zeta must be in [0, 1], got {zeta}; the paper uses 0.2.")
    return _apply_selection(logits, labels, _selection(logits, labels, zeta=zeta, generator=generator))


def _selection(logits: torch.Tensor, labels: torch.Tensor, *, zeta: float, generator: torch.Generator | None):
    """Draw which output each example penalizes: (pick (B,), tandem (B,) bool or None, runner-up (B,) or None)."""
    b, c = logits.shape
    on = draw_device(generator, logits.device)
    pick = torch.randint(c, (b,), device=on, generator=generator).to(logits.device)
    if zeta == 0:
        return pick, None, None
    # Mask the true class out of the max without touching the graph of the others.
    others = logits.detach().masked_fill(nn.functional.one_hot(labels, c).bool(), float("-inf"))
    runner_up = others.argmax(1)
    tandem = torch.rand(b, device=on, generator=generator).to(logits.device) < zeta
    return pick, tandem, runner_up


def _apply_selection(logits: torch.Tensor, labels: torch.Tensor, sel) -> torch.Tensor:
    """The selected outputs (B,) of ``logits`` for a selection from :func:`_selection`."""
    pick, tandem, runner_up = sel
    fair = logits.gather(1, pick[:, None])[:, 0]  # (B,)
    if tandem is None:
        return fair
    true = logits.gather(1, labels[:, None])[:, 0]  # (B,)
    margin = true - logits.gather(1, runner_up[:, None])[:, 0]
    return torch.where(tandem, margin, fair)


def input_gradient_penalty(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    z: float = 2.0,
    zeta: float = 0.2,
    create_graph: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward pass plus the penalty mean over batch and input elements of |ds/dx|^z.

    Implements L_adv of the paper: x in [0, 1] pixel space, s from :func:`select_outputs`.
    With ``create_graph=True`` the penalty is differentiable w.r.t. the parameters
    (double backprop), so ``(ce + psi * penalty).backward()`` trains through it.

    Args:
        model: maps (B, C_in, H, W) images in [0, 1] to (B, C) logits.
        images: (B, C_in, H, W) in [0, 1].
        labels: (B,) true classes.
        z: exponent > 0 (paper: 2).
        zeta: tandem probability in [0, 1] (paper: 0.2).
        create_graph: keep the graph for double backprop (training).
        generator: RNG for the output selection.
    Returns:
        (logits (B, C), penalty scalar).
    """
    if not z > 0:
        raise ValueError(f"penalty exponent z must be > 0, got {z}; the paper uses z=2.")
    x = images.detach().requires_grad_(True)
    logits = model(x)
    s = select_outputs(logits, labels, zeta=zeta, generator=generator)
    (grad,) = torch.autograd.grad(s.sum(), x, create_graph=create_graph)
    grad = at_least_fp32(grad)  # accumulate the mean in fp32 under mixed precision
    penalty = grad.pow(2).mean() if z == 2 else grad.abs().pow(z).mean()
    return logits, penalty


class _frozen_batchnorm_stats:
    """Context: BatchNorm layers keep normalizing with batch statistics but do not update their
    running statistics (the finite-difference probe is a second forward pass of the same batch)."""

    def __init__(self, model: nn.Module) -> None:
        self.bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        self.saved: list = []

    def __enter__(self) -> None:
        self.saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in self.bns]
        for m in self.bns:
            # momentum 0: running = 1 * running + 0 * batch, bit-exact unchanged.
            m.momentum = 0.0

    def __exit__(self, *exc: object) -> None:
        for m, (mom, nbt) in zip(self.bns, self.saved):
            m.momentum = mom
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)


def finite_difference_penalty(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    z: float = 2.0,
    zeta: float = 0.2,
    h: float = 5e-4,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The penalty of :func:`input_gradient_penalty` with its parameter gradient by finite differences.

    Not in the paper: an option that avoids double backprop. With g = dS/dx (S = sum of the
    selected outputs) and P = mean |g|^z, the parameter gradient is
    dP/dtheta = d/dtheta [v . g] with v = dP/dg = z |g|^(z-1) sign(g) / N held fixed, and
    v . g = d/de S(x + e v) at e = 0, so dP/dtheta ~ d/dtheta [(S(x + e v) - S(x)) / e]. One
    input-gradient pass (no graph), one extra forward at x + e v and the ordinary backward
    replace the double backward, whose BatchNorm and activation second derivatives dominate the
    robust step on CPUs. e is set so that RMSE(e v) = ``h`` over the batch. The probe forward
    runs with the same output selection and without updating BatchNorm running statistics.

    Args:
        model: maps (B, C_in, H, W) images in [0, 1] to (B, C) logits.
        images: (B, C_in, H, W) in [0, 1].
        labels: (B,) true classes.
        z: exponent > 0 (paper: 2).
        zeta: tandem probability in [0, 1] (paper: 0.2).
        h: probe size as an RMSE in [0, 1] pixel space (> 0).
        generator: RNG for the output selection.
    Returns:
        (logits (B, C) with graph, penalty value (detached scalar, exact), surrogate scalar whose
        parameter gradient approximates the penalty's).
    """
    if not z > 0:
        raise ValueError(f"penalty exponent z must be > 0, got {z}; the paper uses z=2.")
    if not h > 0:
        raise ValueError(f"finite-difference probe h must be > 0, got {h}; try 5e-4 (an RMSE in [0, 1] pixel space).")
    x = images.detach().requires_grad_(True)
    logits = model(x)
    sel = _selection(logits, labels, zeta=zeta, generator=generator)
    wide = torch.promote_types(images.dtype, torch.float32)  # fp32 under mixed precision, fp64 stays fp64
    s = _apply_selection(logits, labels, sel).to(wide)
    (grad,) = torch.autograd.grad(s.sum(), x, retain_graph=True)
    grad = grad.to(wide)
    n = grad.numel()
    with torch.no_grad():
        a = grad.abs()
        penalty = a.pow(2).mean() if z == 2 else a.pow(z).mean()
        v = (z * a.pow(z - 1) * grad.sign() / n) if z != 2 else (2.0 * grad / n)
        v_rmse = v.pow(2).mean().sqrt()
        if not torch.isfinite(v_rmse) or v_rmse == 0:
            return logits, penalty, torch.zeros((), device=images.device)
        e = h / v_rmse
        probe = (images.detach().to(wide) + e * v).to(images.dtype)
    with _frozen_batchnorm_stats(model):
        s_probe = _apply_selection(model(probe), labels, sel).to(wide)
    surrogate = (s_probe.sum() - s.sum()) / e
    return logits, penalty, surrogate
