"""Image classifiers that take [0, 1] images and normalize inside.

* :class:`PreActResNet` - the paper's pre-activation ResNet-(6n+2); ``resnet44`` has the exact
  parameter layout of the authors' published CIFAR-10 networks (``input_offset``, ``pipe.*``).
* :class:`SmallCNN` - a fast network for 28x28 inputs (Fashion-MNIST demos and tests).
* :class:`TorchvisionClassifier` - torchvision's ImageNet ResNets behind the same interface.

Every model carries an ``input_offset`` buffer of shape (2, C) = [mean, std] and accepts an
``activation`` of ``relu`` or ``hhrelu``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from robustx.layers import make_activation, swap_activations

__all__ = [
    "PreActResNet",
    "SmallCNN",
    "TorchvisionClassifier",
    "resnet44",
    "build_model",
    "MODEL_TARGETS",
    "ModelConfigError",
]


class ModelConfigError(ValueError):
    """A model configuration names an unknown model or has a bad value."""


class _Normalized(nn.Module):
    """Base class: stores [mean, std] as the ``input_offset`` buffer and normalizes inputs."""

    def _init_offset(self, mean: Sequence[float], std: Sequence[float], in_channels: int) -> None:
        mean, std = list(mean), list(std)
        if len(mean) != in_channels or len(std) != in_channels:
            raise ModelConfigError(
                f"mean/std need {in_channels} values (one per input channel), got {len(mean)}/{len(std)}."
            )
        if any(s <= 0 for s in std):
            raise ModelConfigError(f"std values must be > 0, got {std}.")
        self.register_buffer("input_offset", torch.tensor([mean, std], dtype=torch.float32))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.size(1) != self.input_offset.size(1):
            raise ValueError(
                f"expected images of shape (B, {self.input_offset.size(1)}, H, W) in [0, 1], got {tuple(x.shape)}."
            )
        offset = self.input_offset.to(x.dtype)
        # Out of place: x may be a leaf that the penalty differentiates against.
        return (x - offset[0].view(1, -1, 1, 1)) / offset[1].view(1, -1, 1, 1)


class _PreActBlock(nn.Module):
    """Pre-activation residual block; the shortcut (3x3 conv) sees the pre-activated input."""

    def __init__(self, nf_in: int, nf: int, stride: int, activation: str) -> None:
        super().__init__()
        self.pre = nn.Sequential(nn.BatchNorm2d(nf_in), make_activation(activation))
        self.main = nn.Sequential(
            nn.Conv2d(nf_in, nf, 3, padding=1, stride=stride, bias=False),
            nn.BatchNorm2d(nf),
            make_activation(activation),
            nn.Conv2d(nf, nf, 3, padding=1, bias=False),
        )
        self.shortcut = (
            nn.Conv2d(nf_in, nf, 3, padding=1, stride=stride, bias=False)
            if stride != 1 or nf_in != nf
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre(x)
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        return self.main(pre) + shortcut


class PreActResNet(_Normalized):
    """Pre-activation ResNet-(6n+2) of the paper (Methods, "Network architecture").

    A 3x3 stem conv, three stages of n blocks (strides 1, 2, 2), BN + activation, global
    average pooling and a 1x1 conv classifier. With ``depth=44`` and widths (16, 32, 64) the
    ``state_dict`` keys match the authors' CIFAR-10 checkpoints exactly.

    Args:
        depth: 6n+2 (20, 32, 44, 56, 110, ...).
        num_classes: C >= 2.
        in_channels: image channels.
        widths: features per stage.
        activation: ``relu`` or ``hhrelu``.
        mean, std: per-channel dataset statistics used to normalize [0, 1] inputs.
        zero_init_residual: zero the last conv of each block (arXiv:1812.01187), as the authors.
    """

    def __init__(
        self,
        *,
        depth: int = 44,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: Sequence[int] = (16, 32, 64),
        activation: str = "relu",
        mean: Sequence[float] = (0.4914, 0.4822, 0.4465),
        std: Sequence[float] = (0.247, 0.243, 0.261),
        zero_init_residual: bool = True,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ModelConfigError(f"PreActResNet depth must be 6n+2 (20, 32, 44, 56, 110...), got {depth}.")
        if num_classes < 2:
            raise ModelConfigError(f"num_classes must be >= 2, got {num_classes}.")
        self._init_offset(mean, std, in_channels)
        n = (depth - 2) // 6
        widths = list(widths)
        pipe: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)]
        ft = widths[0]
        for i, w in enumerate(widths):
            blocks = [
                _PreActBlock(ft if j == 0 else w, w, (1 if i == 0 else 2) if j == 0 else 1, activation)
                for j in range(n)
            ]
            pipe.append(nn.Sequential(*blocks))
            ft = w
        pipe += [
            nn.BatchNorm2d(ft),
            make_activation(activation),
            # Adaptive (parameter-free, like the authors' AvgPool2d(8)) so 28x28 inputs work too.
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(ft, num_classes, 1),
        ]
        self.pipe = nn.Sequential(*pipe)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, _PreActBlock):
                    nn.init.zeros_(m.main[-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pipe(self.normalize(x))  # (B, C, 1, 1)
        return out.flatten(1)  # (B, C)


def resnet44(**kwargs: Any) -> PreActResNet:
    """The paper's CIFAR-10 ResNet-44 (3 stages of 7 blocks, 16/32/64 features)."""
    return PreActResNet(depth=44, **kwargs)


