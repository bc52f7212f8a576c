"""Adversarial explanations (paper, Results, "Adversarial explanations").

An adversarial explanation (AE) of an image toward a class is the image moved, with the paper's
attack engine (:func:`robustx.attacks.engine_attack`), down the cross-entropy of that class
inside an RMSE budget rho: criterion L2 (follow the gradient while RMSE(delta) < rho, pull back
along -delta otherwise), T = 35 steps, falling step sizes summing to 5 * rho, no momentum. On a
robust network the AE shows what the network needs to see to call the image that class.

Every distinct (image, target) pair is one row of a single batch of at most B * K images, so one
call explains many images toward many classes with one engine run (optionally split into
chunks); a pair requested twice (``["true", "all"]``) is computed once. With
``all_skips_listed=True`` (what explain.py and the training callback use) ``"all"`` adds only
the classes that the spec's other items do not already name, so ``["true", "second", "all"]``
shows each class once: K = C columns instead of C + 2.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator, Sequence, Union

import torch
from torch import Tensor, nn

from robustx.attacks import engine_attack, rmse
from robustx.compiled import compiled_engine_step, compiled_forward
from robustx.utils import frozen_parameters, model_mode

__all__ = ["TargetSpec", "AEResult", "resolve_targets", "resolve_target_columns", "adversarial_explanations", "TARGET_KEYWORDS"]

log = logging.getLogger(__name__)

TargetSpec = Union[str, int, Sequence[Union[str, int]]]

#: Target keywords understood by :func:`resolve_targets` besides class indices and names.
TARGET_KEYWORDS = ("true", "second", "all")

#: Slack allowed on the final RMSE bound, relative to rho (rounding of images + delta).
_RHO_RTOL = 1e-4


def _choices(num_classes: int, class_names: Sequence[str] | None) -> str:
    """One-line description of the valid target values."""
    text = f"'true', 'second', 'all', an index in 0..{num_classes - 1}"
    if class_names:
        shown = ", ".join(class_names[:12]) + (", ..." if len(class_names) > 12 else "")
        text += f" or a class name ({shown})"
    else:
        text += " or a class name (pass class_names to use names)"
    return text


def _one_target(
    item: object,
    true_cls: Tensor,
    logits: Tensor,
    class_names: Sequence[str] | None,
) -> Tensor:
    """Resolve one element of a target spec -> (B, k) int64."""
    b, c = logits.shape
    if isinstance(item, str):
        if item == "true":
            return true_cls[:, None]
        if item == "second":
            masked = logits.detach().float().clone()
            masked.scatter_(1, true_cls[:, None], float("-inf"))
            return masked.argmax(1)[:, None]
        if item == "all":
            return torch.arange(c, device=logits.device).expand(b, c)
        if class_names is not None:
            if item in class_names:
                return torch.full((b, 1), list(class_names).index(item), dtype=torch.long, device=logits.device)
            lowered = [n.lower() for n in class_names]
            if lowered.count(item.lower()) == 1:
                return torch.full((b, 1), lowered.index(item.lower()), dtype=torch.long, device=logits.device)
        if item.strip().isdigit():
            return _one_target(int(item), true_cls, logits, class_names)
        raise ValueError(f"Unknown target '{item}'; choose {_choices(c, class_names)}.")
    if isinstance(item, (int, torch.Tensor)) and not isinstance(item, bool):
        if isinstance(item, torch.Tensor):
            if item.numel() != 1 or item.dtype.is_floating_point:
                raise ValueError(f"Bad target {item!r}; choose {_choices(c, class_names)}.")
            item = int(item)
        if not 0 <= item < c:
            raise ValueError(f"Target index {item} is out of range; choose {_choices(c, class_names)}.")
        return torch.full((b, 1), item, dtype=torch.long, device=logits.device)
    raise ValueError(f"Bad target {item!r} ({type(item).__name__}); choose {_choices(c, class_names)}.")


def _kind(item: object) -> str:
    """Column kind of one spec item: ``true``, ``second``, ``all`` or ``class`` (an index or a name)."""
    return item if isinstance(item, str) and item in TARGET_KEYWORDS else "class"


def resolve_target_columns(
    logits: Tensor,
    labels: Tensor | None,
    spec: TargetSpec,
    *,
    class_names: Sequence[str] | None = None,
    all_skips_listed: bool = False,
) -> tuple[Tensor, list[list[str | None]]]:
    """Target classes of every image and what each column is -> ((B, K) int64, B lists of K kinds).

    Like :func:`resolve_targets`, plus the kind of every column of every image: ``"true"``,
    ``"second"``, ``"all"`` or ``"class"`` (an index or a name), and ``None`` for a padding slot.

    With ``all_skips_listed`` the first ``"all"`` item expands, per image, to the classes in
    0..C-1 that the spec's other items (before or after it) do not name for that image, in
    ascending order, and any further ``"all"`` adds nothing: every class then appears once
    (``["true", "second", "all"]`` gives K = C: the true class, the second one, then the other
    C - 2). The other items are kept as given, even if two of them name the same class. Where
    images of one call leave different numbers of classes (a named class equal to the true or
    second class of some images only), the block has the largest number of columns and the
    shorter rows end with padding slots of kind ``None``; their targets repeat classes already
    listed for the image, so :func:`adversarial_explanations` computes nothing for them.
    Without ``all_skips_listed`` every ``"all"`` gives C columns (``["true", "second", "all"]``
    gives K = C + 2, the true and second classes twice).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, C), got shape {tuple(logits.shape)}.")
    b, c = logits.shape
    if class_names is not None and len(class_names) != c:
        raise ValueError(f"class_names has {len(class_names)} names but the model has {c} classes; pass one name per class.")
    if labels is None:
        true_cls = logits.detach().argmax(1)
    else:
        labels = torch.as_tensor(labels, device=logits.device)
        if labels.shape != (b,) or labels.dtype.is_floating_point:
            raise ValueError(f"labels must be (B,) = ({b},) int class indices, got {tuple(labels.shape)} {labels.dtype}.")
        if b and (labels.min() < 0 or labels.max() >= c):
            raise ValueError(f"labels must be class indices in 0..{c - 1}, got values in {int(labels.min())}..{int(labels.max())}.")
        true_cls = labels.long()
    if isinstance(spec, torch.Tensor) and spec.dim() == 1:
        spec = spec.tolist()
    items = [spec] if isinstance(spec, (str, int, torch.Tensor)) else list(spec)
    if not items:
        raise ValueError(f"Empty target list; choose {_choices(c, class_names)}.")
    blocks = [_one_target(it, true_cls, logits, class_names).long() for it in items]  # each (B, k_i)
    kinds = [_kind(it) for it in items]
    if all_skips_listed and "all" in kinds:
        listed = [blk for blk, kind in zip(blocks, kinds) if kind != "all"]
        shown = torch.zeros(b, c, dtype=torch.bool, device=logits.device)  # (B, C) classes named by the other items
        if listed:
            shown.scatter_(1, torch.cat(listed, 1), True)
        rest = c - shown.sum(1)  # (B,) classes left for "all"
        width = int(rest.max()) if b else c
        # Per image: the unlisted classes in ascending order, then the listed ones (padding, used only in short rows).
        order = torch.argsort(shown.long() * c + torch.arange(c, device=logits.device), dim=1)  # (B, C)
        first = kinds.index("all")
        blocks = [blk if kind != "all" else (order[:, :width] if j == first else order[:, :0])
                  for j, (blk, kind) in enumerate(zip(blocks, kinds))]
        pad = (torch.arange(width, device=logits.device) >= rest[:, None]).tolist()  # (B, width)
        per_image = []
        for i in range(b):
            row: list[str | None] = []
            for j, (blk, kind) in enumerate(zip(blocks, kinds)):
                if kind != "all":
                    row.append(kind)
                elif j == first:
                    row += [None if p else "all" for p in pad[i]]
            per_image.append(row)
    else:
        row = [kind for blk, kind in zip(blocks, kinds) for _ in range(blk.size(1))]
        per_image = [list(row) for _ in range(b)]
    return torch.cat(blocks, dim=1).long(), per_image


