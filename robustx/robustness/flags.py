"""Consistency and gradient-masking flags of an evaluation (after AutoAttack's checks and Carlini et al. 2019).

Each flag is ``{"raised": bool, "value": number, "message": str}``; an evaluation stores all of
them in its JSON and logs one line per raised flag. A raised flag does not stop the evaluation:
it says which of its numbers not to trust.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustx.utils import model_mode

__all__ = ["model_checks", "square_flag", "contradiction_flags", "raised_lines"]


def _flag(raised: bool, value: float, message: str) -> dict:
    return {"raised": bool(raised), "value": float(value), "message": message}


def model_checks(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, tol: float = 1e-5) -> dict[str, dict]:
    """Flags read from the model alone: randomness, softmax-like outputs, zero input gradients.

    Args:
        model: classifier on [0, 1] images (evaluated in eval mode; its mode is restored).
        images: (B, C, H, W) in [0, 1].
        labels: (B,) true classes.
        tol: tolerance of the randomness (relative) and probability-row checks.
    """
    x = images.detach().float()
    with model_mode(model, train=False):
        with torch.no_grad():
            a, b = model(x).float(), model(x).float()  # (B, num_classes) twice
        scale = a.abs().amax().clamp_min(1e-12)
        diff = float((a - b).abs().amax() / scale)
        rows = ((a.sum(1) - 1).abs() < tol).all() and float(a.min()) >= -tol and float(a.max()) <= 1 + tol
        xg = x.clone().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(xg).float(), labels, reduction="sum")
            (grad,) = torch.autograd.grad(loss, xg)
        zero = float((grad.flatten(1).abs().sum(1) == 0).double().mean())  # share of images, (B,) -> scalar
    return {
        "randomness": _flag(diff > tol, diff, f"outputs change between two identical forwards (max relative change {diff:.2g}): "
                            "a randomized model; fixed-radius and minimal-norm numbers need EOT attacks"),
        "softmax_outputs": _flag(bool(rows), float(bool(rows)), "the model outputs probabilities (rows in [0, 1] summing to 1), not logits: "
                                 "gradient attacks are weakened; evaluate the logits"),
        "zero_gradients": _flag(zero > 0, zero, f"{100 * zero:.1f}% of images have an exactly zero input gradient: "
                                "gradient-based attacks cannot move them (masking)"),
    }


def square_flag(robust_after: dict[str, int], *, num_images: int, alpha: float = 0.002) -> dict:
    """Square (black-box) lowered the robust accuracy left by the white-box attacks by more than ``alpha``."""
    if "square" not in robust_after or len(robust_after) < 2:
        return _flag(False, 0.0, "Square not run")
    before = min(v for k, v in robust_after.items() if k != "square")
    drop = (before - robust_after["square"]) / max(num_images, 1)
    return _flag(drop > alpha, drop, f"the black-box Square attack broke {100 * drop:.1f}% of images the white-box attacks "
                 "could not: their gradients mislead (masking); trust neither the white-box numbers nor the ARA")


def contradiction_flags(robust: torch.Tensor, correct: torch.Tensor, r_min: torch.Tensor, *, eps_rmse: float,
                        label: str, slack: float = 1e-4) -> dict[str, dict]:
    """Per-image disagreement between a fixed-radius verdict and the minimal-norm ensemble at that radius.

    Args:
        robust: (N,) bool, robust at the radius (fixed-radius attacks).
        correct: (N,) bool, classified correctly unperturbed.
        r_min: (N,) smallest perturbation found (RMSE; inf where none), from attacks that stay in
            the [0, 1] box like the fixed-radius ones.
        eps_rmse: the radius as RMSE (an L2 radius; for Linf only the first flag is sound).
        label: the threat model, for the messages (e.g. ``L2 0.5``).
        slack: relative tolerance at the radius.
    """
    r = torch.as_tensor(r_min, dtype=torch.float64)
    rob, cor = torch.as_tensor(robust, dtype=torch.bool), torch.as_tensor(correct, dtype=torch.bool)
    n = max(len(r), 1)
    within = cor & (r <= eps_rmse * (1 - slack))  # a perturbation inside the radius exists
    beyond = cor & (r > eps_rmse * (1 + slack))  # the minimal-norm attacks found none inside
    above = float((rob & within).double().sum() / n)
    below = float((~rob & beyond).double().sum() / n)
    return {
        "fixed_radius_above_minimal_norm": _flag(above > 0, above, f"{label}: {100 * above:.1f}% of images are called robust at the radius "
                                                 "although the minimal-norm ensemble found a smaller perturbation: the fixed-radius attacks are weak here"),
        "minimal_norm_above_fixed_radius": _flag(below > 0, below, f"{label}: the fixed-radius attacks broke {100 * below:.1f}% of images "
                                                 "for which the minimal-norm ensemble found nothing inside the radius: the ensemble's r_i are too large there"),
    }


def raised_lines(flags: dict[str, dict]) -> list[str]:
    """One line per raised flag, ``name: message``."""
    return [f"{k}: {v['message']}" for k, v in flags.items() if v.get("raised")]

