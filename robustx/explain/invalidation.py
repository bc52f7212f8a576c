"""Do attacks invalidate attribution maps? The invalidation study (the map metrics: :mod:`robustx.explain.maps`; the map-preserving attack: :mod:`robustx.explain.manipulation`).

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
from torch import Tensor, nn

from robustx.attacks import rmse
from robustx.explain.maps import check_frac, energy_in_top, spearman, top_overlap
from robustx.robustness.ara import PAPER, minimal_perturbation
from robustx.stats import nan_list, summarize_values

__all__ = ["invalidation_study", "summarize_invalidation", "INVALIDATION_METRICS"]

log = logging.getLogger(__name__)

#: Per-method metrics of :func:`invalidation_study` (see its docstring).
INVALIDATION_METRICS = ("spearman", "top_overlap", "energy_in_top", "spearman_orig_class", "top_overlap_orig_class",
                        "spearman_noise", "top_overlap_noise")


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
    check_frac(frac)
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
                "metrics": {m: {k: nan_list(v[j : j + 1])[0] for k, v in per[m].items()} for m in methods},
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
