"""Map-comparison metrics for (B, H, W) attribution maps: Spearman rank correlation, top-region overlap and energy share.

The measures of the invalidation study (:mod:`robustx.explain.invalidation`) and the manipulation
attack (:mod:`robustx.explain.manipulation`); maps as returned by
:func:`robustx.explain.attribution.attribution_maps`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["check_frac", "spearman", "top_mask", "top_weights", "top_overlap", "energy_in_top"]


def _flat_pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    if a.shape != b.shape or a.dim() < 2:
        raise ValueError(f"maps must have the same (B, ...) shape with B first, got {tuple(a.shape)} and {tuple(b.shape)}.")
    return a.detach().flatten(1).double(), b.detach().flatten(1).double()


def check_frac(frac: float) -> None:
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"frac must be in (0, 1] (the share of pixels in the top region, e.g. 0.2), got {frac}.")


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of two maps per example -> (B,) float64 in [-1, 1].

    Uses ``torchmetrics.functional.spearman_corrcoef`` (tied values get their mean rank). A
    constant map has no ranking, so its correlation is undefined: NaN for that example.

    Args:
        a: (B, ...) maps (e.g. (B, H, W)); flattened per example.
        b: (B, ...) maps of the same shape.
    Returns:
        (B,) correlations (NaN where a or b is constant).
    """
    from torchmetrics.functional import spearman_corrcoef

    fa, fb = _flat_pair(a, b)
    if fa.size(0) == 0:
        return fa.new_zeros(0)
    if fa.size(1) < 2:
        raise ValueError(f"maps need at least 2 values per example for a rank correlation, got {fa.size(1)}.")
    rho = spearman_corrcoef(fa.T.contiguous(), fb.T.contiguous()).reshape(-1).double()  # (B,)
    constant = (fa.amax(1) == fa.amin(1)) | (fb.amax(1) == fb.amin(1))
    return rho.masked_fill(constant, math.nan)


def top_mask(m: Tensor, frac: float = 0.2) -> Tensor:
    """The top-``frac`` region of each map -> (B, ...) bool with k = max(1, round(frac * N)) True per example.

    Ties at the threshold are broken by ``torch.topk`` (by position); the metrics use
    :func:`top_weights`, which does not depend on how ties are broken.

    Args:
        m: (B, ...) maps, N values per example.
        frac: share of the values in the top region, in (0, 1].
    """
    check_frac(frac)
    flat = m.detach().flatten(1)
    k = max(1, round(frac * flat.size(1)))
    idx = flat.topk(k, dim=1).indices  # (B, k)
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)
    return mask.view(m.shape)


def top_weights(m: Tensor, frac: float = 0.2) -> Tensor:
    """Membership of each pixel in the top-``frac`` region, ties shared -> (B, N) float64 summing to k per example.

    Pixels above the k-th largest value weigh 1; the pixels tied with it share the remaining
    places equally (the probability of being picked when ties are broken at random). Sparse
    maps (Grad-CAM's or LIME's zeros) have large ties at the threshold: breaking them by
    position would put the same zero pixels in the top region of two unrelated maps and
    inflate their overlap.

    Args:
        m: (B, ...) maps, N values per example.
        frac: share of the values in the top region, in (0, 1].
    """
    check_frac(frac)
    flat = m.detach().flatten(1).double()  # (B, N)
    k = max(1, round(frac * flat.size(1)))
    kth = flat.topk(k, dim=1).values[:, -1:]  # (B, 1)
    above, tied = flat > kth, flat == kth
    share = (k - above.sum(1, keepdim=True)).double() / tied.sum(1, keepdim=True).double()  # (B, 1), in (0, 1]
    return above.double() + tied.double() * share


def top_overlap(a: Tensor, b: Tensor, frac: float = 0.2) -> Tensor:
    """Share of a's top-``frac`` pixels that are also among b's -> (B,) float64 in [0, 1].

    |top(a) ∩ top(b)| / k with both regions of size k = max(1, round(frac * N)), in
    expectation over random tie-breaking (:func:`top_weights`): identical maps without ties
    give 1, disjoint top regions 0, two independent random maps (or a constant map) about
    ``frac``.

    Args:
        a: (B, ...) maps.
        b: (B, ...) maps of the same shape.
        frac: share of pixels in each top region, in (0, 1].
    """
    fa, fb = _flat_pair(a, b)
    wa, wb = top_weights(fa, frac), top_weights(fb, frac)
    return (wa * wb).sum(1) / wa.sum(1)


def energy_in_top(delta: Tensor, m: Tensor, frac: float = 0.2) -> Tensor:
    """Share of a perturbation's energy sum_c delta^2 inside a map's top-``frac`` region -> (B,) float64.

    1: the perturbation lies entirely where the map points; ``frac``: spread evenly over the
    image; NaN for a zero perturbation. Ties at the region's threshold count with their
    :func:`top_weights` share.

    Args:
        delta: (B, C, H, W) perturbation.
        m: (B, H, W) map.
        frac: share of pixels in the top region, in (0, 1].
    """
    if delta.dim() != 4 or m.dim() != 3 or delta.shape[0] != m.shape[0] or delta.shape[2:] != m.shape[1:]:
        raise ValueError(f"need delta (B, C, H, W) and map (B, H, W) of matching B, H, W, got {tuple(delta.shape)} and {tuple(m.shape)}.")
    e = delta.detach().double().pow(2).sum(1).flatten(1)  # (B, H*W)
    inside = (e * top_weights(m, frac)).sum(1)
    total = e.sum(1)
    return torch.where(total > 0, inside / total.clamp(min=1e-300), torch.full_like(total, math.nan))
