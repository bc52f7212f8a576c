"""Do attacks invalidate attribution maps? Map-comparison metrics, the invalidation study and a map-preserving attack.

Two measurements back the claim that classic attribution maps do not explain what an attack
did to a decision, while adversarial explanations (AEs, paper, Results, "Adversarial
explanations") do:

* :func:`invalidation_study`: for each correctly classified image, the smallest adversarial
  example of the paper's minimal-perturbation search (:func:`robustx.robustness.ara.minimal_perturbation`)
  flips the prediction. Each method's map of the NEW class on the perturbed image is compared
  with its map of the ORIGINAL class on the clean image (Spearman rank correlation, overlap of
  the top-``frac`` pixels) and the share of the perturbation's energy that falls inside the
  clean map's top region is measured. A map that barely changes while the decision flips, and
  whose important region does not contain the perturbation, does not explain the decision.
* :func:`manipulation_attack`: an attack that, inside an RMSE budget, flips the prediction
  while keeping the Grad-CAM map close to the clean one (through :func:`differentiable_gradcam`).

All maps are (B, H, W) non-negative importance maps as returned by
:func:`robustx.explain.attribution.attribution_maps`.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustx.robustness.ara import PAPER, minimal_perturbation
from robustx.stats import bootstrap_ci
from robustx.attacks import l2_ball_step, rmse

__all__ = [
    "spearman",
    "top_mask",
    "top_weights",
    "top_overlap",
    "energy_in_top",
    "summarize_values",
    "invalidation_study",
    "summarize_invalidation",
    "differentiable_gradcam",
    "manipulation_attack",
    "summarize_manipulation",
    "INVALIDATION_METRICS",
    "MANIPULATION_METRICS",
]

log = logging.getLogger(__name__)

#: Per-method metrics of :func:`invalidation_study` (see its docstring).
INVALIDATION_METRICS = ("spearman", "top_overlap", "energy_in_top", "spearman_orig_class", "top_overlap_orig_class",
                        "spearman_noise", "top_overlap_noise")


def _flat_pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    if a.shape != b.shape or a.dim() < 2:
        raise ValueError(f"maps must have the same (B, ...) shape with B first, got {tuple(a.shape)} and {tuple(b.shape)}.")
    return a.detach().flatten(1).double(), b.detach().flatten(1).double()


def _check_frac(frac: float) -> None:
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
    _check_frac(frac)
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
    _check_frac(frac)
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


def _nan_list(t: Tensor) -> list[float | None]:
    """Tensor -> JSON-able list with None for NaN."""
    return [None if math.isnan(x) else float(x) for x in t.double().cpu().tolist()]


def invalidation_study(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    methods: Sequence[str],
    attack_steps: int = int(PAPER["steps"]),
    attack_eps: float = PAPER["eps"],
    attack_momentum: float = PAPER["momentum"],
    attack_clip: bool = True,
    autocast_dtype: torch.dtype | None = None,
    frac: float = 0.2,
    map_options: Mapping[str, Any] | None = None,
    compare_original_class: bool = True,
    noise_control: bool = False,
    noise_seed: int = 0,
    ids: Sequence[int] | None = None,
    bootstrap: int = 1000,
    keep_tensors: bool = False,
    progress: Callable[[str], None] | None = None,
    search_progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Compare each method's maps before and after the smallest attack that flips the prediction.

    For every correctly classified image x (label y), the paper's minimal-perturbation search
    (mode ``attack``) returns the smallest adversarial example x' found, predicted y'. For each
    method, with M(image, class) its map:

    * ``spearman``, ``top_overlap``: M(x', y') against M(x, y): does the explanation of the new
      decision differ from that of the old one?
    * ``energy_in_top``: share of the energy of delta = x' - x inside the top-``frac`` region of
      M(x, y): does the clean map point where the attack changed the image? (``frac`` for a
      perturbation spread evenly.)
    * ``spearman_orig_class``, ``top_overlap_orig_class`` (with ``compare_original_class``):
      M(x', y) against M(x, y), the original class's map after the attack.
    * ``spearman_noise``, ``top_overlap_noise`` (with ``noise_control``): M(x + n, y) against
      M(x, y) for Gaussian noise n of the same RMSE as delta (clipped to [0, 1]): how much the
      map moves under a perturbation of that size that is not adversarial. The noise floor of
      the two similarity metrics: a map that changes as little after the attack as after noise
      has not registered the change of decision.

    Images misclassified clean are left out (no attack is needed). Images on which the search
    found no flip are recorded with ``changed = False`` and left out of the summary.

    Args:
        model: classifier on (B, C, H, W) images in [0, 1], in eval mode.
        images: (B, C, H, W) in [0, 1].
        labels: (B,) true classes.
        methods: names from :data:`robustx.explain.attribution.METHODS`.
        attack_steps, attack_eps, attack_momentum, attack_clip: minimal-perturbation search
            settings (paper: 450, 20, 0.9). ``attack_clip`` keeps x' in [0, 1] (default): the
            perturbed image is explained, so it must be a valid image (the paper's ARA search
            does not clip; AEs refuse images outside [0, 1]).
        autocast_dtype: autocast dtype for the search (e.g. torch.bfloat16); its re-check and
            all maps run in full precision.
        frac: share of pixels in the top region, in (0, 1].
        map_options: keyword arguments for :func:`robustx.explain.attribution.attribution_maps`
            (rho, ae_steps, ig_steps, smoothgrad_samples, lime_samples, layer, ...).
        compare_original_class: also compute the ``*_orig_class`` metrics (one more map per method).
        noise_control: also compute the ``*_noise`` metrics (one more map per method);
            ``noise_seed`` seeds the noise.
        ids: (B,) dataset indices recorded with each image (default 0..B-1).
        bootstrap: resamples for the summary's CIs.
        keep_tensors: also return ``tensors`` (clean and adversarial images, maps) for figures.
        progress: called with a short label after the search and after each method.
        search_progress: passed to :func:`robustx.robustness.ara.minimal_perturbation` as ``progress``:
            called after every search step with the number of images searched in it.
    Returns:
        {"records": [per correctly classified image: id, label, pred_adv, r, found, rechecked,
        changed, metrics {method: {metric: value}}], "summary": :func:`summarize_invalidation`,
        "num_images", "num_correct", and with ``keep_tensors`` "tensors": {"ids" (M,),
        "clean" (M, C, H, W), "adversarial" (M, C, H, W), "maps_clean" {method: (M, H, W)},
        "maps_adv" {method: (M, H, W)}} over the M correct images}.
    """
    from robustx.explain.attribution import METHODS, attribution_maps

    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"Unknown attribution method(s) {bad or '[] (empty list)'}; choose from {', '.join(METHODS)}.")
    _check_frac(frac)
    if images.dim() != 4 or labels.shape != (images.size(0),):
        raise ValueError(f"need images (B, C, H, W) and labels (B,), got {tuple(images.shape)} and {tuple(labels.shape)}.")
    opts = dict(map_options or {})
    ids = list(range(images.size(0))) if ids is None else [int(i) for i in ids]
    images, labels = images.detach(), labels.long()
    with torch.no_grad():
        pred = model(images).float().argmax(1)
    correct = pred == labels
    x, y = images[correct], labels[correct]
    kept_ids = [i for i, c in zip(ids, correct.tolist()) if c]
    out: dict[str, Any] = {"num_images": images.size(0), "num_correct": int(correct.sum())}
    records: list[dict[str, Any]] = []
    if x.size(0):
        with torch.enable_grad():
            res = minimal_perturbation(model, x, y, mode="attack", steps=attack_steps, eps=attack_eps, momentum=attack_momentum,
                                       clip=attack_clip, autocast_dtype=autocast_dtype, progress=search_progress)
        adv = res.adversarial.to(x.dtype)
        with torch.no_grad():
            pred_adv = model(adv).float().argmax(1)
        changed = pred_adv != y
        lost = int((res.found & ~res.rechecked).sum())
        if lost:
            log.warning("%d of %d perturbations found by the search no longer change the prediction in the full-precision "
                        "re-check and are left out; run the search in full precision (autocast_dtype=None, study: "
                        "attack.bf16=false) to keep them.", lost, x.size(0))
        delta = adv - x
        if noise_control:
            g = torch.Generator().manual_seed(noise_seed)
            n = torch.randn(x.shape, generator=g).to(x)
            n = n * (res.r.to(x) / rmse(n).clamp(min=1e-12)).view(-1, 1, 1, 1)  # same RMSE as each delta
            noisy = (x + n).clamp(0, 1)
            with torch.no_grad():
                noise_same = model(noisy).float().argmax(1) == y
        if progress is not None:
            progress("minimal perturbation")
        per: dict[str, dict[str, Tensor]] = {}
        maps_clean, maps_adv = {}, {}
        for m in methods:
            clean = attribution_maps(model, x, y, method=m, **opts)  # (M, H, W)
            after = attribution_maps(model, adv, pred_adv, method=m, **opts)
            vals = {"spearman": spearman(after, clean), "top_overlap": top_overlap(after, clean, frac),
                    "energy_in_top": energy_in_top(delta, clean, frac)}
            if compare_original_class:
                same = attribution_maps(model, adv, y, method=m, **opts)
                vals["spearman_orig_class"] = spearman(same, clean)
                vals["top_overlap_orig_class"] = top_overlap(same, clean, frac)
            if noise_control:
                moved = attribution_maps(model, noisy, y, method=m, **opts)
                vals["spearman_noise"] = spearman(moved, clean)
                vals["top_overlap_noise"] = top_overlap(moved, clean, frac)
            per[m] = {k: v.cpu() for k, v in vals.items()}
            maps_clean[m], maps_adv[m] = clean.cpu(), after.cpu()
            if progress is not None:
                progress(f"maps {m}")
        for j, i in enumerate(kept_ids):
            records.append({
                "id": i, "label": int(y[j]), "pred_adv": int(pred_adv[j]), "r": float(res.r[j]), "found": bool(res.found[j]),
                "rechecked": bool(res.rechecked[j]), "changed": bool(changed[j]),
                **({"noise_keeps_prediction": bool(noise_same[j])} if noise_control else {}),
                "metrics": {m: {k: _nan_list(v[j : j + 1])[0] for k, v in per[m].items()} for m in methods},
            })
        if keep_tensors:
            out["tensors"] = {"ids": kept_ids, "labels": y.cpu(), "pred_adv": pred_adv.cpu(), "r": res.r.cpu(), "clean": x.cpu(),
                              "adversarial": adv.cpu(), "maps_clean": maps_clean, "maps_adv": maps_adv}
    out["records"] = records
    out["summary"] = summarize_invalidation(records, methods, bootstrap=bootstrap)
    return out


