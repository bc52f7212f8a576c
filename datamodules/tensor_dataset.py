"""In-memory uint8 image datasets with tensor transforms (fast on small CPUs)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


class UInt8ImageDataset(Dataset):
    """Images kept as a uint8 (N, C, H, W) tensor; items are (float image in [0, 1], label)."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        assert images.dtype == torch.uint8 and images.dim() == 4, images.shape
        assert len(images) == len(labels)
        self.images, self.labels, self.transform = images, labels.long(), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i].float().div_(255)
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[i])


class PadCropFlip:
    """The paper's CIFAR-10 augmentation: replicate-pad, random crop back to size, random h-flip."""

    def __init__(self, pad: int = 4, flip: bool = True) -> None:
        self.pad, self.flip = pad, flip

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w = x.shape
        if self.pad:
            x = F.pad(x[None], (self.pad,) * 4, mode="replicate")[0]  # (C, H+2p, W+2p)
            i, j = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            x = x[:, i : i + h, j : j + w]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x.contiguous()
