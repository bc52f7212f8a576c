"""Attribution maps: adversarial explanations next to the usual saliency baselines (captum).

Every method returns one non-negative importance map per image at the input's spatial size,
(B, H, W) float32, so AEs can be compared with Grad-CAM, integrated gradients, saliency,
SmoothGrad and LIME on equal terms (paper, Results, "Adversarial explanations", where AEs are
contrasted with saliency methods). The baselines are captum's implementations; this module only
chooses their settings and reduces their output to a per-pixel map.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import Tensor, nn

from robustx.explain.adversarial import adversarial_explanations
from robustx.utils import model_mode

__all__ = ["METHODS", "find_gradcam_layer", "attribution_maps", "slic_feature_mask"]

log = logging.getLogger(__name__)

METHODS = ("ae", "gradcam", "integrated_gradients", "saliency", "smoothgrad", "lime")

_POOLING = (
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.AvgPool2d,
    nn.MaxPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveMaxPool1d,
)


def _dummy_input(model: nn.Module) -> Tensor:
    """A (1, C, 64, 64) input in [0, 1] on the model's device, C from ``input_offset`` (else 3)."""
    offset = getattr(model, "input_offset", None)
    channels = int(offset.size(1)) if isinstance(offset, Tensor) and offset.dim() == 2 else 3
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.dtype.is_floating_point else torch.float32
    return torch.full((1, channels, 64, 64), 0.5, device=device, dtype=dtype)


def find_gradcam_layer(model: nn.Module, example_input: Tensor | None = None) -> nn.Module:
    """The Grad-CAM target layer: the last feature map (B, C, h, w), h, w > 1, before the pooling that feeds the classifier.

    One forward pass with hooks on every submodule records, in order of completion, each
    module's output. Candidates are modules called exactly once (a module reused inside a
    block, like torchvision's ReLU, is ambiguous for captum) that are not pooling layers and
    whose 4-D output has h, w > 1 and is not the output of a pooling layer; the last candidate
    wins, and a container that only passes on its last child's output yields that child. For
    PreActResNet this is the final BN + activation before global pooling, for SmallCNN the
    last conv block's activation, for torchvision ResNets the last residual block.

    Args:
        model: classifier taking (N, C, H, W) images in [0, 1].
        example_input: (N, C, H, W) input for the probing forward pass; default a grey
            (1, C, 64, 64) image with C from the model's ``input_offset``.
    Returns:
        The chosen submodule.
    Raises:
        ValueError: no submodule produces a spatial feature map.
    """
    x = _dummy_input(model) if example_input is None else example_input[:1].detach()
    calls: dict[nn.Module, int] = {}
    outputs: list[tuple[nn.Module, Tensor]] = []
    pooled: set[int] = set()

    def hook(module: nn.Module, _inp, out) -> None:
        calls[module] = calls.get(module, 0) + 1
        if isinstance(out, Tensor):
            if isinstance(module, _POOLING):
                pooled.add(id(out))
            outputs.append((module, out))

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    try:
        with model_mode(model), torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    best: tuple[nn.Module, Tensor] | None = None
    for module, out in outputs:
        if calls[module] != 1 or isinstance(module, _POOLING) or id(out) in pooled:
            continue
        if out.dim() != 4 or out.size(2) <= 1 or out.size(3) <= 1:
            continue
        if best is not None and out is best[1]:
            continue  # a container returning its child's output: keep the innermost module
        best = (module, out)
    if best is None:
        raise ValueError(
            "find_gradcam_layer found no submodule with a 4-D (B, C, h, w) output with h, w > 1; pass layer= explicitly."
        )
    return best[0]


def resolve_layer(model: nn.Module, layer: nn.Module | str | None, images: Tensor) -> nn.Module:
    if layer is None:
        return find_gradcam_layer(model, images)
    if isinstance(layer, nn.Module):
        return layer
    try:
        return model.get_submodule(layer)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        shown = ", ".join(names[-6:])
        raise ValueError(f"Unknown layer '{layer}'; use a dotted submodule name such as {shown} (see model.named_modules()).") from None