def summarize_invalidation(records: Sequence[Mapping[str, Any]], methods: Sequence[str], *, bootstrap: int = 1000,
                           seed: int = 0) -> dict[str, Any]:
    """Summary of :func:`invalidation_study` records over the images whose prediction the attack changed.

    Args:
        records: per-image records (possibly concatenated over several batches).
        methods: the methods to summarize.
        bootstrap: resamples for the CIs of the means.
    Returns:
        {"n_correct", "n_changed", "r": stats of r, "methods": {method: {metric: stats}}} with
        stats from :func:`summarize_values`.
    """
    used = [r for r in records if r["changed"]]
    nanv = lambda v: math.nan if v is None else v  # noqa: E731
    out: dict[str, Any] = {"n_correct": len(records), "n_changed": len(used),
                           "n_found_not_rechecked": sum(1 for r in records if r["found"] and not r["rechecked"]),
                           "r": summarize_values([r["r"] for r in used], bootstrap=bootstrap, seed=seed), "methods": {}}
    kept = [r["noise_keeps_prediction"] for r in used if "noise_keeps_prediction" in r]
    if kept:
        out["noise_keeps_prediction"] = sum(kept) / len(kept)
    for m in methods:
        keys = sorted({k for r in used for k in r["metrics"].get(m, {})}, key=lambda k: (k not in INVALIDATION_METRICS, k))
        out["methods"][m] = {
            k: summarize_values([nanv(r["metrics"][m].get(k)) for r in used], bootstrap=bootstrap, seed=seed) for k in keys
        }
    return out


