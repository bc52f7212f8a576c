"""The Lipschitz-inspired input-gradient penalty (paper, Methods, "Lipschitz continuity")."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["select_outputs", "input_gradient_penalty"]


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
    b, c = logits.shape
    pick = torch.randint(c, (b,), device=logits.device, generator=generator)
    fair = logits.gather(1, pick[:, None])[:, 0]  # (B,)
    if zeta == 0:
        return fair
    true = logits.gather(1, labels[:, None])[:, 0]  # (B,)
    # Mask the true class out of the max without touching the graph of the others.
    others = logits.masked_fill(nn.functional.one_hot(labels, c).bool(), float("-inf"))
    margin = true - others.max(1).values
    tandem = torch.rand(b, device=logits.device, generator=generator) < zeta
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
    if grad.dtype in (torch.float16, torch.bfloat16):
        grad = grad.float()  # accumulate the mean in fp32 under mixed precision
    penalty = grad.pow(2).mean() if z == 2 else grad.abs().pow(z).mean()
    return logits, penalty
