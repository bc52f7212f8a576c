"""Fixed-radius robust accuracy, AutoAttack-grade (Croce & Hein 2020), in the field's threat models.

The attacks are the reference implementation's (``pyautoattack``, the PyPI release of
fra31/auto-attack, configured exactly as its ``version='standard'``: APGD-CE, APGD-T with the DLR
loss and 9 target classes, FAB-T with 9 targets, Square with 5,000 queries). The composition is
AutoAttack's rule: each attack runs only on the images still robust after the previous ones, so
the verdict per image is the worst case over the attacks. It is written out here (not
``AutoAttack.run_standard_evaluation``) to record which attack broke each image and to re-check
every adversarial example in fp32 against the radius and the [0, 1] box before counting it.

Radii are in the norm's own units (L2: Euclidean norm in [0, 1] pixel space; Linf: max absolute
change); :func:`rmse_of_radius` gives the project's unit (RMSE) for each.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from robustx.robustness.ara import stretch_to_fail
from robustx.utils import model_mode

__all__ = ["ROBUSTBENCH_CIFAR10", "VERSIONS", "NORMS", "fixed_radius_attack", "counts_at_radius", "rmse_of_radius", "perturbation_norm", "check_threat_model"]

log = logging.getLogger(__name__)

#: Attack sequence per preset: ``standard`` is AutoAttack's; ``quick`` its two APGD attacks.
VERSIONS: dict[str, tuple[str, ...]] = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "quick": ("apgd-ce", "apgd-t"),
}
NORMS = ("L2", "Linf")
#: RobustBench's CIFAR-10 threat models (the datamodules' default; other datasets set theirs in conf/data/).
ROBUSTBENCH_CIFAR10: tuple[dict, ...] = ({"norm": "L2", "eps": 0.5}, {"norm": "Linf", "eps": 8 / 255})
_TOL = 1e-5  # relative slack of the radius re-check (the attacks project in float32)


def check_threat_model(norm: str, eps: float, version: str) -> None:
    """One clear error per bad setting (norm, radius, preset)."""
    if norm not in NORMS:
        raise ValueError(f"fixed-radius norm must be one of {NORMS}, got '{norm}'.")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"fixed-radius eps must be a finite number > 0, got {eps!r} ({norm}; e.g. 0.5 for L2, 8/255 for Linf).")
    if version not in VERSIONS:
        raise ValueError(f"fixed-radius version must be one of {sorted(VERSIONS)}, got '{version}'.")


def rmse_of_radius(norm: str, eps: float, num_pixels: int) -> float:
    """The radius as RMSE in [0, 1] pixel space: L2 eps / sqrt(D); Linf eps bounds the RMSE (equal at a corner)."""
    return eps / math.sqrt(num_pixels) if norm == "L2" else float(eps)


def perturbation_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-image L2 or Linf norm of (B, C, H, W) perturbations -> (B,)."""
    flat = delta.flatten(1).double()  # (B, D)
    return flat.norm(dim=1) if norm == "L2" else flat.abs().amax(dim=1)