# ---------------------------------------------------------------------------------------------
# Differentiable Grad-CAM and the map-preserving (manipulation) attack
# ---------------------------------------------------------------------------------------------


def _layer_of(model: nn.Module, layer: nn.Module | str | None, images: Tensor) -> nn.Module:
    from robustx.explain.attribution import resolve_layer

    return resolve_layer(model, layer, images)


def _gradcam_forward(
    model: nn.Module, layer: nn.Module, images: Tensor, targets: Tensor | Callable[[Tensor], Tensor], *, create_graph: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """One forward pass -> (logits (B, K), Grad-CAM (B, H, W), targets (B,)), the CAM differentiable w.r.t. the images.

    ``targets`` may be a function of the logits (e.g. the runner-up class).
    """
    acts: list[Tensor] = []

    def hook(_m, _inp, out):
        if not isinstance(out, Tensor) or out.dim() != 4:
            raise ValueError(f"Grad-CAM layer output must be (B, C, h, w), got {getattr(out, 'shape', type(out).__name__)}.")
        acts.append(out)

    handle = layer.register_forward_hook(hook)
    try:
        logits = model(images)
    finally:
        handle.remove()
    if len(acts) != 1:
        raise ValueError(f"the Grad-CAM layer ran {len(acts)} times in one forward pass; pick a layer that runs exactly once.")
    a = acts[0]  # (B, C, h, w)
    tgt = targets(logits.detach()) if callable(targets) else torch.as_tensor(targets, device=logits.device).long()
    score = logits.float().gather(1, tgt[:, None]).sum()
    (g,) = torch.autograd.grad(score, a, create_graph=create_graph, retain_graph=True)
    cam = torch.relu((g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True).float())  # (B, 1, h, w)
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return logits, torch.relu(cam[:, 0]), tgt


def differentiable_gradcam(model: nn.Module, layer: nn.Module | str | None, images: Tensor, targets: Tensor) -> Tensor:
    """Grad-CAM that can be optimized through -> (B, H, W) float32 >= 0, differentiable w.r.t. ``images``.

    Same definition as ``attribution_maps(method="gradcam")`` (captum's ``LayerGradCam``:
    channel weights = spatial mean of d logit_target / d A, map = ReLU(sum_c w_c A_c), bilinear
    upsampling to the input size, ReLU). captum computes the layer gradient without
    ``create_graph``, so its map is a constant to autograd and cannot be optimized through;
    here the gradient is taken with ``create_graph=True`` (double backprop through the model).

    Args:
        model: classifier on (B, C, H, W) images in [0, 1] (put it in eval mode first).
        layer: the convolutional layer (module or dotted name; None: :func:`robustx.explain.attribution.find_gradcam_layer`).
        images: (B, C, H, W); gradients flow to it if it requires grad.
        targets: (B,) int classes.
    Returns:
        (B, H, W) maps.
    """
    layer = _layer_of(model, layer, images.detach())
    with torch.enable_grad():
        x = images if images.requires_grad else images.detach().requires_grad_(True)
        return _gradcam_forward(model, layer, x, targets)[1]


def _cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """1 - cosine similarity of flattened maps -> (B,); 1 where a map is all zero."""
    a, b = a.flatten(1), b.flatten(1)
    return 1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-12)


