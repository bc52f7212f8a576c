"""Adaptive psi: an integral controller on the training cross-entropy (paper, Methods, "Adaptive psi")."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["integrator_step", "AdaptivePsi"]


def integrator_step(
    integral: float,
    ce: float,
    *,
    l_target: float = 1.5,
    eps_better: float = 1.0,
    eps_worse: float = 0.01,
) -> float:
    """One controller update: I <- max(0, I + clip(-ln(L_CE / L_target), -eps_worse, +eps_better)).

    When the batch's cross-entropy is below the target (the network does better than asked),
    I grows by up to ``eps_better``; when above, it shrinks by at most ``eps_worse``.

    Args:
        integral: current I >= 0.
        ce: mean cross-entropy of the batch trained on (> 0).
        l_target: target cross-entropy L_target > 0.
        eps_better, eps_worse: clip bounds >= 0.
    """
    if not ce > 0 or not math.isfinite(ce):
        # ce == 0 would give +inf; treat it as "much better than the target".
        if ce == 0:
            return max(0.0, integral + eps_better)
        raise ValueError(f"cross-entropy fed to the psi controller must be finite and > 0, got {ce}.")
    e = -math.log(ce / l_target)
    return max(0.0, integral + min(eps_better, max(-eps_worse, e)))


@dataclass
class AdaptivePsi:
    """psi = psi0 * exp(k * I), with I driven by :func:`integrator_step`.

    Args:
        psi0: psi at I = 0 (paper: 220).
        k: gain (paper: 0.02).
        l_target: target training cross-entropy (paper: 1.5).
        eps_better, eps_worse: integrator clip bounds (paper: 1 and 0.01).
        adaptive: if False psi stays at psi0 (a fixed-strength penalty).
        integral: the controller state I (saved in checkpoints).
    """

    psi0: float = 220.0
    k: float = 0.02
    l_target: float = 1.5
    eps_better: float = 1.0
    eps_worse: float = 0.01
    adaptive: bool = True
    integral: float = 0.0

    def __post_init__(self) -> None:
        if self.psi0 < 0:
            raise ValueError(f"psi0 must be >= 0, got {self.psi0}.")
        if not self.l_target > 0:
            raise ValueError(f"l_target must be > 0, got {self.l_target}; the paper uses 1.5.")
        if self.eps_better < 0 or self.eps_worse < 0:
            raise ValueError("eps_better and eps_worse must be >= 0 (paper: 1 and 0.01).")

    @property
    def psi(self) -> float:
        """psi0 * exp(k I); ``inf`` once that overflows a float (the trainer then stops, naming the cause)."""
        if not self.adaptive:
            return self.psi0
        try:
            return self.psi0 * math.exp(self.k * self.integral)
        except OverflowError:
            return math.inf

    def update(self, ce: float) -> float:
        """Feed one batch's mean cross-entropy; return the psi to use for that batch (as the authors).

        A NaN/inf cross-entropy leaves the controller as it is: that batch's loss is not finite
        either, and the trainer stops or skips it (``on_nonfinite``) instead of learning from it.
        """
        if self.adaptive and math.isfinite(ce):
            self.integral = integrator_step(
                self.integral, ce, l_target=self.l_target, eps_better=self.eps_better, eps_worse=self.eps_worse
            )
        return self.psi

    def state_dict(self) -> dict[str, float]:
        return {"integral": float(self.integral)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.integral = float(state["integral"])
