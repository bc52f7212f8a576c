"""Accuracy-Robustness Area (ARA) and minimal adversarial perturbations (paper, Methods, "ARA").

For each image, r_i is the smallest perturbation RMSE (in [0, 1] pixel space) found such that the
criterion fails: ``attack`` (the prediction is no longer the true class) or ``btr`` (the
true class's softmax probability is <= 1/C, i.e. no better than random). A(r) is the fraction
of images with r_i > r, and ARA = integral over r >= 0 of max(0, A(r) - 1/C) dr.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from robustx.attacks import criterion_mask, engine_attack, rmse
from robustx.compiled import compiled_forward
from robustx.stats import bootstrap_ci
from robustx.utils import frozen_parameters

__all__ = [
    "ara_exact",
    "ara_binned",
    "ara_curve",
    "ara_bootstrap_ci",
    "robust_accuracy_at",
    "passes_criterion",
    "MinimalPerturbation",
    "minimal_perturbation",
    "stretch_to_fail",
    "PROTOCOLS",
    "PAPER",
    "summarize",
    "evaluate_batch",
]

log = logging.getLogger(__name__)

Mode = Literal["attack", "btr"]

#: Attack settings per protocol: "paper" is the authors' (T=450, path 20, momentum 0.9).
PROTOCOLS: dict[str, dict[str, float]] = {
    "paper": {"steps": 450, "eps": 20.0, "momentum": 0.9},
    "cheap": {"steps": 45, "eps": 2.0, "momentum": 0.0},
    # Not in the paper: 4x fewer gradient evaluations (T=112, a path of 2 instead of 20, which
    # is still ~20x the largest r_i of the reference networks), then a 10-step bisection of each
    # found perturbation along its own direction (forward passes only). Measured against the
    # paper protocol in BENCHMARKS.md.
    "fast": {"steps": 112, "eps": 2.0, "momentum": 0.9, "refine": 10},
}
PAPER = PROTOCOLS["paper"]  # the defaults of every search below, the callback and the study
_ENGINE_CRITERION = {"attack": "l2min", "btr": "btr"}  # ARA mode -> the engine's criterion


def _sorted(r: torch.Tensor) -> torch.Tensor:
    r = torch.as_tensor(r, dtype=torch.float64).flatten()
    if r.numel() == 0:
        raise ValueError("ARA needs at least one r_i.")
    if (r < 0).any() or torch.isnan(r).any():
        raise ValueError("r_i must be >= 0 and not NaN.")
    return r.sort().values


def ara_exact(r: torch.Tensor, num_classes: int) -> float:
    """Exact ARA from per-image minimal perturbations.

    A(r) is a step function: between consecutive sorted values r_(k) and r_(k+1) it equals
    (n - k) / n, so ARA = sum_k (r_(k+1) - r_(k)) * max(0, (n - k)/n - 1/C) with r_(0) = 0.

    Args:
        r: (N,) r_i >= 0.
        num_classes: C >= 2.
    """
    r = _sorted(r)
    n = r.numel()
    edges = torch.cat([r.new_zeros(1), r])  # (N + 1,)
    widths = edges[1:] - edges[:-1]  # width of [r_(k), r_(k+1)), k = 0..n-1
    heights = (n - torch.arange(n, dtype=torch.float64)) / n - 1.0 / num_classes  # A on those intervals
    return float((widths * heights.clamp(min=0)).sum())


def ara_binned(r: torch.Tensor, num_classes: int, *, bins: int = 1000) -> float:
    """The authors' binned ARA: a 1,000-bin histogram of r on [0, max r] (their calculate_ara)."""
    r = _sorted(r).float()
    n = r.numel()
    rmax = float(r.max())
    if rmax == 0:
        return 0.0
    hist = r.histc(bins, min=0, max=rmax)
    gap = rmax / bins
    return float(gap * (1 - hist.cumsum(0) / n).add_(-1.0 / num_classes).clamp_(min=0).sum())