def slic_feature_mask(image: Tensor, n_segments: int) -> Tensor:
    """SLIC superpixels of one image as a captum feature mask -> (1, 1, H, W) int64 with ids 0..S-1.

    Args:
        image: (C, H, W) in [0, 1]; C = 3 is segmented in Lab colour (compactness 10, the
            scikit-image default), any other C as a (multichannel) intensity image with
            compactness 0.1, the matching scale for [0, 1] intensities (about 30-40 segments
            of 50 on Fashion-MNIST, 30 of 50 on CIFAR-10).
        n_segments: approximate number of superpixels (>= 1).

    On textureless noise, SLIC's connectivity clean-up can merge almost everything into one
    segment; while fewer than max(2, n_segments // 4) segments come out, compactness is
    raised 10x (up to 3 times), which moves SLIC toward a regular grid.
    """
    from skimage.segmentation import slic

    if n_segments < 1:
        raise ValueError(f"lime_segments must be >= 1, got {n_segments}.")
    arr = image.detach().float().cpu().clamp(0, 1).numpy()
    if arr.shape[0] == 1:
        data, kw, compactness = arr[0], {"channel_axis": None}, 0.1
    elif arr.shape[0] == 3:
        data, kw, compactness = arr.transpose(1, 2, 0), {"channel_axis": -1}, 10.0
    else:
        data, kw, compactness = arr.transpose(1, 2, 0), {"channel_axis": -1, "convert2lab": False}, 0.1
    wanted = max(2, n_segments // 4) if n_segments > 1 else 1
    for attempt in range(4):
        seg = slic(data, n_segments=n_segments, compactness=compactness * 10**attempt, start_label=0, **kw)
        _, ids = np.unique(seg, return_inverse=True)  # contiguous ids 0..S-1, as captum requires
        if ids.max() + 1 >= wanted:
            break
    return torch.from_numpy(ids.reshape(seg.shape).astype(np.int64))[None, None].to(image.device)  # (1, 1, H, W)


def _lime_model(num_features: int, device: torch.device | str = "cpu"):
    """captum's torch-trained least-squares surrogate, with training settings that converge for S features.

    captum's default surrogate (SkLearnLasso) needs scikit-learn, which robustx does not
    depend on; SGDLinearRegression is captum's own fit. Its defaults (100 epochs at lr 0.01)
    stop far from the least-squares solution, so the learning rate is set to 1 / (largest
    curvature) of LIME's design (S Bernoulli(0.5) features plus a bias: about S / 4 + 1.5) and
    the epochs to 10 (S + 6), enough for the slowest direction (curvature about 1/4); checked
    against a linear model, whose LIME weights are known exactly (tests/unit/test_attribution.py).
    The surrogate lives on ``device``, where captum puts LIME's samples (the images' device):
    captum builds its linear layer on the CPU and its ``device`` option moves only the data.
    """
    from captum._utils.models.linear_model import SGDLinearRegression

    settings = {"max_epoch": 10 * (num_features + 6), "initial_lr": 1.0 / (0.25 * num_features + 1.5),
                "patience": 50, "threshold": 1e-8}

    class _Converged(SGDLinearRegression):
        def fit(self, train_data, **kwargs):
            return super().fit(train_data, **{**settings, **kwargs})

        def _construct_model_params(self, *args, **kwargs):
            super()._construct_model_params(*args, **kwargs)
            self.to(device)

    return _Converged()


def _sum_abs_channels(attr: Tensor) -> Tensor:
    return attr.detach().float().abs().sum(1)  # (B, H, W)


def attribution_maps(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    *,
    method: str,
    layer: nn.Module | str | None = None,
    rho: float = 0.1,
    ae_steps: int = 35,
    ig_steps: int = 32,
    smoothgrad_samples: int = 16,
    smoothgrad_sigma: float = 0.15,
    lime_samples: int = 200,
    lime_segments: int = 50,
    generator_seed: int = 0,
) -> Tensor:
    """Per-pixel importance of each image for its target class -> (B, H, W) float32 >= 0.

    Methods (captum implementations; maps at the input's H, W):

    * ``ae``: adversarial explanation toward the target (:func:`adversarial_explanations`,
      rho, ``ae_steps``); map = per-pixel RMSE over channels of AE - image.
    * ``gradcam``: ``LayerGradCam`` at ``layer`` (default :func:`find_gradcam_layer`),
      upsampled bilinearly with ``LayerAttribution.interpolate``, ReLU.
    * ``integrated_gradients``: ``IntegratedGradients`` from a black (zeros) baseline with
      ``ig_steps`` steps; map = |attribution| summed over channels.
    * ``saliency``: ``Saliency`` (absolute input gradient) summed over channels.
    * ``smoothgrad``: ``NoiseTunnel(Saliency)``, ``smoothgrad_samples`` noisy copies with
      standard deviation ``smoothgrad_sigma`` (in [0, 1] pixel units); summed over channels.
    * ``lime``: ``Lime`` on SLIC superpixels (``lime_segments`` per image) with
      ``lime_samples`` perturbations (superpixels switched to black); map = each
      superpixel's surrogate weight for the target logit, clamped at 0.

    Args:
        model: classifier taking (B, C, H, W) images in [0, 1]; in eval mode during the call,
            its mode restored afterwards.
        images: (B, C, H, W) in [0, 1].
        targets: (B,) int64 class per image.
        method: one of :data:`METHODS`.
        layer: Grad-CAM layer (module or dotted name); ignored by other methods.
        generator_seed: seeds SmoothGrad's noise and LIME's sampling (the global RNG state is
            saved and restored), so maps are reproducible.
    Returns:
        (B, H, W) float32 non-negative maps.
    Raises:
        ValueError: unknown method or layer, bad shapes.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown attribution method '{method}'; choose one of {', '.join(METHODS)}.")
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W) in [0, 1], got {getattr(images, 'shape', type(images).__name__)}.")
    targets = torch.as_tensor(targets, device=images.device)
    if targets.shape != (images.size(0),) or targets.dtype.is_floating_point:
        raise ValueError(f"targets must be (B,) = ({images.size(0)},) int class indices, got {tuple(targets.shape)} {targets.dtype}.")
    targets = targets.long()
    images = images.detach()
    h, w = images.shape[-2:]
    with model_mode(model):
        maps = _compute(
            model, images, targets, method=method, layer=layer, rho=rho, ae_steps=ae_steps, ig_steps=ig_steps,
            smoothgrad_samples=smoothgrad_samples, smoothgrad_sigma=smoothgrad_sigma, lime_samples=lime_samples,
            lime_segments=lime_segments, generator_seed=generator_seed,
        )
    maps = maps.detach().float().clamp(min=0)
    assert maps.shape == (images.size(0), h, w), maps.shape
    return maps


def _compute(model, images, targets, *, method, layer, rho, ae_steps, ig_steps, smoothgrad_samples, smoothgrad_sigma,
             lime_samples, lime_segments, generator_seed) -> Tensor:
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Lime, NoiseTunnel, Saliency

    b, _, h, w = images.shape
    if method == "ae":
        res = adversarial_explanations(model, images, targets, targets="true", rho=rho, steps=ae_steps)
        diff = res.images[:, 0] - images  # (B, C, H, W)
        return diff.float().pow(2).mean(1).sqrt()  # (B, H, W)
    if method == "gradcam":
        target_layer = resolve_layer(model, layer, images)
        cam = LayerGradCam(model, target_layer).attribute(images, target=targets, relu_attributions=True)  # (B, 1, h', w')
        if cam.dim() != 4:
            raise ValueError(f"Grad-CAM layer output must be (B, C, h, w), got {tuple(cam.shape)}; pick a convolutional layer.")
        cam = LayerAttribution.interpolate(cam.float(), (h, w), interpolate_mode="bilinear")  # (B, 1, H, W)
        return torch.relu(cam.sum(1))  # (B, H, W)
    x = images.clone().requires_grad_(True)
    if method == "integrated_gradients":
        ig = IntegratedGradients(model)
        attr = ig.attribute(x, baselines=torch.zeros_like(images), target=targets, n_steps=ig_steps,
                            internal_batch_size=max(2 * b, min(b * ig_steps, 256)))
        return _sum_abs_channels(attr)
    if method == "saliency":
        return _sum_abs_channels(Saliency(model).attribute(x, target=targets, abs=True))
    with torch.random.fork_rng(devices=[images.device] if images.device.type == "cuda" else []):
        torch.manual_seed(generator_seed)
        if method == "smoothgrad":
            attr = NoiseTunnel(Saliency(model)).attribute(
                x, nt_type="smoothgrad", nt_samples=smoothgrad_samples, stdevs=smoothgrad_sigma, target=targets, abs=True,
                nt_samples_batch_size=max(1, min(smoothgrad_samples, 16)),
            )
            return _sum_abs_channels(attr)
        # lime: one surrogate per image, on that image's own superpixels.
        out = []
        for i in range(b):
            mask = slic_feature_mask(images[i], lime_segments)  # (1, 1, H, W)
            lime = Lime(model, interpretable_model=_lime_model(int(mask.max()) + 1, images.device))
            attr = lime.attribute(
                images[i : i + 1], target=targets[i : i + 1], feature_mask=mask, n_samples=lime_samples,
                perturbations_per_eval=min(lime_samples, 50), baselines=0.0, return_input_shape=True,
            )  # (1, C, H, W), each superpixel's weight on all its pixels and channels
            out.append(attr[:, 0].float())  # (1, H, W)
        return torch.cat(out)  # (B, H, W)
