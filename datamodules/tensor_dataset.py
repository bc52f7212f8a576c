"""In-memory uint8 image datasets with tensor transforms (fast on small CPUs)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


class UInt8ImageDataset(Dataset):
    """Images kept as one uint8 (N, C, H, W) tensor; items are (float (C, H, W) image in [0, 1], int label)."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, labels.long(), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i].float().div_(255)
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[i])


class PadCropFlip:
    """Pad, random crop back to the original size, optional random horizontal flip (tensor (C, H, W)).

    The paper's CIFAR-10 augmentation is ``PadCropFlip(4, flip=True, mode="replicate")``. Uses
    torch's global RNG, which DataLoader seeds per worker (and ``pl.seed_everything`` fixes).
    """

    def __init__(self, pad: int = 4, *, flip: bool = True, mode: str = "replicate") -> None:
        self.pad, self.flip, self.mode = int(pad), bool(flip), mode

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w = x.shape
        if self.pad > 0:
            x = F.pad(x[None], (self.pad,) * 4, mode=self.mode)[0]  # (C, H+2p, W+2p)
            i, j = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            x = x[:, i : i + h, j : j + w]
        if self.flip and torch.rand(()).item() < 0.5:
            x = x.flip(-1)
        return x.contiguous()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(pad={self.pad}, flip={self.flip}, mode={self.mode!r})"