def ara_curve(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The accuracy-robustness curve at its jump points: (radii (M,), A(radius) (M,)).

    A(x) = fraction of r_i > x is right-continuous and falls at each distinct r_i; radii
    start at 0 (A(0) is the clean accuracy for mode ``attack``).
    """
    r = _sorted(r)
    radii = torch.cat([r.new_zeros(1), r.unique()])  # (M,)
    radii = radii.unique()
    acc = (r.numel() - torch.searchsorted(r, radii, right=True)).double() / r.numel()
    return radii, acc


def ara_bootstrap_ci(
    r: torch.Tensor, num_classes: int, *, samples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of :func:`ara_exact` (resampling images)."""
    r = torch.as_tensor(r, dtype=torch.float64).flatten()
    return bootstrap_ci(r, lambda rows: torch.tensor([ara_exact(row, num_classes) for row in rows]),
                        samples=samples, level=level, seed=seed)


def robust_accuracy_at(r: torch.Tensor, eps: float) -> float:
    """Fraction of images whose minimal perturbation exceeds eps (eps = 0 gives clean accuracy)."""
    r = torch.as_tensor(r, dtype=torch.float64)
    return float((r > eps).double().mean())


def passes_criterion(logits: torch.Tensor, labels: torch.Tensor, mode: Mode) -> torch.Tensor:
    """(B,) bool: does each image still pass (correct for ``attack``, better than random for ``btr``)?

    The ARA names of the engine's criteria (:func:`robustx.attacks.criterion_mask`): ``attack``
    is ``l2min``, ``btr`` is ``btr``; half-precision logits are compared in fp32, float64 stays float64.
    """
    if mode not in _ENGINE_CRITERION:
        raise ValueError(f"Unknown ARA mode '{mode}'; choose 'attack' or 'btr'.")
    return criterion_mask(_ENGINE_CRITERION[mode], logits, labels, logits.new_zeros(()), eps=0.0)


@dataclass
class MinimalPerturbation:
    """Result of :func:`minimal_perturbation` for a batch."""

    r: torch.Tensor  # (B,) smallest RMSE found that fails the criterion (0 if failing clean)
    adversarial: torch.Tensor  # (B, C, H, W) images + best delta (the clean image where none was found)
    found: torch.Tensor  # (B,) bool: a failing perturbation was found
    first_fail_step: torch.Tensor  # (B,) step of the first failure (-1: never)
    rechecked: torch.Tensor  # (B,) bool: the reported perturbation fails the criterion in a fresh forward pass


def minimal_perturbation(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    mode: Mode = "attack",
    steps: int = int(PAPER["steps"]),
    eps: float = PAPER["eps"],
    momentum: float = PAPER["momentum"],
    clip: bool = False,
    autocast_dtype: torch.dtype | None = None,
    refine: int = 0,
    compile: bool = False,
    progress: Callable[[int], None] | None = None,
) -> MinimalPerturbation:
    """Search the smallest-RMSE perturbation that makes each image fail the criterion.

    The paper's protocol: the attack engine follows the CE gradient while the image still
    passes and pulls back along -delta once it fails, with falling step sizes summing to
    ``eps`` and momentum; the best (smallest RMSE) failing delta seen at any step is kept and
    re-checked by a forward pass. Images failing unperturbed have r = 0 and skip the search (the
    engine would keep their delta at 0). Images not found
    failing get r = the largest RMSE explored and ``found = False``. A found perturbation that
    does not fail in full precision (a bf16 or compiled search can stop a hair short of the fp32
    boundary) is stretched by the smallest of a few scales (1.0005 ... 3, then bisected) that makes it fail; whether
    an image fails unperturbed (r = 0) is always decided in full precision.

    Args:
        model: classifier on [0, 1] images, in eval mode.
        images: (B, C, H, W).
        labels: (B,) true classes.
        mode: ``attack`` or ``btr``.
        steps, eps, momentum: engine settings (paper: 450, 20, 0.9).
        clip: keep images + delta in [0, 1] (a valid-image threat model; off in the paper).
        autocast_dtype: run the search under autocast (e.g. torch.bfloat16, about 3x faster
            matrix work on CPUs with AVX-512 BF16); the re-check always runs in full precision.
        refine: bisection steps (>= 0; not in the paper) that shrink each found perturbation
            along its own direction to the criterion boundary, in full precision, with forward
            passes only.
        compile: run the search's passes through ``torch.compile`` (:mod:`robustx.compiled`;
            the first call per model and batch shape compiles). Re-check and bisection stay eager.
        progress: called after every engine step with the number of images searched in it (the
            image-steps done); images failing unperturbed are not searched and not reported.
    """
    from contextlib import nullcontext

    if refine < 0:
        raise ValueError(f"refine must be >= 0 bisection steps, got {refine}.")
    b = images.size(0)
    # r in the images' precision (a float64 search, as in gradcheck-style checks, keeps float64).
    best_r = torch.full((b,), math.inf, device=images.device, dtype=images.dtype)
    best_delta = torch.zeros_like(images)
    first = torch.full((b,), -1, dtype=torch.long, device=images.device)
    max_r = torch.zeros(b, device=images.device, dtype=images.dtype)

    # Full precision decides which images fail unperturbed (r = 0): a bf16 or compiled search can
    # see a clean image a hair across the boundary that fp32 classifies correctly.
    with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
        clean_fails = ~passes_criterion(model(images).float(), labels, mode)  # (B,)
    if steps > 0 and eps > 0:
        # The engine would pull such an image's delta back along -delta = 0 at every step, so it
        # stays 0 and r = 0 from step 0 on: the search skips it (exact, and it saves the
        # search's cost times the share of images failing clean, e.g. 30% on a 70%-accurate network).
        best_r[clean_fails] = 0
        first[clean_fails] = 0
    idx = (~clean_fails).nonzero()[:, 0]  # (A,) images the search runs on
    xa, ya = (images, labels) if idx.numel() == b else (images[idx], labels[idx])  # (A, C, H, W), (A,)
    # Local buffers of the searched images, written back after the search.
    best_ra, best_da = best_r[idx], best_delta[idx]  # (A,), (A, C, H, W)
    first_a, max_ra = first[idx], max_r[idx]  # (A,), (A,)

    def passes(logits: torch.Tensor, r: torch.Tensor) -> torch.Tensor:  # (A,) bool, r: (A,) RMSE of delta
        # Every searched image passes unperturbed (in full precision).
        return (r == 0) | passes_criterion(logits, ya, mode)

    def on_step(t: int, logits: torch.Tensor, delta: torch.Tensor) -> None:
        r = rmse(delta)
        fails = ~passes(logits, r)
        max_ra.copy_(torch.maximum(max_ra, r))
        better = fails & (r < best_ra)
        if better.any():
            best_ra[better] = r[better]
            best_da[better] = delta[better]
        first_a[(first_a < 0) & fails] = t
        if progress is not None:
            progress(int(r.numel()))

    crit = lambda logits, y, delta: passes(logits, rmse(delta))  # noqa: E731  (y is labels)
    ctx = torch.autocast(images.device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    net = compiled_forward(model) if compile else model
    if idx.numel() > 0:
        with ctx, (frozen_parameters(model) if compile else nullcontext()):
            engine_attack(net, xa, ya, eps=eps, steps=steps, criterion=crit, momentum=momentum, clip=clip, on_step=on_step)
        best_r[idx], best_delta[idx], first[idx], max_r[idx] = best_ra, best_da, first_a, max_ra
    found = torch.isfinite(best_r)

    def rescale(scale: torch.Tensor) -> None:  # scale: (B,)
        nonlocal best_delta, best_r
        best_delta = best_delta * scale.view(-1, 1, 1, 1).to(best_delta.dtype)
        best_r = torch.where(found, best_r * scale, best_r)

    # Everything after the search runs in full precision, even inside a caller's autocast.
    with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
        # A search in reduced precision (or compiled, fused arithmetic) can stop a hair short of
        # the full-precision boundary; stretch such perturbations until they fail in fp32 so that
        # every reported perturbation is adversarial for the model as it is (r grows <= 3x; rarely > 1.5x).
        rescale(stretch_to_fail(model, images, labels, best_delta, found & (best_r > 0), mode=mode))
        if refine > 0:
            rescale(_bisect(model, images, labels, best_delta, found & (best_r > 0), mode=mode, steps=refine))
        adversarial = images + best_delta
        rechecked = ~passes_criterion(model(adversarial).float(), labels, mode) & found
    r = torch.where(found, best_r, max_r)
    return MinimalPerturbation(r=r, adversarial=adversarial.detach(), found=found, first_fail_step=first, rechecked=rechecked)


#: Scales tried, in order, by :func:`stretch_to_fail` (1.0 is the plain full-precision re-check).
_REPAIR_SCALES = (1.0, 1.0005, 1.001, 1.002, 1.005, 1.01, 1.02, 1.05, 1.1, 1.2, 1.5, 2.0, 3.0)
#: Bisection steps of :func:`stretch_to_fail` between the last listed scale that passed and the first that failed.
_REPAIR_BISECT = 4


@torch.no_grad()
def stretch_to_fail(model: nn.Module, images, labels, delta, active, *, mode: Mode) -> torch.Tensor:
    """Per image the smallest scale >= 1 found with images + scale * delta failing in full precision -> (B,).

    The scales of :data:`_REPAIR_SCALES` are tried in order; where the first failing one is above
    1, :data:`_REPAIR_BISECT` bisection steps between it and the last passing one shrink it (the
    returned scale always failed a probe). Only the images still in question are forwarded.
    Images not ``active``, and those failing at no listed scale, keep 1 (the re-check then
    reports the latter).
    """
    scale = torch.ones(images.size(0), device=images.device)
    passed = torch.ones_like(scale)  # the largest probed scale that still passed

    def fails_at(idx: torch.Tensor, s: torch.Tensor) -> torch.Tensor:  # idx: (K,) indices, s: (K,) scales -> (K,) bool
        x = images[idx] + s.view(-1, 1, 1, 1).to(delta.dtype) * delta[idx]  # (K, C, H, W)
        return ~passes_criterion(model(x).float(), labels[idx], mode)

    pending = active.nonzero()[:, 0]  # (K,)
    for s in _REPAIR_SCALES:
        if pending.numel() == 0:
            break
        fails = fails_at(pending, torch.full((pending.numel(),), s, device=scale.device))
        scale[pending[fails]] = s
        passed[pending[~fails]] = s
        pending = pending[~fails]
    stretched = (active & (scale > passed)).nonzero()[:, 0]  # (K,) found above 1, with a passing scale below
    for _ in range(_REPAIR_BISECT if stretched.numel() else 0):
        mid = (passed[stretched] + scale[stretched]) / 2  # (K,)
        fails = fails_at(stretched, mid)
        scale[stretched] = torch.where(fails, mid, scale[stretched])
        passed[stretched] = torch.where(fails, passed[stretched], mid)
    return scale


@torch.no_grad()
def _bisect(model: nn.Module, images, labels, delta, active, *, mode: Mode, steps: int) -> torch.Tensor:
    """Per image the smallest scale a in (0, 1] found by bisection with images + a * delta failing -> (B,).

    Images not ``active`` keep a = 1. The invariant: ``hi`` fails the criterion (in full
    precision) once any probe has failed; if none did, a stays 1 and the re-check reports it.
    """
    hi = torch.ones(images.size(0), device=images.device)
    lo = torch.zeros_like(hi)
    for _ in range(steps):
        mid = (lo + hi) / 2
        fails = ~passes_criterion(model(images + mid.view(-1, 1, 1, 1) * delta).float(), labels, mode)  # (B,)
        hi = torch.where(fails & active, mid, hi)
        lo = torch.where(fails | ~active, lo, mid)
    return hi


def summarize(r: torch.Tensor, num_classes: int, *, bootstrap: int = 1000, seed: int = 0) -> dict[str, float]:
    """ARA (exact and binned), its bootstrap CI, median r and A(0) for one list of r_i."""
    r = torch.as_tensor(r, dtype=torch.float64).flatten()
    ara = ara_exact(r, num_classes)
    lo, hi = ara_bootstrap_ci(r, num_classes, samples=bootstrap, seed=seed) if bootstrap else (math.nan, math.nan)
    return {
        "ara": ara,
        "ara_binned": ara_binned(r, num_classes),
        "ara_ci_low": lo,
        "ara_ci_high": hi,
        "median_r": float(r.median()),
        "accuracy_at_0": robust_accuracy_at(r, 0.0),
        "n": int(r.numel()),
    }


def evaluate_batch(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    modes: tuple[str, ...] = ("attack", "btr"),
    steps: int = int(PAPER["steps"]),
    eps: float = PAPER["eps"],
    momentum: float = PAPER["momentum"],
    clip: bool = False,
    autocast_dtype: torch.dtype | None = None,
    refine: int = 0,
    compile: bool = False,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Minimal perturbations of one batch for each criterion -> {"r_attack", "found_attack", ...}.

    Also returns "correct" (clean prediction is right) and "rechecked_<mode>". ``progress(mode, n)``
    is called after every search step with the n images searched in it.
    """
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        out["correct"] = model(images).float().argmax(1) == labels
    with torch.enable_grad():
        for mode in modes:
            res = minimal_perturbation(
                model, images, labels, mode=mode, steps=steps, eps=eps, momentum=momentum, clip=clip, autocast_dtype=autocast_dtype,
                refine=refine, compile=compile, progress=None if progress is None else (lambda n, m=mode: progress(m, n)),
            )
            out[f"r_{mode}"] = res.r
            out[f"found_{mode}"] = res.found
            out[f"rechecked_{mode}"] = res.rechecked
            out[f"first_fail_step_{mode}"] = res.first_fail_step
    return out
