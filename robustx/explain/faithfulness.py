"""Faithfulness of attribution maps: deletion and insertion AUC (Petsiuk, Das & Saenko, "RISE", BMVC 2018).

Deletion: pixels are removed (replaced by a baseline image) in order of decreasing importance,
in ``steps`` equal steps, and the target class's softmax probability is recorded after each
step; the area under that curve over the removed fraction in [0, 1] is low when the map ranks
the pixels the model relies on first. Insertion: the reverse, starting from the baseline and
putting the image's pixels back in the same order; the area is high for a faithful map. RISE
deletes to black (zeros) and inserts into a blurred copy of the image; both baselines are
options here (``zero``, ``blur``, ``mean``).

Quantus (PixelFlipping / ROAD) was considered and not used: installing it adds pandas,
scikit-learn and opencv-python to the environment; these functions are small batched torch code.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["pixel_order", "baseline_images", "perturbation_curve", "deletion_auc", "insertion_auc", "random_maps", "auc"]

Baseline = Literal["zero", "blur", "mean"]


def pixel_order(maps: Tensor, *, seed: int = 0) -> Tensor:
    """Pixel indices by decreasing importance -> (B, H*W) int64; ties in random order (fixed by ``seed``).

    Random tie-breaking keeps flat regions of a map (e.g. Grad-CAM's zeros) from being removed
    in raster order, which would favour whatever sits at the top of the image.

    Args:
        maps: (B, H, W) importance maps.
        seed: seed of the tie-breaking permutation.
    """
    flat = maps.detach().flatten(1).float()  # (B, N)
    g = torch.Generator().manual_seed(seed)
    perm = torch.stack([torch.randperm(flat.size(1), generator=g) for _ in range(flat.size(0))]).to(flat.device)  # (B, N)
    shuffled = flat.gather(1, perm)
    order = shuffled.argsort(dim=1, descending=True, stable=True)
    return perm.gather(1, order)


def baseline_images(images: Tensor, kind: Baseline, *, blur_kernel: int = 11, blur_sigma: float = 5.0) -> Tensor:
    """The image that removed pixels are replaced with -> (B, C, H, W).

    Args:
        images: (B, C, H, W) in [0, 1].
        kind: ``zero`` (black, RISE's deletion), ``blur`` (Gaussian blur, RISE's insertion
            start; kernel 11, sigma 5 as in RISE) or ``mean`` (each image's per-channel mean).
        blur_kernel: odd Gaussian kernel size (clamped to the image size) for ``blur``.
        blur_sigma: Gaussian sigma in pixels for ``blur``.
    """
    if kind == "zero":
        return torch.zeros_like(images)
    if kind == "mean":
        return images.mean((2, 3), keepdim=True).expand_as(images).clone()
    if kind == "blur":
        from torchvision.transforms.functional import gaussian_blur

        k = min(int(blur_kernel), 2 * ((min(images.shape[-2:]) - 1) // 2) + 1)
        if k < 1 or k % 2 == 0 or not blur_sigma > 0:
            raise ValueError(f"blur needs an odd kernel >= 1 and sigma > 0, got kernel {blur_kernel} and sigma {blur_sigma}.")
        return gaussian_blur(images, [k, k], [float(blur_sigma)] * 2)
    raise ValueError(f"Unknown faithfulness baseline '{kind}'; choose zero, blur or mean.")


@torch.no_grad()
def perturbation_curve(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    *,
    mode: Literal["deletion", "insertion"],
    steps: int = 32,
    baseline: Baseline = "zero",
    blur_kernel: int = 11,
    blur_sigma: float = 5.0,
    batch_size: int = 512,
    seed: int = 0,
) -> Tensor:
    """Target-class probability as pixels are deleted or inserted in map order -> (B, steps + 1).

    Column k has round(k * N / steps) of the N = H * W pixels (all channels) switched: in
    ``deletion`` the most important ones are replaced by the baseline, in ``insertion`` the
    baseline shows the image's most important ones. Column 0 is the clean image (deletion) or
    the baseline (insertion).

    Args:
        model: classifier on (B, C, H, W) images in [0, 1], in eval mode.
        images: (B, C, H, W) in [0, 1].
        maps: (B, H, W) importance maps.
        targets: (B,) classes whose probability is tracked.
        mode: ``deletion`` or ``insertion``.
        steps: number of steps (>= 1).
        baseline: see :func:`baseline_images`.
        batch_size: perturbed images per forward pass.
        seed: tie-breaking seed of :func:`pixel_order`.
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"Unknown mode '{mode}'; choose deletion or insertion.")
    if steps < 1:
        raise ValueError(f"faithfulness steps must be >= 1, got {steps}.")
    b, c, h, w = images.shape
    if maps.shape != (b, h, w) or targets.shape != (b,):
        raise ValueError(f"need maps (B, H, W) = {(b, h, w)} and targets (B,), got {tuple(maps.shape)} and {tuple(targets.shape)}.")
    n = h * w
    base = baseline_images(images, baseline, blur_kernel=blur_kernel, blur_sigma=blur_sigma)
    rank = torch.empty(b, n, dtype=torch.long, device=images.device)
    order = pixel_order(maps, seed=seed).to(images.device)
    rank.scatter_(1, order, torch.arange(n, device=images.device).expand(b, n))  # rank[i, p]: position of pixel p
    counts = torch.round(torch.arange(steps + 1, device=images.device, dtype=torch.float64) * n / steps).long()  # (S+1,)
    probs = torch.empty(b, steps + 1, device=images.device)
    per_image = steps + 1
    imgs_per_chunk = max(1, batch_size // per_image)
    for i in range(0, b, imgs_per_chunk):
        sl = slice(i, i + imgs_per_chunk)
        switched = (rank[sl, None, :] < counts[None, :, None]).view(-1, per_image, 1, h, w)  # (b', S+1, 1, H, W)
        x, z = images[sl, None], base[sl, None]  # (b', 1, C, H, W)
        seq = torch.where(switched, z, x) if mode == "deletion" else torch.where(switched, x, z)  # (b', S+1, C, H, W)
        flat = seq.reshape(-1, c, h, w)
        logits = torch.cat([model(flat[j : j + batch_size]).float() for j in range(0, flat.size(0), batch_size)])
        p = logits.softmax(1).view(-1, per_image, logits.size(1))  # (b', S+1, K)
        probs[sl] = p.gather(2, targets[sl].long().view(-1, 1, 1).expand(-1, per_image, 1))[..., 0]
    return probs


def auc(curve: Tensor) -> Tensor:
    """Trapezoidal area under (B, S + 1) curves sampled evenly on [0, 1] -> (B,)."""
    s = curve.size(1) - 1
    return (curve.sum(1) - 0.5 * (curve[:, 0] + curve[:, -1])) / s


def deletion_auc(model: nn.Module, images: Tensor, maps: Tensor, targets: Tensor, *, steps: int = 32, baseline: Baseline = "zero",
                 **kwargs) -> Tensor:
    """Deletion AUC (Petsiuk et al. 2018): area under the probability curve as important pixels are removed -> (B,); lower is more faithful.

    Args:
        model, images (B, C, H, W), maps (B, H, W), targets (B,): see :func:`perturbation_curve`.
        steps: deletion steps; baseline: replacement image (RISE: ``zero``).
        **kwargs: blur_kernel, blur_sigma, batch_size, seed.
    """
    return auc(perturbation_curve(model, images, maps, targets, mode="deletion", steps=steps, baseline=baseline, **kwargs))


def insertion_auc(model: nn.Module, images: Tensor, maps: Tensor, targets: Tensor, *, steps: int = 32, baseline: Baseline = "blur",
                  **kwargs) -> Tensor:
    """Insertion AUC (Petsiuk et al. 2018): area under the probability curve as important pixels are put back -> (B,); higher is more faithful.

    Args:
        model, images (B, C, H, W), maps (B, H, W), targets (B,): see :func:`perturbation_curve`.
        steps: insertion steps; baseline: starting image (RISE: ``blur``).
        **kwargs: blur_kernel, blur_sigma, batch_size, seed.
    """
    return auc(perturbation_curve(model, images, maps, targets, mode="insertion", steps=steps, baseline=baseline, **kwargs))


def random_maps(shape: tuple[int, int, int], *, seed: int = 0, device: torch.device | str | None = None) -> Tensor:
    """Uniform random (B, H, W) maps: the no-information reference for deletion and insertion AUC."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g).to(device)
