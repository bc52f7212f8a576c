"""Any ImageFolder dataset (``root/train`` + ``root/val`` or ``root/test``), and ImageNet."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from robustx.utils import one_line

from .base import BaseImageDataModule, DataError

log = logging.getLogger(__name__)


class ConvertMode:
    """PIL image -> ``mode`` ('L' or 'RGB'); a class, not a lambda, so datasets pickle for workers."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, im: Image.Image) -> Image.Image:
        return im if im.mode == self.mode else im.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.mode!r})"


class ImageFolderDataModule(BaseImageDataModule):
    """Any ImageFolder dataset, e.g. a user's medical images.

    Layout: ``root/train/<class>/*`` and ``root/val/<class>/*`` and/or ``root/test/<class>/*``
    (validation uses val/ if present, else test/; test uses test/ if present, else val/).
    Images are converted to grayscale (``in_channels=1``) or RGB (3). Training (``augment``):
    RandomResizedCrop(image_size, scale) + horizontal flip (``hflip``); evaluation:
    Resize(image_size * 256/224) + CenterCrop(image_size). ``class_names`` default to the folder names.

    Args (besides :class:`~datamodules.base.BaseImageDataModule`'s):
        hflip: random horizontal flips in training (turn off for e.g. text or oriented scans).
        scale: RandomResizedCrop's area range.
    """

    cache_name = "imagefolder"
    dataset_name = "ImageFolder dataset"

    def __init__(self, *, hflip: bool = True, scale: Sequence[float] = (0.5, 1.0), **kwargs) -> None:
        super().__init__(**kwargs)
        self.hflip = bool(hflip)
        self.scale = (float(scale[0]), float(scale[1]))
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise DataError(f"data.scale must satisfy 0 < min <= max <= 1, got {list(scale)}.")

    def transforms(self):
        """(train transform, eval transform): PIL image -> float tensor (C, H, W) in [0, 1]."""
        from torchvision import transforms as T

        mode = ConvertMode("L" if self.in_channels == 1 else "RGB")
        resize = int(self.image_size * 256 / 224)
        evaluate = T.Compose([mode, T.Resize(resize), T.CenterCrop(self.image_size), T.ToTensor()])
        if not self.augment:
            return evaluate, evaluate
        train = [mode, T.RandomResizedCrop(self.image_size, scale=self.scale)]
        if self.hflip:
            train.append(T.RandomHorizontalFlip())
        return T.Compose([*train, T.ToTensor()]), evaluate

    def _root(self) -> Path:
        if not self.root:
            raise DataError(
                f"{self.dataset_name} location not set (data.root is null): set it to a folder with train/<class>/ and val/<class>/ images."
            )
        root = Path(self.root).expanduser()
        if not root.is_dir():
            raise DataError(
                f"{self.dataset_name} not found at '{root}': set data.root to a folder with train/<class>/ and val/<class>/ (or test/<class>/) images."
            )
        return root

    def _source_split(self, split: str) -> str:
        if split == "train":
            return "train"
        root = self._root()
        order = ("val", "test") if split == "val" else ("test", "val")
        for name in order:
            if (root / name).is_dir():
                return name
        raise DataError(f"no val/ or test/ folder in '{root}'; arrange evaluation images as val/<class>/*.jpg.")

    def _build_split(self, split: str) -> tuple[Dataset, int]:
        from torchvision.datasets import ImageFolder

        root = self._root()
        folder = root / split
        if not folder.is_dir():
            raise DataError(f"no {split}/ folder in '{root}'; arrange images as {split}/<class>/*.jpg.")
        train_tf, eval_tf = self.transforms()
        try:
            ds = ImageFolder(str(folder), transform=train_tf if split == "train" else eval_tf)
        except (FileNotFoundError, RuntimeError, OSError) as err:
            raise DataError(f"unusable image folder '{folder}' ({one_line(err)}); put images in {split}/<class>/.") from None
        if self.class_names is None:
            self.class_names = list(ds.classes)
        for other_split, other in self._splits.items():
            if getattr(other, "classes", None) != ds.classes:
                raise DataError(
                    f"'{folder}' and '{root / other_split}' have different class folders; make them match."
                )
        return ds, len(ds.classes)


class ImageNetDataModule(ImageFolderDataModule):
    """ImageNet as ImageFolder ``root/train`` and ``root/val`` (1000 classes).

    Training: RandomResizedCrop(224) (scale 0.08-1) + horizontal flip; evaluation: Resize(256) +
    CenterCrop(224). Mean/std default to ImageNet's.
    """

    cache_name = "imagenet"
    dataset_name = "ImageNet"

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("num_classes", 1000)
        kwargs.setdefault("image_size", 224)
        kwargs.setdefault("mean", [0.485, 0.456, 0.406])
        kwargs.setdefault("std", [0.229, 0.224, 0.225])
        kwargs.setdefault("scale", (0.08, 1.0))
        super().__init__(**kwargs)
