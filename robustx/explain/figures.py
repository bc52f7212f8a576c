"""Figures of adversarial explanations next to the usual saliency baselines (matplotlib, Agg, no pyplot).

:func:`explanation_grid` draws, for every image, a row ``input | AE toward each target`` with
each AE panel captioned with its class (``AE -> dog``; ``AE -> cat (true)`` and ``AE -> dog
(second)`` for those columns) over ``p p_before -> p_after``, and under it a row of attribution
maps (Grad-CAM, integrated gradients, saliency, SmoothGrad, LIME, ...) for the image's true or
predicted class, with a shared colour bar (each map is scaled to its own maximum). It is pure: tensors and names in, a :class:`matplotlib.figure.Figure` out,
built on its own Agg canvas so no pyplot state is created or leaked. :func:`save_png` writes a
figure atomically (temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from torch import Tensor

from robustx.io.files import atomic_path

__all__ = ["BASELINE_TITLES", "MAP_COLORBAR_LABEL", "explanation_grid", "save_png"]

#: Display names of the attribution methods (robustx.explain.attribution.METHODS).
BASELINE_TITLES = {
    "ae": "AE |delta|",
    "gradcam": "Grad-CAM",
    "integrated_gradients": "Integrated grad.",
    "saliency": "Saliency",
    "smoothgrad": "SmoothGrad",
    "lime": "LIME",
}

#: What the colour of an attribution-map panel means (each map is divided by its own maximum).
MAP_COLORBAR_LABEL = "map / max (per image)"


def _name(c: int, class_names: Sequence[str] | None) -> str:
    return str(class_names[c]) if class_names is not None and 0 <= c < len(class_names) else str(c)


def _show_image(ax, x: Tensor) -> None:
    """Draw a (C, H, W) image in [0, 1] (clamped) on ax: gray for C = 1, RGB for C = 3."""
    x = x.detach().float().cpu().clamp(0, 1)
    if x.size(0) == 1:
        ax.imshow(x[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(x[:3].permute(1, 2, 0).numpy(), interpolation="nearest")  # (H, W, 3)


def _show_map(ax, m: Tensor):
    """Draw a (H, W) non-negative map scaled to its own maximum -> the AxesImage (colour range [0, 1])."""
    m = m.detach().float().cpu()
    top = float(m.max()) if m.numel() else 0.0
    return ax.imshow((m / top if top > 0 else m).numpy(), cmap="inferno", vmin=0, vmax=1, interpolation="nearest")


def _ae_caption(kind: str, cls: str, before: float, after: float) -> str:
    """``AE -> cls`` (``(true)`` / ``(second)`` added for those columns) over ``p before -> after``."""
    tag = f" ({kind})" if kind in ("true", "second") else ""
    return f"AE -> {cls}{tag}\np {before:.2f} -> {after:.2f}"


def _blank(ax) -> None:
    ax.set_axis_off()


def explanation_grid(
    images: Tensor,
    explanations: Tensor,
    targets: Tensor,
    prob_before: Tensor,
    prob_after: Tensor,
    *,
    class_names: Sequence[str] | None = None,
    kinds: Sequence[str] | None = None,
    preds: Tensor | None = None,
    pred_probs: Tensor | None = None,
    labels: Tensor | None = None,
    baselines: Mapping[str, Tensor] | None = None,
    baseline_targets: Tensor | None = None,
    row_titles: Sequence[str] | None = None,
    title: str | None = None,
    panel_inches: float = 1.25,
    fontsize: float = 6.5,
):
    """Grid of adversarial explanations (and baseline maps) of B images -> matplotlib Figure.

    Per image: a row ``input | AE(target 1) | ... | AE(target K)``, each AE captioned
    ``AE -> class`` (with ``(true)`` or ``(second)`` for those kinds of column) over
    ``p p_before -> p_after`` (the target's softmax probability on the image and on the AE),
    then, if ``baselines`` is given, a row of attribution maps for ``baseline_targets`` whose
    first panel names the class and holds the row's colour bar (:data:`MAP_COLORBAR_LABEL`).

    Args:
        images: (B, C, H, W) inputs in [0, 1], C = 1 or 3.
        explanations: (B, K, C, H, W) adversarial explanations (shown clamped to [0, 1]).
        targets: (B, K) int target class of each AE.
        prob_before: (B, K) target probability on the image.
        prob_after: (B, K) target probability on the AE.
        class_names: (num_classes,) names; indices are shown without them.
        kinds: (K,) column kinds shared by all images, e.g. ``AEResult.kinds[0]`` or :func:`robustx.explain.adversarial.resolve_target_columns`, or (B, K)
            per image, e.g. ``AEResult.kinds`` (``true``, ``second``, ``all``, ``class``; None:
            a padding slot, drawn blank).
        preds: (B,) predicted classes, shown over the input.
        pred_probs: (B,) their probabilities, shown with them.
        labels: (B,) true classes (None: unknown), shown over the input.
        baselines: method name -> (B, H, W) non-negative maps, drawn in this order (each scaled to its maximum).
        baseline_targets: (B,) the class the maps explain (shown in the row's first panel).
        row_titles: (B,) text left of each image row (e.g. file names).
        title: figure title.
        panel_inches: size of one panel.
        fontsize: caption font size.
    Returns:
        A :class:`matplotlib.figure.Figure` on an Agg canvas (not registered with pyplot).
    Raises:
        ValueError: inconsistent shapes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if images.dim() != 4 or explanations.dim() != 5:
        raise ValueError(
            f"images must be (B, C, H, W) and explanations (B, K, C, H, W), got {tuple(images.shape)} and {tuple(explanations.shape)}."
        )
    b, k = explanations.shape[:2]
    if images.size(0) != b or tuple(explanations.shape[2:]) != tuple(images.shape[1:]):
        raise ValueError(f"explanations {tuple(explanations.shape)} do not match images {tuple(images.shape)}; expected (B, K, C, H, W).")
    for name, t in (("targets", targets), ("prob_before", prob_before), ("prob_after", prob_after)):
        if tuple(t.shape) != (b, k):
            raise ValueError(f"{name} must be (B, K) = ({b}, {k}), got {tuple(t.shape)}.")
    kinds = list(kinds) if kinds is not None else ["class"] * k
    if kinds and all(isinstance(row, (list, tuple)) for row in kinds):  # (B, K) per image
        if len(kinds) != b or any(len(row) != k for row in kinds):
            raise ValueError(f"kinds per image must be (B, K) = ({b}, {k}), got {len(kinds)} rows of {[len(r) for r in kinds]}.")
        kinds_of = [list(row) for row in kinds]
    elif len(kinds) != k:
        raise ValueError(f"kinds has {len(kinds)} entries for K = {k} explanations per image; pass one per column.")
    else:
        kinds_of = [kinds] * b
    baselines = dict(baselines or {})
    for name, m in baselines.items():
        if tuple(m.shape) != (b, *images.shape[2:]):
            raise ValueError(f"baseline '{name}' maps must be (B, H, W) = ({b}, {images.size(2)}, {images.size(3)}), got {tuple(m.shape)}.")

    targets, prob_before, prob_after = targets.cpu(), prob_before.float().cpu(), prob_after.float().cpu()
    ncols = max(1 + k, 1 + len(baselines))
    rows_per_image = 2 if baselines else 1
    nrows = b * rows_per_image
    # Vertical layout in inches: panel titles (up to 3 lines) above each row, the figure title above all.
    top_in = 0.55 + (0.3 if title else 0.0)
    height = nrows * panel_inches * 1.18 + top_in - 0.35
    fig = Figure(figsize=(ncols * panel_inches, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for i in range(b):
        r = i * rows_per_image
        ax = axes[r, 0]
        _show_image(ax, images[i])
        lines = ["input"]
        if labels is not None:
            lines.append(f"label: {_name(int(labels[i]), class_names)}")
        if preds is not None:
            p = f" ({float(pred_probs[i]):.2f})" if pred_probs is not None else ""
            lines.append(f"pred: {_name(int(preds[i]), class_names)}{p}")
        ax.set_title("\n".join(lines), fontsize=fontsize)
        if row_titles is not None:
            ax.set_ylabel(str(row_titles[i]), fontsize=fontsize)
        for j in range(k):
            ax = axes[r, 1 + j]
            if kinds_of[i][j] is None:  # padding slot (a class shown in another column)
                _blank(ax)
                continue
            _show_image(ax, explanations[i, j])
            c = int(targets[i, j])
            ax.set_title(_ae_caption(kinds_of[i][j], _name(c, class_names), float(prob_before[i, j]), float(prob_after[i, j])),
                         fontsize=fontsize)
        for j in range(1 + k, ncols):
            _blank(axes[r, j])
        if baselines:
            r += 1
            ax = axes[r, 0]
            ax.set_axis_off()
            cls = _name(int(baseline_targets[i]), class_names) if baseline_targets is not None else "?"
            ax.text(0.5, 0.8, f"maps for\n{cls}", ha="center", va="center", fontsize=fontsize + 1, transform=ax.transAxes)
            for j, (name, maps) in enumerate(baselines.items()):
                mappable = _show_map(axes[r, 1 + j], maps[i])
                axes[r, 1 + j].set_title(BASELINE_TITLES.get(name, name), fontsize=fontsize)
            # One colour bar for the row (every map is drawn on [0, 1] with the same colour map).
            cax = ax.inset_axes([0.1, 0.38, 0.8, 0.1])
            cbar = fig.colorbar(mappable, cax=cax, orientation="horizontal", ticks=[0, 0.5, 1])
            cbar.ax.tick_params(labelsize=fontsize - 0.5, length=2, pad=1)
            cbar.set_label(MAP_COLORBAR_LABEL, fontsize=fontsize, labelpad=2)
            for j in range(1 + len(baselines), ncols):
                _blank(axes[r, j])
    if title:
        fig.suptitle(title, fontsize=fontsize + 2, y=1 - 0.06 / height, va="top")
    fig.subplots_adjust(left=0.03, right=0.99, bottom=0.01, top=1 - top_in / height, wspace=0.08, hspace=0.55)
    return fig


def save_png(fig, path: str | os.PathLike[str], *, dpi: int = 150, close: bool = False) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically (:func:`robustx.io.files.atomic_path`) -> path; ``close`` closes the figure."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        if close:
            import matplotlib.pyplot as plt

            plt.close(fig)
    return Path(path)