@torch.no_grad()
def counts_at_radius(model: nn.Module, adv: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, *, norm: str,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether each adversarial example counts at the radius: misclassified by ``model`` (as it is, in fp32
    when called outside autocast), inside ``eps`` (with float32 projection slack) and inside [0, 1].

    Args:
        adv, images: (B, C, H, W); labels: (B,).
    Returns:
        (ok (B,) bool, the perturbation's norm (B,) float64), both on the CPU.
    """
    wrong = (model(adv).argmax(1) != labels).cpu()
    size = perturbation_norm(adv - images, norm).cpu()
    in_box = ((adv.flatten(1).amin(1) >= 0) & (adv.flatten(1).amax(1) <= 1)).cpu()
    return wrong & (size <= eps * (1 + _TOL)) & in_box, size


@contextmanager
def _quiet_autoattack() -> Iterator[None]:
    # Its checks warn through this logger; the evaluation raises its own flags (robustx.robustness.flags).
    logger = logging.getLogger("auto-attack")
    before = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(before)


def _attacker(model: nn.Module, *, norm: str, eps: float, num_classes: int, seed: int, device, n_queries: int):
    from pyautoattack import AutoAttack

    aa = AutoAttack(model, norm=norm, eps=eps, version="standard", seed=seed, device=device)
    targets = max(1, min(9, num_classes - 1))  # standard: 9 (CIFAR-10); fewer classes, fewer targets
    aa.apgd_targeted.n_target_classes = targets
    aa.fab.n_target_classes = targets
    aa.square.n_queries = n_queries
    return aa


def _refine(model: nn.Module, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor, *, norm: str, eps: float,
            steps: int) -> torch.Tensor:
    """``steps`` of AutoAttack's APGD-CE on ``model`` from ``start`` (inside the radius) -> (K, C, H, W) best adversarial points."""
    from pyautoattack.autopgd_base import APGDAttack

    apgd = APGDAttack(model, n_iter=steps, norm=norm, eps=eps, loss="ce", seed=0, device=x.device)
    apgd.init_hyperparam(x)
    with torch.enable_grad():
        # attack_single_run, since perturb() does not take a starting point
        return apgd.attack_single_run(x, y, x_init=start)[3].detach().float()


def _run(aa, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # The same calls as AutoAttack.run_standard_evaluation makes for each attack name.
    if name == "apgd-ce":
        aa.apgd.loss = "ce"
        aa.apgd.seed = aa.get_seed()
        return aa.apgd.perturb(x, y)
    if name == "apgd-t":
        aa.apgd_targeted.seed = aa.get_seed()
        return aa.apgd_targeted.perturb(x, y)
    if name == "fab-t":
        aa.fab.targeted = True
        aa.fab.n_restarts = 1
        aa.fab.seed = aa.get_seed()
        return aa.fab.perturb(x, y)
    if name == "square":
        aa.square.seed = aa.get_seed()
        return aa.square.perturb(x, y)
    raise ValueError(f"unknown attack '{name}'")


def fixed_radius_attack(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    norm: str = "L2",
    eps: float = 0.5,
    version: str = "standard",
    num_classes: int | None = None,
    seed: int = 0,
    n_queries: int = 5000,
    progress: Callable[[str, int], None] | None = None,
    attack_model: nn.Module | None = None,
    refine_steps: int = 20,
) -> dict:
    """Robust accuracy at a fixed radius: the per-image worst case over AutoAttack's attacks.

    Args:
        model: classifier on [0, 1] images returning logits; put in eval mode for the call (with a
            log line) if it is in train mode.
        images: (B, C, H, W) in [0, 1].
        labels: (B,) true classes.
        norm: ``L2`` or ``Linf``.
        eps: the radius in the norm's units (> 0).
        version: ``standard`` (APGD-CE, APGD-T, FAB-T, Square) or ``quick`` (APGD-CE, APGD-T).
        num_classes: number of classes (default: the model's output width).
        seed: the attacks' seed (AutoAttack's ``seed``).
        n_queries: Square's query budget (AutoAttack standard: 5,000).
        progress: called as ``progress(attack, images_attacked)`` after each attack.
        attack_model: the model the attacks run on (default: ``model``), e.g.
            :class:`robustx.compiled.FastForward` (bf16, compiled; same weights). Every example is
            still re-checked on ``model`` in fp32. An example that fools ``attack_model`` but not fp32
            is stretched along its perturbation (:func:`robustx.robustness.ara.stretch_to_fail`) and
            counts if it then fails in fp32 inside the radius and the box; else ``refine_steps`` of
            fp32 APGD-CE start from it (inside the radius); where that fails too, the attack runs
            again on ``model`` for those images, so a bf16 near-miss does not count an image robust
            that the fp32 attack would break.
        refine_steps: fp32 APGD-CE iterations from a near-miss before a full fp32 rerun (0: none).
    Returns:
        ``correct`` (B,) bool, ``robust`` (B,) bool, ``broken_by`` list of B names ("" where the
        image is robust or misclassified unperturbed), ``robust_after`` {attack: count},
        ``attacked`` {attack: images attacked}, ``norm_found`` (B,) float64 norm of the adversarial
        example that counted (nan where none), ``stretched_fp32`` {attack: near-misses of
        ``attack_model`` stretched into fp32 examples}, ``refined_fp32`` {attack: near-misses
        turned into fp32 examples by the short APGD-CE} and ``rerun_fp32`` {attack: images run
        again on ``model``} (all empty without ``attack_model``).
    """
    check_threat_model(norm, eps, version)
    if int(refine_steps) < 0:
        raise ValueError(f"refine_steps must be >= 0, got {refine_steps}.")
    if images.numel() and (float(images.min()) < 0 or float(images.max()) > 1):
        raise ValueError(f"images must lie in [0, 1] (got [{float(images.min()):.3g}, {float(images.max()):.3g}]); "
                         "the model owns its normalization, so pass unnormalized images.")
    if model.training:
        log.warning("fixed_radius_attack: the model was in train mode; evaluated in eval mode (and put back after).")
    x, y = images.detach().float().contiguous(), labels.detach()
    # The attacks reseed torch's global generators; fork_rng leaves the caller's (a training run's) as they were.
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), model_mode(model, train=False), _quiet_autoattack():
        with torch.no_grad():
            logits = model(x)  # (B, num_classes)
        correct = logits.argmax(1) == y
        c = int(num_classes or logits.shape[1])
        aa_ref = _attacker(model, norm=norm, eps=eps, num_classes=c, seed=seed, device=x.device, n_queries=n_queries)
        aa = aa_ref if attack_model is None else _attacker(attack_model, norm=norm, eps=eps, num_classes=c, seed=seed,
                                                           device=x.device, n_queries=n_queries)
        robust = correct.clone()
        broken_by = [""] * len(y)
        norm_found = torch.full((len(y),), math.nan, dtype=torch.float64)
        robust_after, attacked, rerun, stretched, refined = {}, {}, {}, {}, {}
        names = [n for n in VERSIONS[version] if not (n == "apgd-t" and c <= 3)]
        if len(names) < len(VERSIONS[version]):
            log.info("fixed_radius_attack: %d classes: APGD-T left out (its targeted DLR loss needs at least 4).", c)

        def checked(adv: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return counts_at_radius(model, adv, xs, ys, norm=norm, eps=eps)

        for name in names:
            idx = robust.nonzero().flatten()  # (R,) images still robust
            attacked[name] = int(idx.numel())
            if idx.numel():
                xs, ys = x[idx], y[idx]  # (R, C, H, W), (R,)
                with torch.enable_grad():
                    adv = _run(aa, name, xs, ys).detach().float()  # (R, C, H, W)
                valid, size = checked(adv, xs, ys)
                if attack_model is not None:
                    with torch.no_grad():
                        claimed = (attack_model(adv).argmax(1) != ys).cpu()
                    redo = (claimed & ~valid).nonzero().flatten()  # (K,) fooled the fast model only

                    def settle(redo: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
                        # fp32 verdict on new examples for the images ``redo``; returns those still not broken
                        valid[redo], size[redo] = checked(candidate, xs[redo], ys[redo])
                        return redo[~valid[redo]]

                    # A near-miss (FAB lands just across the bf16 boundary) is first stretched along
                    # its own perturbation until it fails in fp32; it counts only if that stays inside
                    # the radius and the box. The rest get a short fp32 APGD-CE from their example
                    # (cheaper than a rerun: it is already at the boundary), then a full fp32 rerun.
                    if redo.numel():
                        delta = adv[redo] - xs[redo]  # (K, C, H, W)
                        scale = stretch_to_fail(model, xs[redo], ys[redo], delta, torch.ones_like(ys[redo], dtype=torch.bool),
                                                mode="attack")
                        left = settle(redo, (xs[redo] + scale.view(-1, 1, 1, 1) * delta).clamp(0, 1))
                        stretched[name], redo = int(redo.numel() - left.numel()), left
                    if redo.numel() and refine_steps:
                        left = settle(redo, _refine(model, xs[redo], ys[redo], adv[redo], norm=norm, eps=eps, steps=int(refine_steps)))
                        refined[name], redo = int(redo.numel() - left.numel()), left
                    rerun[name] = int(redo.numel())
                    if redo.numel():
                        with torch.enable_grad():
                            settle(redo, _run(aa_ref, name, xs[redo], ys[redo]).detach().float())
                for k in valid.nonzero().flatten().tolist():
                    i = int(idx[k])
                    robust[i] = False
                    broken_by[i] = name
                    norm_found[i] = float(size[k])
            robust_after[name] = int(robust.sum())
            if progress is not None:
                progress(name, attacked[name])
    return {"correct": correct.cpu(), "robust": robust.cpu(), "broken_by": broken_by, "robust_after": robust_after,
            "attacked": attacked, "norm_found": norm_found,
            "stretched_fp32": stretched, "refined_fp32": refined, "rerun_fp32": rerun}
