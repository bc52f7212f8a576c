"""Figures of the invalidation study (study.py): map grids and the manipulation curve; PNGs written atomically."""

from __future__ import annotations

import logging

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from robustx.explain.figures import save_png

__all__ = ["MAP_COLORBAR_LABEL", "invalidation_grid", "manipulation_plot", "save_figure"]

log = logging.getLogger(__name__)

_METHOD_LABELS = {"ae": "AE", "gradcam": "Grad-CAM", "integrated_gradients": "IG", "saliency": "saliency",
                  "smoothgrad": "SmoothGrad", "lime": "LIME"}

#: What a map panel's colour means: each map is divided by its own maximum (as in robustx.explain.figures).
MAP_COLORBAR_LABEL = "map / max (per image)"


def save_figure(fig, png: str | Path, *, dpi: int = 110) -> Path:
    """Write a matplotlib figure to ``png`` atomically and close it (:func:`robustx.explain.figures.save_png`)."""
    return save_png(fig, png, dpi=dpi, close=True)


def _rgb(img: Tensor):
    """(C, H, W) image -> (H, W, 3) numpy in [0, 1] for imshow (clipped; grey images repeated)."""
    x = img.detach().float().cpu().clamp(0, 1)
    if x.size(0) == 1:
        x = x.expand(3, -1, -1)
    return x.permute(1, 2, 0).numpy()


def _norm(m: Tensor):
    """(H, W) map scaled to [0, 1] by its maximum (a zero map stays zero)."""
    m = m.detach().float().cpu()
    return (m / m.max().clamp(min=1e-12)).numpy()


def invalidation_grid(
    png: str | Path,
    *,
    clean: Tensor,
    adversarial: Tensor,
    maps_clean: Mapping[str, Tensor],
    maps_adv: Mapping[str, Tensor],
    labels: Sequence[int],
    preds: Sequence[int],
    r: Sequence[float],
    class_names: Sequence[str] | None = None,
    title: str = "",
) -> Path:
    """One row per image: clean | adversarial | for each method the clean map (true class) and the map of the new class.

    Each map is scaled to its own maximum and drawn on [0, 1] with one colour map; every row
    ends with a colour bar saying so (``map / max (per image)``).

    Args:
        png: output path.
        clean: (N, C, H, W) clean images in [0, 1].
        adversarial: (N, C, H, W) minimally perturbed images.
        maps_clean: {method: (N, H, W)} maps of the true class on the clean images.
        maps_adv: {method: (N, H, W)} maps of the new predicted class on the adversarial images.
        labels, preds: (N,) true and new classes; r: (N,) perturbation RMSEs.
        class_names: names for the titles.
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(maps_clean)
    n = clean.size(0)
    if n == 0:
        raise ValueError("invalidation_grid needs at least one image; the study found no changed prediction to show.")
    name = lambda c: class_names[c] if class_names else str(c)  # noqa: E731
    cols = 2 + 2 * len(methods)
    bar = 1 if methods else 0  # a narrow last column for each row's colour bar
    fig, axes = plt.subplots(n, cols + bar, figsize=(1.25 * cols + 0.55 * bar, 1.45 * n + 0.5), squeeze=False,
                             gridspec_kw={"width_ratios": [1] * cols + [0.08] * bar})
    for i in range(n):
        row = axes[i]
        row[0].imshow(_rgb(clean[i]))
        row[0].set_title(f"clean: {name(labels[i])}", fontsize=6)
        row[1].imshow(_rgb(adversarial[i]))
        row[1].set_title(f"adv: {name(preds[i])}\nRMSE {r[i]:.4f}", fontsize=6)
        for k, m in enumerate(methods):
            a, b = row[2 + 2 * k], row[3 + 2 * k]
            a.imshow(_norm(maps_clean[m][i]), cmap="inferno", vmin=0, vmax=1)
            b.imshow(_norm(maps_adv[m][i]), cmap="inferno", vmin=0, vmax=1)
            a.set_title(f"{_METHOD_LABELS.get(m, m)}\n{name(labels[i])} (clean)", fontsize=6)
            b.set_title(f"{_METHOD_LABELS.get(m, m)}\n{name(preds[i])} (adv)", fontsize=6)
    for ax in axes[:, :cols].flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if bar:
        mappable = axes[0, cols - 1].images[0]  # every map: inferno on [0, 1]
        for i in range(n):
            cbar = fig.colorbar(mappable, cax=axes[i, cols], ticks=[0, 0.5, 1])
            cbar.ax.tick_params(labelsize=5, length=2, pad=1)
            cbar.set_label(MAP_COLORBAR_LABEL, fontsize=5.5, labelpad=2)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, png)


def manipulation_plot(png: str | Path, rows_by_network: Mapping[str, Sequence[Mapping[str, Any]]], *,
                      metric: str = "spearman_new_class") -> Path:
    """Grad-CAM similarity (mean and 95% CI over successful images) and success rate against the RMSE budget.

    Args:
        png: output path.
        rows_by_network: {network: rows of :func:`robustx.explain.manipulation.summarize_manipulation`}.
        metric: similarity metric on the left panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_r) = plt.subplots(1, 2, figsize=(10, 3.8))
    styles = {"map_preserving": "-o", "plain": "--s"}
    for k, (net, rows) in enumerate(rows_by_network.items()):
        color = f"C{k}"
        for variant in dict.fromkeys(r["variant"] for r in rows):
            sub = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["budget"])
            b = [r["budget"] for r in sub]
            mean = torch.tensor([r[metric]["mean"] for r in sub], dtype=torch.float64)
            lo = torch.tensor([r[metric]["ci_low"] for r in sub], dtype=torch.float64)
            hi = torch.tensor([r[metric]["ci_high"] for r in sub], dtype=torch.float64)
            label = f"{net}, {variant.replace('_', '-')}"
            ax_s.errorbar(b, mean.numpy(), yerr=torch.stack([(mean - lo).clamp(min=0), (hi - mean).clamp(min=0)]).nan_to_num().numpy(),
                          fmt=styles.get(variant, "-^"), color=color, capsize=3, label=label, ms=4)
            ax_r.plot(b, [r["success_rate"] for r in sub], styles.get(variant, "-^"), color=color, label=label, ms=4)
    ax_s.set_xscale("log")
    ax_r.set_xscale("log")
    ax_s.set_xlabel("perturbation RMSE budget")
    ax_r.set_xlabel("perturbation RMSE budget")
    ax_s.set_ylabel(f"Grad-CAM {metric.replace('_', ' ')}\n(new class, manipulated vs clean; successes)")
    ax_r.set_ylabel("success rate (prediction changed)")
    ax_s.set_ylim(-1.05, 1.05)
    ax_r.set_ylim(-0.02, 1.02)
    ax_s.axhline(0, color="gray", lw=0.5)
    ax_s.legend(fontsize=7)
    ax_r.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, png)
