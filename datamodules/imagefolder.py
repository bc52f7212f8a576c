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


BAD_IMAGE_ACTIONS = ("error", "skip")


class BadImageError(DataError):
    """An image file in the dataset cannot be decoded (truncated, not an image, a decompression bomb)."""

    def __init__(self, message: str) -> None:
        # Raised in a DataLoader worker, it is re-raised in the main process with the worker's
        # traceback in its message: keep the last line, which is this one.
        if "Original Traceback" in message:
            message = [ln for ln in message.splitlines() if ln.strip()][-1].split(": ", 1)[-1]
        super().__init__(message)


def open_image(path: str) -> Image.Image:
    """PIL image of ``path``, fully decoded; :class:`BadImageError` naming the file if it cannot be."""
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated JPEG opens fine and fails only here
            return im.copy() if im.mode in ("L", "RGB") else im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadImageError(f"unreadable image '{path}' ({one_line(err, limit=120)}); remove or replace it, "
                            "or set data.bad_images=skip to leave such files out") from None


class CheckedImageFolder(Dataset):
    """torchvision's ImageFolder whose unreadable files are named (``error``) or left out (``skip``).

    With ``skip`` a bad file's index serves the next readable image of the split instead (so
    lengths, subsets and samplers stay as they are) and each bad file is logged once per process.
    """

    def __init__(self, folder: str, *, transform, bad_images: str = "error") -> None:
        from torchvision.datasets import ImageFolder

        self.images = ImageFolder(folder, transform=transform, loader=open_image)
        self.classes = self.images.classes
        self.bad_images = bad_images
        self.skipped: set[int] = set()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        if self.bad_images == "error":
            return self.images[index]
        for k in range(len(self.images)):
            i = (index + k) % len(self.images)
            try:
                return self.images[i]
            except BadImageError as err:
                if i not in self.skipped:
                    self.skipped.add(i)
                    log.warning("skipping %s (data.bad_images=skip; %d skipped in this process)", err, len(self.skipped))
        raise BadImageError(f"no readable image in '{self.images.root}'; check the files")


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
        bad_images: a file that cannot be decoded stops the run with one line naming it (``error``),
            or is left out with a warning (``skip``: its slot serves the next readable image).
    """

    cache_name = "imagefolder"
    dataset_name = "ImageFolder dataset"

    def __init__(self, *, hflip: bool = True, scale: Sequence[float] = (0.5, 1.0), bad_images: str = "error",
                 **kwargs) -> None:
        super().__init__(**kwargs)
        if bad_images not in BAD_IMAGE_ACTIONS:
            raise DataError(f"data.bad_images must be one of {BAD_IMAGE_ACTIONS}, got {bad_images!r}.")
        self.bad_images = bad_images
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
        root = self._root()
        folder = root / split
        if not folder.is_dir():
            raise DataError(f"no {split}/ folder in '{root}'; arrange images as {split}/<class>/*.jpg.")
        train_tf, eval_tf = self.transforms()
        try:
            ds = CheckedImageFolder(str(folder), transform=train_tf if split == "train" else eval_tf,
                                    bad_images=self.bad_images)
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
