"""A map-preserving attack: flip the prediction inside an RMSE budget while keeping the Grad-CAM map close to the clean one.

It backs the claim that a classic attribution map need not register a change of decision (see
:mod:`robustx.explain.invalidation`): :func:`manipulation_attack` descends the class margin plus
a map distance through :func:`differentiable_gradcam`, with the projected step of PGD-L2
(:func:`robustx.attacks.l2_ball_step`).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustx.attacks import l2_ball_step, rmse
from robustx.explain.maps import check_frac, spearman, top_overlap
from robustx.stats import nan_list, summarize_values

__all__ = ["differentiable_gradcam", "manipulation_attack", "summarize_manipulation", "MANIPULATION_METRICS"]

log = logging.getLogger(__name__)


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
    check_frac(frac)
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
                 **{k: nan_list(v[j : j + 1])[0] for k, v in vals.items()}}
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