def _runner_up(labels: Tensor) -> Callable[[Tensor], Tensor]:
    def f(logits: Tensor) -> Tensor:
        return logits.float().scatter(1, labels[:, None], -math.inf).argmax(1)

    return f


def _manipulate(model, layer, x, y, clean_cam, *, budget, steps, map_weight, lr, kappa, clip) -> Tensor:
    """Map-preserving (``map_weight > 0``) or plain attack inside RMSE <= budget for one batch -> adversarial images (B, C, H, W).

    Normalized-gradient descent on margin.clamp(min=-kappa) + map_weight * (1 - cos(CAM_new, CAM_clean)),
    step lr * budget, projected onto the RMSE ball (and [0, 1] with ``clip``). Kept per image:
    with the map term, the iterate that flips the prediction with the smallest map distance; the
    plain attack knows nothing of maps and keeps its last flipping iterate (so its map similarity
    is not selected for). Images that never flip get the last iterate.
    """
    delta = torch.zeros_like(x, requires_grad=True)
    best = x.clone()
    best_dist = torch.full((x.size(0),), math.inf, device=x.device)
    runner_up = _runner_up(y)
    use_map = map_weight > 0
    for t in range(steps + 1):
        if use_map:
            logits, cam, tgt = _gradcam_forward(model, layer, x + delta, runner_up, create_graph=t < steps)
            dist = _cosine_distance(cam, clean_cam)  # (B,)
        else:
            logits = model(x + delta)
            tgt = runner_up(logits.detach())
            dist = torch.full((x.size(0),), float(steps - t), device=x.device)  # later iterates rank first
        lf = logits.float()
        margin = lf.gather(1, y[:, None])[:, 0] - lf.gather(1, tgt[:, None])[:, 0]  # (B,) < 0: flipped
        with torch.no_grad():
            better = (margin < 0) & (dist < best_dist)
            best[better] = (x + delta)[better].detach()
            best_dist = torch.where(better, dist.detach(), best_dist)
            if t == steps:
                never = torch.isinf(best_dist)
                best[never] = (x + delta)[never].detach()
                break
        loss = margin.clamp(min=-kappa)
        if use_map:
            loss = loss + map_weight * dist
        (g,) = torch.autograd.grad(loss.sum(), delta)
        with torch.no_grad():
            delta = l2_ball_step(x, delta, -g, alpha=lr * budget, eps=budget, clip=clip)  # the engine's PGD-L2 step, descending
        delta.requires_grad_(True)
    return best