def resolve_targets(
    logits: Tensor,
    labels: Tensor | None,
    spec: TargetSpec,
    *,
    class_names: Sequence[str] | None = None,
    all_skips_listed: bool = False,
) -> Tensor:
    """Turn a target spec into the target classes of every image -> (B, K) int64.

    Args:
        logits: (B, C) the model's logits on the clean images (used by ``second`` and, without
            labels, by ``true``).
        labels: (B,) int true classes in 0..C-1, or None to use the predicted classes.
        spec: ``"true"`` (the label, or the predicted class without labels), ``"second"`` (the
            most confident class other than ``true``'s), ``"all"`` (0..C-1), an int class
            index, a class name (needs ``class_names``; exact, else unique case-insensitive
            match), or a list of these concatenated in order (``["true", "second", "all"]``
            gives K = C + 2).
        class_names: (C,) names of the classes.
        all_skips_listed: ``"all"`` adds only the classes the other items do not name
            (``["true", "second", "all"]`` then gives K = C); see :func:`resolve_target_columns`.
    Returns:
        (B, K) int64 target classes.
    Raises:
        ValueError: unknown names, out-of-range indices, empty lists, labels of the wrong shape.
    """
    return resolve_target_columns(logits, labels, spec, class_names=class_names, all_skips_listed=all_skips_listed)[0]


