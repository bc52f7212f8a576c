"""One training objective for every method: standard, the paper's robust additions, adversarial
training (L2, L2,min, half-and-half), PGD-AT and TRADES.

:func:`training_loss` is a pure step function (no optimizer, no logging) that the Lightning
module calls and that users can call from their own loops.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from robustx.training.adaptive import AdaptivePsi
from robustx.attacks import engine_attack, half_and_half_mask, pgd_l2, trades_adversary
from robustx.compiled import compiled_forward
from robustx.training.double_backprop import use_fused_double_backprop
from robustx.training.penalty import PENALTY_IMPLS, finite_difference_penalty, input_gradient_penalty
from robustx.utils import at_least_fp32, frozen_parameters, model_mode

__all__ = ["AdversarialConfig", "MethodConfig", "make_adversarial", "training_loss", "StepOutput"]

ADVERSARIAL_KINDS = ("none", "l2", "l2min", "pgd", "trades")


def _check_numbers(cfg: Any, prefix: str) -> None:
    """Every numeric field finite (NaN/inf would train silently wrong or fail far from the cause), naming the key."""
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, (int, float)) and not math.isfinite(v):
            raise ValueError(f"{prefix}{f.name} must be a finite number, got {v}; set it to a number (see conf/method/).")


@dataclass
class AdversarialConfig:
    """Adversarial training settings (paper, Methods, "Adversarial training").

    kind: ``none``; ``l2`` (engine, RMSE < eps; paper eps 0.01, T 7); ``l2min`` (engine, while
    still correct; paper eps 0.1, T 7); ``pgd`` (Madry et al., L2 ball of RMSE eps); ``trades``
    (Zhang et al., beta weighs the KL term).
    """

    kind: str = "none"
    eps: float = 0.01
    steps: int = 7
    half_and_half: bool = False
    momentum: float = 0.0
    step_size: float | None = None
    random_start: bool = True
    clip: bool = False
    beta: float = 6.0
    bn_mode: str = "train"
    # Half-and-half: attack only the examples that get perturbed (about 2x cheaper). Off by
    # default: the authors attack the whole batch, so train-mode BatchNorm sees all of it.
    attack_subset: bool = False
    # Run the attack's forward and input-gradient passes through torch.compile
    # (robustx.compiled.compiled_forward; not in the paper): the same attack, fused arithmetic.
    compile: bool = False

    def __post_init__(self) -> None:
        _check_numbers(self, "method.adversarial.")
        if self.kind not in ADVERSARIAL_KINDS:
            raise ValueError(f"Unknown adversarial kind '{self.kind}'; choose one of {ADVERSARIAL_KINDS}.")
        if self.eps < 0:
            raise ValueError(f"adversarial eps must be >= 0, got {self.eps}; it is an RMSE in [0, 1] pixel space.")
        if self.steps < 0:
            raise ValueError(f"adversarial steps must be >= 0, got {self.steps}.")
        if self.bn_mode not in ("train", "eval"):
            raise ValueError(f"adversarial bn_mode must be 'train' or 'eval', got '{self.bn_mode}'.")
        if self.beta < 0:
            raise ValueError(f"TRADES beta must be >= 0, got {self.beta}.")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"method.adversarial.momentum must be in [0, 1), got {self.momentum}.")
        if self.step_size is not None and not self.step_size > 0:
            raise ValueError(f"method.adversarial.step_size must be > 0 or null (null: 2.5 * eps / steps), got {self.step_size}.")


@dataclass
class MethodConfig:
    """A training method: the penalty (L_adv), adaptive psi and adversarial training.

    The paper's presets: ``robust`` = penalty (z=2, zeta=0.2) + half-Huber ReLU + adaptive psi;
    ``all`` = robust + L2,min adversarial training + half-and-half.
    """

    name: str = "standard"
    activation: str = "relu"
    penalty: bool = False
    z: float = 2.0
    zeta: float = 0.2
    # The controller's settings; their defaults (the paper's) live in AdaptivePsi.
    psi0: float = AdaptivePsi.psi0
    k: float = AdaptivePsi.k
    l_target: float = AdaptivePsi.l_target
    eps_better: float = AdaptivePsi.eps_better
    eps_worse: float = AdaptivePsi.eps_worse
    adaptive: bool = AdaptivePsi.adaptive
    # How the penalty's parameter gradient is computed: the paper's double backprop (exact; with
    # "double_backprop_fused" through fused compiled kernels, the same gradient, faster), or a
    # finite difference along dP/dg (one extra forward/backward instead; not in the paper).
    penalty_impl: str = "double_backprop"
    fd_h: float = 5e-4
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)

    def __post_init__(self) -> None:
        if isinstance(self.adversarial, dict):
            self.adversarial = AdversarialConfig(**self.adversarial)
        _check_numbers(self, "method.")
        for key in ("psi0", "k", "eps_better", "eps_worse"):
            if getattr(self, key) < 0:
                raise ValueError(f"method.{key} must be >= 0, got {getattr(self, key)} (paper: psi0 220, k 0.02, eps_better 1, eps_worse 0.01).")
        if not self.l_target > 0:
            raise ValueError(f"method.l_target must be > 0, got {self.l_target}; the paper uses 1.5.")
        if not self.z > 0:
            raise ValueError(f"method.z must be > 0, got {self.z}; the paper uses z=2.")
        if not 0 <= self.zeta <= 1:
            raise ValueError(f"method.zeta must be in [0, 1], got {self.zeta}; the paper uses 0.2.")
        if self.penalty_impl not in PENALTY_IMPLS:
            raise ValueError(f"method.penalty_impl must be one of {PENALTY_IMPLS}, got '{self.penalty_impl}'.")
        if not self.fd_h > 0:
            raise ValueError(f"method.fd_h must be > 0, got {self.fd_h}; it is an RMSE in [0, 1] pixel space (try 5e-4).")
        if self.activation not in ("relu", "hhrelu"):
            raise ValueError(f"method.activation must be 'relu' or 'hhrelu', got '{self.activation}'.")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MethodConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"Unknown method option(s) {sorted(unknown)}; valid: {sorted(known)}.")
        adv = d.get("adversarial") or {}
        adv_known = {f.name for f in fields(AdversarialConfig)}
        if set(adv) - adv_known:
            raise ValueError(
                f"Unknown adversarial option(s) {sorted(set(adv) - adv_known)}; valid: {sorted(adv_known)}."
            )
        return cls(**{**d, "adversarial": AdversarialConfig(**adv)})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def make_psi(self) -> AdaptivePsi:
        return AdaptivePsi(
            psi0=self.psi0,
            k=self.k,
            l_target=self.l_target,
            eps_better=self.eps_better,
            eps_worse=self.eps_worse,
            adaptive=self.adaptive,
        )


def _attack_forward(model: nn.Module, cfg: AdversarialConfig):
    """(the attack's forward, the context to run it in): compiled with frozen parameters when ``cfg.compile``.

    The attack differentiates w.r.t. the images only; frozen parameters keep the compiled backward
    from computing weight gradients nobody reads.
    """
    if cfg.compile:
        return compiled_forward(model), frozen_parameters(model)
    return model, nullcontext()


def make_adversarial(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: AdversarialConfig,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Adversarial training images for ``l2``, ``l2min`` or ``pgd`` (``none``/``trades``: the images)."""
    if cfg.kind in ("none", "trades"):
        return images
    affected = (
        half_and_half_mask(images.size(0), device=images.device, generator=generator) if cfg.half_and_half else None
    )
    if affected is not None and cfg.attack_subset:
        idx = affected.nonzero().flatten()
        adv = images.clone()
        if idx.numel():
            sub = AdversarialConfig(**{**asdict(cfg), "half_and_half": False})
            adv[idx] = make_adversarial(model, images[idx], labels[idx], sub, generator=generator)
        return adv
    net, frozen = _attack_forward(model, cfg)
    with model_mode(model, train=cfg.bn_mode == "train"), frozen:
        if cfg.kind in ("l2", "l2min"):
            return engine_attack(
                net,
                images,
                labels,
                eps=cfg.eps,
                steps=cfg.steps,
                criterion=cfg.kind,
                momentum=cfg.momentum,
                affected=affected,
                clip=cfg.clip,
            )
        adv = pgd_l2(
            net,
            images,
            labels,
            eps=cfg.eps,
            steps=cfg.steps,
            step_size=cfg.step_size,
            random_start=cfg.random_start,
            clip=True,
            generator=generator,
        )
    if affected is not None:
        adv = torch.where(affected.view(-1, 1, 1, 1), adv, images)
    return adv


@dataclass
class StepOutput:
    loss: torch.Tensor
    ce: torch.Tensor
    penalty: torch.Tensor
    psi: float
    logits: torch.Tensor
    labels: torch.Tensor


def training_loss(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    method: MethodConfig,
    psi: AdaptivePsi | None = None,
    *,
    reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """Total loss of one training batch: CE (+ psi * L_adv) (+ TRADES KL) on (adversarial) images.

    The psi controller sees the mean CE of the images trained on (adversarial ones included),
    averaged across processes by ``reduce_mean`` so every DDP rank uses the same psi.

    Args:
        model: classifier on [0, 1] images, in train mode.
        images: (B, C_in, H, W) in [0, 1].
        labels: (B,).
        method: the method settings.
        psi: controller state (required when ``method.penalty``); updated in place.
        reduce_mean: all-reduce mean over processes (identity when None).
        generator: RNG for selections and half-and-half masks.
    """
    adv_cfg = method.adversarial
    x = make_adversarial(model, images, labels, adv_cfg, generator=generator)
    surrogate = None
    if method.penalty and method.penalty_impl == "finite_difference":
        logits, penalty, surrogate = finite_difference_penalty(
            model, x, labels, z=method.z, zeta=method.zeta, h=method.fd_h, generator=generator
        )
    elif method.penalty:
        if method.penalty_impl == "double_backprop_fused":
            use_fused_double_backprop(model)  # in place, once per step: cheap, and idempotent
        logits, penalty = input_gradient_penalty(
            model, x, labels, z=method.z, zeta=method.zeta, create_graph=True, generator=generator
        )
    else:
        logits, penalty = model(x), torch.zeros((), device=images.device)
    ce = F.cross_entropy(at_least_fp32(logits), labels)
    loss = ce
    if adv_cfg.kind == "trades":
        net, frozen = _attack_forward(model, adv_cfg)
        with model_mode(model, train=adv_cfg.bn_mode == "train"), frozen:
            x_adv = trades_adversary(
                net, images, eps=adv_cfg.eps, steps=adv_cfg.steps, step_size=adv_cfg.step_size, generator=generator
            )
        kl = F.kl_div(
            F.log_softmax(at_least_fp32(model(x_adv)), 1), F.softmax(at_least_fp32(logits), 1), reduction="batchmean"
        )
        loss = loss + adv_cfg.beta * kl
    psi_value = 0.0
    if method.penalty:
        if psi is None:
            raise ValueError("training_loss needs an AdaptivePsi when method.penalty is on.")
        ce_all = ce.detach() if reduce_mean is None else reduce_mean(ce.detach())
        psi_value = psi.update(float(ce_all))
        loss = loss + psi_value * (penalty if surrogate is None else surrogate)
    return StepOutput(loss=loss, ce=ce, penalty=penalty.detach(), psi=psi_value, logits=logits, labels=labels)
