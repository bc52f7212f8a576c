"""Percentile-bootstrap confidence intervals (resampling images), the one used by every summary."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["bootstrap_ci", "nan_list", "summarize_values"]


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


def summarize_values(values: Sequence[float] | Tensor, *, bootstrap: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Mean, median, quartiles and a percentile-bootstrap CI of the mean of one metric; NaNs are left out.

    Args:
        values: (N,) per-image values (NaN = undefined for that image).
        bootstrap: resamples for the CI (0: no CI, NaN bounds).
        level: CI level.
        seed: bootstrap seed.
    Returns:
        {"mean", "median", "q25", "q75", "ci_low", "ci_high", "n", "n_undefined"}.
    """
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    ok = ~torch.isnan(v)
    v, undefined = v[ok], int((~ok).sum())
    nan = math.nan
    if v.numel() == 0:
        return {"mean": nan, "median": nan, "q25": nan, "q75": nan, "ci_low": nan, "ci_high": nan, "n": 0, "n_undefined": undefined}
    lo = hi = nan
    if bootstrap > 0:
        lo, hi = bootstrap_ci(v, lambda rows: rows.mean(1), samples=bootstrap, level=level, seed=seed)
    return {
        "mean": float(v.mean()), "median": float(v.median()), "q25": float(v.quantile(0.25)), "q75": float(v.quantile(0.75)),
        "ci_low": lo, "ci_high": hi, "n": int(v.numel()), "n_undefined": undefined,
    }


def nan_list(t: Tensor) -> list[float | None]:
    """Tensor -> JSON-able list with None for NaN."""
    return [None if math.isnan(x) else float(x) for x in t.double().cpu().tolist()]