@dataclass
class AEResult:
    """Adversarial explanations of B images toward K targets each (see :func:`adversarial_explanations`)."""

    images: Tensor  # (B, K, C, H, W) the adversarial explanations
    targets: Tensor  # (B, K) int64
    prob_before: Tensor  # (B, K) softmax probability of the target on the clean image
    prob_after: Tensor  # (B, K) ... on the AE
    rmse: Tensor  # (B, K) RMSE(AE - image) in [0, 1] pixel space
    pred_before: Tensor  # (B,) predicted class on the clean image
    pred_after: Tensor  # (B, K) predicted class on the AE
    #: (B, K) kind of each column: "true", "second", "all", "class", or None for a padding slot
    #: (see :func:`resolve_target_columns`; its values repeat another column of the image).
    kinds: list[list[str | None]] | None = None


@contextmanager
def _prepared(model: nn.Module, channels_last: bool) -> Iterator[None]:
    """Eval mode, frozen parameters and (optionally) channels_last for the call; all restored afterwards.

    Parameters are frozen because the engine only needs input gradients: autograd then keeps
    no activations for weight gradients. channels_last is undone by putting the original
    tensors back (no copy, exact restoration of the model's memory format).
    """
    saved_params = [(p, p.data, p.grad, None if p.grad is None else p.grad.data) for p in model.parameters() if p.dim() == 4]
    saved_buffers = [
        (m, name, buf) for m in model.modules() for name, buf in m._buffers.items() if buf is not None and buf.dim() == 4
    ]
    try:
        with model_mode(model), frozen_parameters(model):
            if channels_last:
                model.to(memory_format=torch.channels_last)
            yield
    finally:
        if channels_last:
            for p, data, grad, grad_data in saved_params:
                p.data = data
                if grad is not None:
                    grad.data = grad_data
                p.grad = grad
            for m, name, buf in saved_buffers:
                m._buffers[name] = buf


