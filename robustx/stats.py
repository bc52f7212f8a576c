"""Percentile-bootstrap confidence intervals (resampling images), the one used by every summary."""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["bootstrap_ci"]


def bootstrap_ci(
    values: torch.Tensor,
    statistic: Callable[[torch.Tensor], torch.Tensor],
    *,
    samples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``statistic`` over per-image ``values``.

    Args:
        values: (N,) per-image values (float64 recommended).
        statistic: (S, N) resampled rows -> (S,) statistic of each row.
        samples: resamples S (>= 1).
        level: CI level in (0, 1).
        seed: seed of the resampling (a fixed seed makes the CI reproducible).
    Returns:
        (low, high) quantiles of the S statistics.
    """
    g = torch.Generator().manual_seed(seed)
    n = values.numel()
    idx = torch.randint(n, (samples, n), generator=g)  # (S, N) resampled image indices
    stats = statistic(values[idx])
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    return float(stats.quantile(lo)), float(stats.quantile(hi))