def manipulation_attack(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    layer: nn.Module | str | None = None,
    budgets: Sequence[float] = (0.005, 0.01, 0.02, 0.05),
    steps: int = 100,
    map_weight: float = 5.0,
    lr: float = 0.1,
    kappa: float = 1.0,
    clip: bool = True,
    frac: float = 0.2,
    baseline: bool = True,
    ids: Sequence[int] | None = None,
    bootstrap: int = 1000,
    keep_tensors: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Flip the prediction inside an RMSE budget while keeping the Grad-CAM map close to the clean one.

    For each correctly classified image x (label y) and each budget, delta is optimized by
    normalized-gradient descent (step ``lr * budget``, projected onto RMSE(delta) <= budget and,
    with ``clip``, onto valid images) on

        max(logit_y - logit_z, -kappa) + map_weight * (1 - cos(CAM(x + delta, z), CAM(x, y)))

    with z the strongest class other than y, through :func:`differentiable_gradcam`. Of all
    iterates, the one that flips the prediction with the closest map is kept (the plain
    reference keeps its last flipping iterate). Reported per
    budget over the correct images: the success rate (prediction changed, fp32 re-check) and,
    over the successes, Spearman and top-``frac`` overlap of the manipulated image's Grad-CAM
    for the new class and for the original class against the clean map. With ``baseline`` the
    same attack without the map term (map_weight = 0) runs as a reference.

    Args:
        model: classifier on (B, C, H, W) images in [0, 1], in eval mode.
        images: (B, C, H, W) in [0, 1].
        labels: (B,) true classes.
        layer: Grad-CAM layer (None: :func:`robustx.explain.attribution.find_gradcam_layer`).
        budgets: RMSE budgets (> 0) in [0, 1] pixel space.
        steps: optimization steps per budget (>= 1).
        map_weight: weight of the map distance (>= 0).
        lr: step size as a fraction of the budget (> 0).
        kappa: margin (logits) past which flipping stops being pushed (>= 0).
        clip: keep x + delta in [0, 1].
        frac: top-region share for the overlap.
        baseline: also run the attack without the map term.
        ids: dataset indices recorded per image.
        bootstrap: resamples for the CIs.
        keep_tensors: also return "tensors" (clean images and CAMs, each attack's images, CAMs
            of the new class and predictions) for figures.
        progress: called with a short label after each (budget, variant) attack.
    Returns:
        {"layer": name, "num_images", "num_correct", "budgets": rows of
        :func:`summarize_manipulation` (per budget and variant ("map_preserving", "plain"):
        success rate, max RMSE, Spearman / top overlap of the new and original class's CAM
        against the clean CAM, per-image records)}.
    """
    if any(not b > 0 for b in budgets) or not budgets:
        raise ValueError(f"manipulation budgets must be RMSE values > 0, got {list(budgets)}.")
    if steps < 1 or not lr > 0 or map_weight < 0 or kappa < 0:
        raise ValueError(f"manipulation needs steps >= 1, lr > 0, map_weight >= 0, kappa >= 0; got {steps}, {lr}, {map_weight}, {kappa}.")
    _check_frac(frac)
    images, labels = images.detach(), labels.long()
    target_layer = _layer_of(model, layer, images)
    layer_name = next((n for n, mod in model.named_modules() if mod is target_layer), type(target_layer).__name__)
    ids = list(range(images.size(0))) if ids is None else [int(i) for i in ids]
    with torch.no_grad():
        correct = model(images).float().argmax(1) == labels
    x, y = images[correct], labels[correct]
    kept = [i for i, c in zip(ids, correct.tolist()) if c]
    out: dict[str, Any] = {"layer": layer_name, "num_images": images.size(0), "num_correct": x.size(0), "budgets": []}
    if x.size(0) == 0:
        return out
    with torch.enable_grad():
        clean_cam = differentiable_gradcam(model, target_layer, x, y).detach()
    tensors: list[dict[str, Any]] = []
    variants = [("map_preserving", map_weight)] + ([("plain", 0.0)] if baseline and map_weight > 0 else [])
    for budget in budgets:
        for variant, weight in variants:
            with torch.enable_grad():
                adv = _manipulate(model, target_layer, x, y, clean_cam, budget=float(budget), steps=steps, map_weight=weight, lr=lr,
                                  kappa=kappa, clip=clip)
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                pred = model(adv).float().argmax(1)
            success = pred != y
            with torch.enable_grad():
                cam_new = differentiable_gradcam(model, target_layer, adv, pred).detach()
                cam_orig = differentiable_gradcam(model, target_layer, adv, y).detach()
            r = rmse(adv - x)
            vals = {"spearman_new_class": spearman(cam_new, clean_cam), "top_overlap_new_class": top_overlap(cam_new, clean_cam, frac),
                    "spearman_orig_class": spearman(cam_orig, clean_cam), "top_overlap_orig_class": top_overlap(cam_orig, clean_cam, frac)}
            row: dict[str, Any] = {"budget": float(budget), "variant": variant, "map_weight": weight}
            row["per_image"] = [
                {"id": i, "success": bool(success[j]), "pred": int(pred[j]), "rmse": float(r[j]),
                 **{k: _nan_list(v[j : j + 1])[0] for k, v in vals.items()}}
                for j, i in enumerate(kept)
            ]
            if keep_tensors:
                tensors.append({"budget": float(budget), "variant": variant, "ids": kept, "adversarial": adv.cpu(),
                                "cam_new": cam_new.cpu(), "pred": pred.cpu()})
            if progress is not None:
                progress(f"manipulation {variant} {budget:g}")
            out["budgets"].append(row)
    out["budgets"] = summarize_manipulation(out["budgets"], bootstrap=bootstrap)
    if keep_tensors:
        out["tensors"] = {"ids": kept, "clean": x.cpu(), "cam_clean": clean_cam.cpu(), "attacks": tensors}
    return out


MANIPULATION_METRICS = ("spearman_new_class", "top_overlap_new_class", "spearman_orig_class", "top_overlap_orig_class")


def summarize_manipulation(rows: Sequence[Mapping[str, Any]], *, bootstrap: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """Merge :func:`manipulation_attack` rows of several batches by (budget, variant) and summarize each.

    Args:
        rows: rows with "budget", "variant", "map_weight" and "per_image" records.
        bootstrap: resamples for the CIs.
    Returns:
        One row per (budget, variant), in first-seen order: "budget", "variant", "map_weight",
        "n" (correct images), "success_rate", "max_rmse", each of :data:`MANIPULATION_METRICS`
        as :func:`summarize_values` stats over the successful images, and the merged "per_image".
    """
    merged: dict[tuple[float, str], dict[str, Any]] = {}
    for row in rows:
        key = (float(row["budget"]), str(row["variant"]))
        if key not in merged:
            merged[key] = {"budget": key[0], "variant": key[1], "map_weight": row.get("map_weight"), "per_image": []}
        merged[key]["per_image"].extend(row["per_image"])
    out = []
    for m in merged.values():
        recs = m["per_image"]
        ok = [p for p in recs if p["success"]]
        nanv = lambda v: math.nan if v is None else v  # noqa: E731
        summary = {
            "n": len(recs),
            "success_rate": sum(p["success"] for p in recs) / len(recs) if recs else math.nan,
            "max_rmse": max((p["rmse"] for p in recs), default=math.nan),
            **{k: summarize_values([nanv(p[k]) for p in ok], bootstrap=bootstrap, seed=seed) for k in MANIPULATION_METRICS},
        }
        out.append({"budget": m["budget"], "variant": m["variant"], "map_weight": m["map_weight"], **summary, "per_image": recs})
    return out