def _check(images: Tensor, rho: float, steps: int, overshoot: float, chunk_size: int | None) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a 4-D (B, C, H, W) tensor in [0, 1], got {shape}; add a batch dimension with x[None].")
    if not images.dtype.is_floating_point:
        raise ValueError(f"images must be floating point in [0, 1], got {images.dtype}; use x.float() / 255.")
    if images.numel():
        lo, hi = float(images.min()), float(images.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(
                f"images must lie in [0, 1] (the models normalize inside), got values in [{lo:.3g}, {hi:.3g}]; pass unnormalized images."
            )
    if not rho > 0:
        raise ValueError(f"rho must be > 0 (an RMSE budget in [0, 1] pixel space; the paper uses 0.1), got {rho}.")
    if steps <= 0:
        raise ValueError(f"steps must be >= 1 (the paper uses 35), got {steps}.")
    if not overshoot > 0:
        raise ValueError(f"overshoot must be > 0 (the paper uses 5), got {overshoot}.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (image-target pairs per engine run) or None, got {chunk_size}.")


def _full_precision_logits(model: nn.Module, x: Tensor, chunk: int, *, compile: bool = False) -> Tensor:
    """fp32 logits of x in chunks, with autocast off even inside a caller's autocast region -> (N, C).

    ``compile`` runs the model through :func:`robustx.compiled.compiled_forward` (still fp32:
    about half the time of an eager forward at a batch of 10 on the project's CPU).
    """
    net = compiled_forward(model) if compile else model
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        return torch.cat([net(x[i : i + chunk]).float() for i in range(0, x.size(0), chunk)])


def adversarial_explanations(
    model: nn.Module,
    images: Tensor,
    labels: Tensor | None = None,
    *,
    targets: TargetSpec = "true",
    rho: float = 0.1,
    steps: int = 35,
    overshoot: float = 5.0,
    momentum: float = 0.0,
    clip: bool = False,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    compile: bool = False,
    chunk_size: int | None = None,
    class_names: Sequence[str] | None = None,
    skip_unused_gradients: bool = True,
    all_skips_listed: bool = False,
) -> AEResult:
    """Adversarial explanations of each image toward each target class (paper, "Adversarial explanations").

    For every (image, target) pair the attack engine descends the target's cross-entropy from
    the image with criterion L2 at eps = rho: it follows the gradient while RMSE(delta) < rho
    and pulls back along -delta otherwise, for ``steps`` falling steps whose sizes sum to
    ``overshoot * rho``. The pull-back rule alone can end a step above rho (a gradient step
    taken just below rho overshoots by up to one step size, and the last pull-back may not
    undo it), so the final delta is checked and, where RMSE(delta) > rho, scaled back onto the
    rho-ball; the reported ``rmse`` is then <= rho up to float rounding.

    Args:
        model: classifier taking (N, C, H, W) images in [0, 1] -> (N, num_classes) logits. It
            runs in eval mode with frozen parameters during the call; its mode, requires_grad
            flags and memory format are restored afterwards.
        images: (B, C, H, W) floats in [0, 1].
        labels: (B,) int true classes, or None (``"true"`` then means the predicted class).
        targets: see :func:`resolve_targets` (``"true"``, ``"second"``, ``"all"``, an index, a
            class name or a list of these); K targets per image.
        rho: RMSE budget > 0 in [0, 1] pixel space (paper: 0.1).
        steps: engine steps T >= 1 (paper: 35).
        overshoot: path length in units of rho (paper: 5).
        momentum: engine momentum in [0, 1) (paper: 0).
        clip: keep AEs inside [0, 1] (off in the paper).
        autocast_dtype: run the engine steps under ``torch.autocast`` with this dtype (e.g.
            torch.bfloat16: faster on CPUs with AVX-512 BF16 and on GPUs); the probabilities
            and predictions before/after are computed in full precision.
        channels_last: run in the channels_last memory format (model and inputs).
        compile: run each engine step (forward, input gradient and update) as one ``torch.compile``d
            graph (:func:`robustx.compiled.compiled_engine_step`). The first call per model and input shape compiles
            (tens of seconds on a CPU); later calls in this process reuse it, also after the
            weights change.
        chunk_size: at most this many (image, target) pairs per engine run (None: all B*K).
        class_names: (num_classes,) names, for targets given by name.
        skip_unused_gradients: each step, run the model only on the pairs that follow the
            gradient (RMSE(delta) < rho); the others are pulled back along -delta, which needs
            no forward. Same AEs up to float rounding, about 40% fewer image-steps with the
            paper's settings (:func:`robustx.attacks.engine_attack`). False: every pair every step.
        all_skips_listed: ``"all"`` adds only the classes that the other targets do not name,
            so every class is one column (``["true", "second", "all"]``: K = C, not C + 2); the
            AEs of the classes shown are the same either way. See :func:`resolve_target_columns`.
    Returns:
        :class:`AEResult` with (B, K, ...) tensors.
    Raises:
        ValueError: rho <= 0, steps <= 0, images not 4-D or outside [0, 1], bad targets.
    """
    _check(images, rho, steps, overshoot, chunk_size)
    images = images.detach()
    b = images.size(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with _prepared(model, channels_last):
        x = images.contiguous(memory_format=fmt)
        n_eval = chunk_size or max(b, 1)
        logits = _full_precision_logits(model, x, n_eval, compile=compile)  # (B, num_classes)
        tgt, kinds = resolve_target_columns(logits, labels, targets, class_names=class_names,
                                            all_skips_listed=all_skips_listed)  # (B, K), B lists of K
        k = tgt.size(1)
        probs = logits.softmax(1)
        prob_before = probs.gather(1, tgt)  # (B, K)
        pred_before = logits.argmax(1)  # (B,)

        # A pair asked for twice (e.g. "true" and "all") is explained once: rows are independent
        # in eval mode, so the duplicate would be the same AE at the same cost.
        num_classes = logits.size(1)
        keys = torch.arange(b, device=tgt.device)[:, None] * num_classes + tgt  # (B, K)
        uniq, inverse = torch.unique(keys.reshape(-1), return_inverse=True)  # (U,), (B*K,)
        x_rep = x[uniq // num_classes].contiguous(memory_format=fmt)  # (U, C, H, W)
        t_rep = uniq % num_classes  # (U,)
        n = x_rep.size(0)
        chunk = chunk_size or max(n, 1)
        ctx = torch.autocast(images.device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
        parts = []
        with torch.enable_grad():
            for i in range(0, n, chunk):
                with ctx:
                    parts.append(
                        engine_attack(
                            model, x_rep[i : i + chunk], t_rep[i : i + chunk], eps=rho, steps=steps, criterion="l2",
                            overshoot=overshoot, momentum=momentum, targeted=True, clip=clip,
                            step_fn=compiled_engine_step(model) if compile else None,  # one per engine run
                            skip_unused_gradients=skip_unused_gradients,
                        )
                    )
        ae = torch.cat(parts) if parts else x_rep.clone()  # (U, C, H, W)

        # Project onto the rho-ball where the last steps ended outside it (see the docstring).
        delta = (ae - x_rep).float()  # (U, C, H, W)
        r = rmse(delta)  # (U,)
        over = r > rho
        if over.any():
            log.debug("projected %d of %d AEs back onto the rho-ball (max RMSE %.4g > rho %.4g)", int(over.sum()), n, float(r.max()), rho)
            scale = torch.where(over, rho / r.clamp(min=1e-12), torch.ones_like(r))  # (U,)
            ae = x_rep + delta * scale.view(-1, 1, 1, 1)  # (U, C, H, W)
            if clip:
                ae = ae.clamp(0, 1)
        ae = ae.to(images.dtype).contiguous(memory_format=fmt)  # (U, C, H, W)
        logits_after = _full_precision_logits(model, ae, chunk, compile=compile)  # (U, num_classes)

    r = rmse((ae - x_rep).float())[inverse]  # (B*K,)
    prob_after = logits_after.softmax(1).gather(1, t_rep[:, None])[:, 0][inverse]  # (B*K,)
    logits_after = logits_after[inverse]  # (B*K, num_classes)
    ae = ae.contiguous()[inverse].reshape(b, k, *images.shape[1:])  # (B, K, C, H, W)
    return AEResult(
        images=ae,
        targets=tgt,
        prob_before=prob_before,
        prob_after=prob_after.reshape(b, k),  # (B, K)
        rmse=r.reshape(b, k),  # (B, K)
        pred_before=pred_before,
        pred_after=logits_after.argmax(1).reshape(b, k),  # (B, K)
        kinds=kinds,
    )
