"""The paper's attack engine (Algorithm 1) and the baseline attacks used for training.

One engine serves adversarial training (L2 and L2,min criteria), minimal-perturbation search
for the ARA (criteria "still correct" / "better than random") and adversarial explanations
(targeted, overshoot). Perturbation size is RMSE in [0, 1] pixel space.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from robustx.utils import at_least_fp32, draw_device

__all__ = [
    "rmse",
    "step_sizes",
    "criterion_mask",
    "ce_input_grad",
    "engine_attack",
    "engine_update",
    "half_and_half_mask",
    "pgd_l2",
    "trades_adversary",
    "CRITERIA",
]

Criterion = Literal["l2", "l2min", "btr"]
CRITERIA = ("l2", "l2min", "btr")


def rmse(delta: torch.Tensor) -> torch.Tensor:
    """Per-example root-mean-square of a (B, ...) perturbation -> (B,)."""
    return delta.flatten(1).pow(2).mean(1).sqrt()


def step_sizes(eps: float, steps: int, *, overshoot: float = 1.0) -> list[float]:
    """Linearly falling step sizes ss_t = eps*overshoot*(T - t)/(T(T+1)/2), t = 0..T-1; they sum to eps*overshoot."""
    total = steps * (steps + 1) / 2
    return [eps * overshoot * (steps - t) / total for t in range(steps)]


def criterion_mask(
    criterion: Criterion | Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    logits: torch.Tensor,
    labels: torch.Tensor,
    delta: torch.Tensor,
    *,
    eps: float,
) -> torch.Tensor:
    """Which examples keep following the loss gradient this step -> (B,) bool.

    * ``l2``: RMSE(delta) < eps.
    * ``l2min``: the prediction is still the true class.
    * ``btr``: the true class's softmax probability is still > 1/C (better than random).
    * a callable ``f(logits, labels, delta) -> (B,) bool`` for anything else.
    """
    if callable(criterion):
        return criterion(logits, labels, delta)
    if criterion == "l2":
        return rmse(delta) < eps
    if criterion == "l2min":
        return logits.argmax(1) == labels
    if criterion == "btr":
        p = at_least_fp32(logits).softmax(1).gather(1, labels[:, None])[:, 0]
        return p > 1.0 / logits.size(1)
    raise ValueError(f"Unknown attack criterion '{criterion}'; choose one of {CRITERIA}.")


def ce_input_grad(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's per-step quantities: (logits, d sum CE(model(x), labels) / dx), both detached.

    Args:
        model: (B, C_in, H, W) -> (B, C) logits.
        x: (B, C_in, H, W) images (perturbed).
        labels: (B,) classes.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = model(x)
        (grad,) = torch.autograd.grad(F.cross_entropy(at_least_fp32(logits), labels, reduction="sum"), x)
    return logits.detach(), grad


def half_and_half_mask(batch: int, *, p: float = 0.5, device=None, generator=None) -> torch.Tensor:
    """(B,) bool: which examples are perturbed under half-and-half adversarial training."""
    device = torch.get_default_device() if device is None else torch.device(device)
    return torch.rand(batch, device=draw_device(generator, device), generator=generator).to(device) < p


def engine_attack(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float,
    steps: int,
    criterion: Criterion | Callable = "l2",
    overshoot: float = 1.0,
    momentum: float = 0.0,
    targeted: bool = False,
    affected: torch.Tensor | None = None,
    clip: bool = False,
    on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    grad_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    step_fn: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
    skip_unused_gradients: bool = False,
) -> torch.Tensor:
    """Run the paper's attack engine and return the perturbed images (detached).

    From delta = 0, each of T steps computes the cross-entropy gradient g w.r.t. the input and
    moves along d = g (or -g when ``targeted``) where the criterion holds, otherwise along
    -delta (pulling back toward the image); d is normalized to unit RMSE, optionally smoothed
    with momentum (m <- mu m + (1 - mu) d), and scaled by the falling step size of
    :func:`step_sizes`, so the path length is eps * overshoot.

    Args:
        model: (B, C_in, H, W) in [0, 1] -> (B, C) logits. Its train/eval mode is left as is.
        images: (B, C_in, H, W) in [0, 1].
        labels: (B,) classes: the true class, or the target class when ``targeted``.
        eps: perturbation budget (RMSE) > 0 for ``l2``; path length scale for the others.
        steps: T >= 0; T = 0 returns the images unchanged.
        criterion: see :func:`criterion_mask`.
        overshoot: multiplies the total path length (explanations use 5).
        momentum: mu in [0, 1).
        targeted: descend the target's cross-entropy instead of ascending the true class's.
        affected: (B,) bool; examples that are False stay unperturbed (half-and-half).
        clip: keep images + delta inside [0, 1] (off in the paper).
        on_step: optional hook ``f(t, logits, delta)`` called after each forward (for
            minimal-perturbation tracking); ``logits`` correspond to the current delta.
        grad_fn: ``f(x, labels) -> (logits, d sum CE(model(x), labels) / dx)`` for each step;
            default :func:`ce_input_grad` on ``model`` (eager autograd). Anything else, such as
            :func:`robustx.compiled.compiled_input_grad`, must compute the same thing.
        step_fn: a whole step instead of ``grad_fn`` and :func:`engine_update`:
            ``f(images, delta, mom, labels, ss, keep, **rule) -> (logits, new delta, new mom)``
            with rule = criterion, eps, momentum, targeted, clip (e.g.
            :func:`robustx.compiled.compiled_engine_step`, one compiled graph per step).
        skip_unused_gradients: run the model only on the examples that follow the gradient this
            step (not in the paper; same result up to float rounding). Criterion ``l2`` decides
            from delta alone, and an example pulled back along -delta reads neither its logits
            nor its gradient: in adversarial explanations about 43% of (example, step) pairs.
            Needs criterion ``l2``, no ``on_step`` and a model in eval mode (BatchNorm's batch
            statistics would change with the subset).
    Returns:
        (B, C_in, H, W) perturbed images.
    """
    if eps < 0:
        raise ValueError(f"attack eps must be >= 0, got {eps}; it is an RMSE in [0, 1] pixel space.")
    if steps < 0:
        raise ValueError(f"attack steps must be >= 0, got {steps}.")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"attack momentum must be in [0, 1), got {momentum}.")
    if grad_fn is not None and step_fn is not None:
        raise ValueError("engine_attack takes grad_fn or step_fn, not both: a step_fn computes its own gradient.")
    if skip_unused_gradients:
        if criterion != "l2" or on_step is not None:
            raise ValueError("skip_unused_gradients needs criterion 'l2' and no on_step: other criteria and on_step read every example's logits.")
        if getattr(model, "training", False):
            raise ValueError("skip_unused_gradients needs the model in eval mode: in train mode BatchNorm's batch statistics would change with the subset.")
    images = images.detach()
    if steps == 0 or eps == 0:
        return images
    delta = torch.zeros_like(images)
    mom = torch.zeros_like(images)
    keep = None if affected is None else affected.to(images.dtype).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    rule = dict(criterion=criterion, eps=eps, momentum=momentum, targeted=targeted, clip=clip)
    grad_step = grad_fn or (lambda x, y: ce_input_grad(model, x, y))

    def step(x, d, m, y, ss, k):  # -> (logits, new delta, new mom)
        if step_fn is not None:
            return step_fn(x, d, m, y, ss, k, **rule)
        logits, grad = grad_step(x + d, y)
        with torch.no_grad():
            return (logits, *engine_update(x, d, m, logits, grad, y, ss, k, **rule))

    for t, ss in enumerate(step_sizes(eps, steps, overshoot=overshoot)):
        if skip_unused_gradients:
            delta, mom = _step_following_rows(step, images, delta, mom, labels, ss, keep, rule, pad=step_fn is not None)
            continue
        logits, new_delta, mom = step(images, delta, mom, labels, ss, keep)
        if on_step is not None:
            with torch.no_grad():
                on_step(t, logits, delta)
        delta = new_delta
    return (images + delta).detach()


def _step_following_rows(step, images, delta, mom, labels, ss, keep, rule, *, pad: bool):
    """One ``l2`` engine step that runs ``step`` only on the rows following the gradient -> (delta, mom)."""
    with torch.no_grad():
        follow = criterion_mask("l2", None, labels, delta, eps=rule["eps"])  # (B,) needs no logits
        n = int(follow.sum())
    if n == follow.numel():
        return step(images, delta, mom, labels, ss, keep)[1:]
    with torch.no_grad():
        # Every row pulled back (zeros stand in for the gradient, which is not read there);
        # the following rows are overwritten below.
        new_delta, new_mom = engine_update(images, delta, mom, None, torch.zeros_like(delta), labels, ss, keep, **rule)
    if n == 0:
        return new_delta, new_mom
    idx = follow.nonzero()[:, 0]  # (n,)
    if pad and n == 1:
        # A compiled step specializes batch size 1; two copies of the row reuse the graph of the other sizes.
        idx = idx.repeat(2)  # (2,)
    # x[idx] keeps channels_last (index_select would not).
    _, d_sub, m_sub = step(images[idx], delta[idx], mom[idx], labels[idx], ss, None if keep is None else keep[idx])
    with torch.no_grad():
        new_delta[idx[:n]] = d_sub[:n]
        if rule["momentum"] > 0:  # with no momentum the buffer stays zeros (and may be ``mom`` itself)
            new_mom[idx[:n]] = m_sub[:n]
    return new_delta, new_mom


def engine_update(
    images: torch.Tensor,
    delta: torch.Tensor,
    mom: torch.Tensor,
    logits: torch.Tensor,
    grad: torch.Tensor,
    labels: torch.Tensor,
    ss: float | torch.Tensor,
    keep: torch.Tensor | None,
    *,
    criterion: Criterion | Callable,
    eps: float | torch.Tensor,
    momentum: float,
    targeted: bool,
    clip: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the engine's rule (see :func:`engine_attack`) -> (new delta, new momentum buffer).

    Args:
        images: (B, C, H, W) unperturbed images.
        delta: (B, C, H, W) perturbation the logits and gradient were computed at.
        mom: (B, C, H, W) momentum buffer (zeros at the start).
        logits: (B, num_classes) at images + delta.
        grad: (B, C, H, W) d sum CE(logits, labels) / d delta.
        labels: (B,) true or target classes.
        ss: this step's size (RMSE), a float or a 0-d tensor.
        keep: (B, 1, 1, 1) 0/1 mask of perturbed examples, or None for all.
    """
    follow = criterion_mask(criterion, logits, labels, delta, eps=eps)  # (B,)
    if targeted:
        grad = -grad
    direction = torch.where(follow.view(-1, 1, 1, 1), grad, -delta)
    direction = direction / (1e-8 + rmse(direction).view(-1, 1, 1, 1))
    if momentum > 0:
        mom = mom.mul(momentum).add(direction, alpha=1 - momentum)
        direction = mom
    if keep is not None:
        direction = direction * keep
    # alpha= for a float keeps the rounding of the in-place update this replaced; a traced step passes a tensor.
    delta = delta.add(direction, alpha=ss) if isinstance(ss, float) else delta + direction * ss
    if clip:
        delta = (images + delta).clamp(0, 1) - images
    return delta, mom