class SmallCNN(_Normalized):
    """A small, fast CNN for 28x28 inputs: three 3x3 conv-BN-activation layers (two strided) and an MLP head.

    Args:
        num_classes: C >= 2.
        in_channels: image channels (1 for Fashion-MNIST).
        channels: features of the three convs.
        hidden: width of the hidden linear layer.
        activation: ``relu`` or ``hhrelu``.
        mean, std: dataset statistics used to normalize [0, 1] inputs.
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 64),
        hidden: int = 128,
        activation: str = "relu",
        mean: Sequence[float] = (0.2860,),
        std: Sequence[float] = (0.3530,),
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ModelConfigError(f"num_classes must be >= 2, got {num_classes}.")
        self._init_offset(mean, std, in_channels)
        c1, c2, c3 = channels
        # BatchNorm keeps pre-activations at unit scale: without it the half-Huber ReLU's
        # quadratic bowl (width 0.5) shrinks small signals layer after layer.
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1, bias=False),
            nn.BatchNorm2d(c1),
            make_activation(activation),
            nn.Conv2d(c1, c2, 3, padding=1, stride=2, bias=False),
            nn.BatchNorm2d(c2),
            make_activation(activation),
            nn.Conv2d(c2, c3, 3, padding=1, stride=2, bias=False),
            nn.BatchNorm2d(c3),
            make_activation(activation),
            # Pool to a fixed 4x4 grid so any input size >= 16 works.
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(
            nn.Flatten(1),  # (B, c3 * 16)
            nn.Linear(c3 * 16, hidden),
            make_activation(activation),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.normalize(x)))


class TorchvisionClassifier(_Normalized):
    """A torchvision classification model (``resnet18``, ``resnet50``, ...) that takes [0, 1] images.

    Args:
        arch: name of a torchvision.models constructor.
        num_classes: C >= 2.
        in_channels: 3 (ImageNet models).
        activation: ``relu`` or ``hhrelu`` (swaps every nn.ReLU).
        mean, std: dataset statistics (ImageNet by default).
    """

    def __init__(
        self,
        *,
        arch: str = "resnet18",
        num_classes: int = 1000,
        in_channels: int = 3,
        activation: str = "relu",
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
    ) -> None:
        super().__init__()
        import torchvision

        self._init_offset(mean, std, in_channels)
        try:
            ctor = getattr(torchvision.models, arch)
        except AttributeError:
            raise ModelConfigError(f"Unknown torchvision model '{arch}'; try resnet18 or resnet50.") from None
        self.net = ctor(weights=None, num_classes=num_classes)
        if activation != "relu":
            swap_activations(self.net, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


# Only these classes may be built from a config (Hydra or safetensors metadata): a config is
# data, and must never be able to import arbitrary code.
MODEL_TARGETS: dict[str, type[nn.Module] | Any] = {
    "robustx.models.PreActResNet": PreActResNet,
    "robustx.models.resnet44": resnet44,
    "robustx.models.SmallCNN": SmallCNN,
    "robustx.models.TorchvisionClassifier": TorchvisionClassifier,
}


def build_model(config: dict[str, Any]) -> nn.Module:
    """Build a model from a ``{"_target_": ..., **kwargs}`` dict restricted to :data:`MODEL_TARGETS`."""
    config = dict(config)
    target = config.pop("_target_", None)
    if target not in MODEL_TARGETS:
        raise ModelConfigError(
            f"Unknown model target '{target}'; choose one of {sorted(MODEL_TARGETS)} (see conf/model/)."
        )
    for key in [k for k in config if k.startswith("_")]:
        config.pop(key)
    try:
        return MODEL_TARGETS[target](**config)
    except TypeError as err:
        raise ModelConfigError(f"Bad arguments for {target}: {err}.") from None