def pgd_l2(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float,
    steps: int = 7,
    step_size: float | None = None,
    random_start: bool = True,
    clip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PGD in an L2 ball (Madry et al. 2018) with the radius expressed as RMSE.

    Steepest ascent with L2-normalized gradient steps, projection onto ||delta||_2 <= eps *
    sqrt(D) (i.e. RMSE <= eps) and onto the valid image box.

    Args:
        model: classifier on [0, 1] images.
        images: (B, C_in, H, W) in [0, 1].
        labels: (B,) true classes.
        eps: radius as RMSE > 0.
        steps: iterations >= 1.
        step_size: RMSE per step (default 2.5 * eps / steps, as Madry et al.).
        random_start: start uniformly inside the ball.
        clip: keep images + delta in [0, 1].
    """
    if eps < 0:
        raise ValueError(f"PGD eps must be >= 0, got {eps}.")
    images = images.detach()
    if eps == 0 or steps == 0:
        return images
    alpha = 2.5 * eps / steps if step_size is None else step_size
    if random_start:
        on = draw_device(generator, images.device)
        delta = torch.randn(images.shape, device=on, generator=generator).to(images.device)
        n = images[0].numel()
        # Uniform in the ball: direction uniform on the sphere, radius ~ U^(1/n).
        radius = torch.rand(images.size(0), device=on, generator=generator).to(images.device) ** (1.0 / n)
        delta = delta / rmse(delta).view(-1, 1, 1, 1) * (eps * radius).view(-1, 1, 1, 1)
    else:
        delta = torch.zeros_like(images)
    if clip:
        delta = (images + delta).clamp(0, 1) - images
    loss_fn = lambda logits: F.cross_entropy(at_least_fp32(logits), labels, reduction="sum")  # noqa: E731
    return _l2_ascent(model, images, delta, loss_fn, eps=eps, steps=steps, alpha=alpha, clip=clip)


def trades_adversary(
    model: nn.Module,
    images: torch.Tensor,
    *,
    eps: float,
    steps: int = 7,
    step_size: float | None = None,
    clip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """TRADES inner maximization (Zhang et al. 2019), L2 version with RMSE radius.

    Maximizes KL(f(x) || f(x')) over ||x' - x|| <= eps starting from x + 0.001 * N(0, 1).
    """
    if eps < 0:
        raise ValueError(f"TRADES eps must be >= 0, got {eps}.")
    images = images.detach()
    if eps == 0 or steps == 0:
        return images
    alpha = 2.5 * eps / steps if step_size is None else step_size
    with torch.no_grad():
        p_clean = F.softmax(at_least_fp32(model(images)), dim=1)
    delta = 0.001 * torch.randn(images.shape, device=draw_device(generator, images.device), generator=generator).to(images.device)
    loss_fn = lambda logits: F.kl_div(F.log_softmax(at_least_fp32(logits), dim=1), p_clean, reduction="sum")  # noqa: E731
    return _l2_ascent(model, images, delta, loss_fn, eps=eps, steps=steps, alpha=alpha, clip=clip)


def _l2_ascent(model, images, delta, loss_fn, *, eps: float, steps: int, alpha: float, clip: bool) -> torch.Tensor:
    """Projected L2 steepest ascent of ``loss_fn(model(images + delta))`` in the RMSE ball of radius eps."""
    for _ in range(steps):
        delta.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(model(images + delta)), delta)
        with torch.no_grad():
            delta = l2_ball_step(images, delta, grad, alpha=alpha, eps=eps, clip=clip)
    return (images + delta).detach()


def l2_ball_step(images: torch.Tensor, delta: torch.Tensor, direction: torch.Tensor, *, alpha: float, eps: float, clip: bool) -> torch.Tensor:
    """One normalized step of RMSE ``alpha`` along ``direction``, projected onto the RMSE ball of radius ``eps`` -> new delta.

    The step of PGD-L2 and TRADES (ascent: ``direction`` = the loss gradient) and of the Grad-CAM
    manipulation attack (descent: its negative). With ``clip`` the result also keeps
    ``images + delta`` in [0, 1] (clipping only shrinks |delta|, so it stays inside the ball).

    Args:
        images: (B, C, H, W) in [0, 1]; delta, direction: (B, C, H, W).
        alpha: step length (RMSE) > 0; eps: ball radius (RMSE) > 0.
    """
    delta = delta + alpha * direction / (1e-12 + rmse(direction).view(-1, 1, 1, 1))
    scale = (eps / (1e-12 + rmse(delta))).clamp(max=1.0)
    delta = delta * scale.view(-1, 1, 1, 1)
    if clip:
        delta = (images + delta).clamp(0, 1) - images
    return delta
