"""CIFAR-10 (torchvision format, ImageFolder tree or .tar.gz), ImageNet and any ImageFolder dataset."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .base import BaseImageDataModule, DataError
from .tensor_dataset import PadCropFlip, UInt8ImageDataset

log = logging.getLogger(__name__)

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMG_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def cache_root() -> Path:
    return Path(os.environ.get("ROBUSTX_CACHE", "~/.cache/robustx")).expanduser() / "datasets"


def _decode(data: bytes, name: str, mode: str = "RGB") -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert(mode), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"unreadable image '{name}' ({err}); remove or replace it.") from None


def _to_arrays(items: list[tuple[str, str, bytes]], classes: list[str], source: str) -> dict[str, np.ndarray]:
    """items: (split, class, bytes) -> {split_x: (N, 3, H, W) uint8, split_y: (N,)}."""
    out: dict[str, list] = {}
    for split, cls, data in items:
        arr = _decode(data, f"{source}:{split}/{cls}")
        out.setdefault(f"{split}_x", []).append(arr.transpose(2, 0, 1))  # (3, H, W)
        out.setdefault(f"{split}_y", []).append(classes.index(cls))
    return {k: np.stack(v) if k.endswith("_x") else np.asarray(v, dtype=np.int64) for k, v in out.items()}


def _read_tar(path: Path, classes: list[str]) -> dict[str, np.ndarray]:
    items = []
    try:
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                if not m.isfile() or not m.name.lower().endswith(IMG_EXT):
                    continue
                parts = Path(m.name).parts
                if len(parts) < 3 or parts[-3] not in ("train", "test") or parts[-2] not in classes:
                    continue
                f = tf.extractfile(m)
                items.append((parts[-3], parts[-2], f.read() if f else b""))
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"corrupt archive '{path}' ({err}); re-download it or point data.root elsewhere.") from None
    items.sort(key=lambda t: (t[0], classes.index(t[1])))
    return _to_arrays(items, classes, str(path))


def _read_tree(root: Path, classes: list[str]) -> dict[str, np.ndarray]:
    items = []
    for split in ("train", "test"):
        for cls in classes:
            for f in sorted((root / split / cls).glob("*")):
                if f.suffix.lower() in IMG_EXT:
                    items.append((split, cls, f.read_bytes()))
    return _to_arrays(items, classes, str(root))


def _cached(key_src: list[Path], build) -> dict[str, np.ndarray]:
    """Decode once, then reuse .npy files (no pickle) keyed by the sources' paths, sizes and mtimes."""
    h = hashlib.sha1()
    for p in key_src:
        st = p.stat()
        h.update(f"{p.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode())
    d = cache_root() / f"cifar10-{h.hexdigest()[:16]}"
    names = ["train_x", "train_y", "test_x", "test_y"]
    if all((d / f"{n}.npy").is_file() for n in names):
        try:
            return {n: np.load(d / f"{n}.npy", allow_pickle=False) for n in names}
        except (OSError, ValueError):
            log.warning("cache at %s is corrupt; rebuilding it", d)
    arrays = build()
    missing = [n for n in names if n not in arrays]
    if missing:
        raise DataError(f"no {missing[0].split('_')[0]}/ images found in {key_src[0]}; expected train/<class>/*.jpg and test/<class>/*.jpg.")
    d.mkdir(parents=True, exist_ok=True)
    for n in names:
        tmp = d / f"{n}.tmp.npy"
        np.save(tmp, arrays[n], allow_pickle=False)
        os.replace(tmp, d / f"{n}.npy")
    log.info("cached decoded CIFAR-10 at %s", d)
    return arrays


class CIFAR10DataModule(BaseImageDataModule):
    """CIFAR-10 from torchvision's format, an ImageFolder tree with train/ and test/, or .tar.gz of one.

    Training augmentation (paper): replicate-pad by 4, random 32x32 crop, horizontal flip.
    """

    def __init__(self, *, download: bool = False, **kwargs) -> None:
        kwargs.setdefault("class_names", CIFAR10_CLASSES)
        super().__init__(**kwargs)
        self.download = download

    def _load_arrays(self) -> dict[str, np.ndarray]:
        hint = (
            "set data.root to a torchvision CIFAR-10 folder, an ImageFolder tree with train/ and test/, "
            "or a .tar.gz of one (e.g. ../shared/datasets/cifar10-jpeg)"
        )
        if not self.root:
            raise DataError(f"CIFAR-10 location not set: {hint}.")
        root = Path(os.path.expanduser(str(self.root)))
        if root.is_file() and root.name.endswith((".tar.gz", ".tgz", ".tar")):
            return _cached([root], lambda: _read_tar(root, CIFAR10_CLASSES))
        if root.is_dir():
            if (root / "cifar-10-batches-py").is_dir() or (root / "data_batch_1").is_file() or self.download:
                return self._torchvision(root)
            tars = [root / "train.tar.gz", root / "test.tar.gz"]
            if all(t.is_file() for t in tars):
                def build():
                    out = {}
                    for t in tars:
                        out.update(_read_tar(t, CIFAR10_CLASSES))
                    return out
                return _cached(tars, build)
            if (root / "train").is_dir() and (root / "test").is_dir():
                return _cached([root / "train", root / "test"], lambda: _read_tree(root, CIFAR10_CLASSES))
        raise DataError(f"CIFAR-10 not found at '{root}': {hint}.")

    def _torchvision(self, root: Path) -> dict[str, np.ndarray]:
        import torchvision

        base = root.parent if root.name == "cifar-10-batches-py" else root
        try:
            sets = {s: torchvision.datasets.CIFAR10(str(base), train=(s == "train"), download=self.download) for s in ("train", "test")}
        except RuntimeError as err:
            raise DataError(f"CIFAR-10 (torchvision format) unusable at '{base}' ({err}); set data.download=true or fix data.root.") from None
        return {
            **{f"{s}_x": ds.data.transpose(0, 3, 1, 2).copy() for s, ds in sets.items()},  # (N, 3, 32, 32)
            **{f"{s}_y": np.asarray(ds.targets, dtype=np.int64) for s, ds in sets.items()},
        }

    def _make_datasets(self):
        a = self._load_arrays()
        aug = PadCropFlip(pad=4, flip=True) if self.augment else None
        train = UInt8ImageDataset(torch.from_numpy(a["train_x"]), torch.from_numpy(a["train_y"]), aug)
        test = UInt8ImageDataset(torch.from_numpy(a["test_x"]), torch.from_numpy(a["test_y"]))
        found = int(max(a["train_y"].max(), a["test_y"].max())) + 1
        return train, test, found


class ImageFolderDataModule(BaseImageDataModule):
    """Any ImageFolder dataset: ``root/train/<class>/*`` and ``root/val/<class>/*`` (or ``root/test``).

    Training: RandomResizedCrop(image_size, scale) + optional horizontal flip; evaluation: resize to
    image_size * 256/224 and center-crop. ``in_channels`` 1 converts to grayscale, 3 to RGB.
    """

    def __init__(self, *, hflip: bool = True, scale: tuple[float, float] = (0.5, 1.0), **kwargs) -> None:
        super().__init__(**kwargs)
        self.hflip, self.scale = hflip, tuple(scale)

    def _transforms(self):
        from torchvision import transforms as T

        mode = "L" if self.in_channels == 1 else "RGB"
        to_mode = T.Lambda(lambda im: im.convert(mode))
        train = [to_mode, T.RandomResizedCrop(self.image_size, scale=self.scale)]
        if self.hflip:
            train.append(T.RandomHorizontalFlip())
        train.append(T.ToTensor())
        resize = int(round(self.image_size * 256 / 224))
        test = [to_mode, T.Resize(resize), T.CenterCrop(self.image_size), T.ToTensor()]
        return T.Compose(train if self.augment else test), T.Compose(test)

    def _make_datasets(self):
        from torchvision.datasets import ImageFolder

        if not self.root:
            raise DataError("data.root is not set: point it at a folder with train/<class>/ and val/<class>/ images.")
        root = Path(os.path.expanduser(str(self.root)))
        val_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
        if not (root / "train").is_dir() or val_dir is None:
            raise DataError(f"no train/ and val/ (or test/) folders in '{root}'; arrange images as train/<class>/*.jpg and val/<class>/*.jpg.")
        tr_t, te_t = self._transforms()
        try:
            train, test = ImageFolder(str(root / "train"), tr_t), ImageFolder(str(val_dir), te_t)
        except (FileNotFoundError, RuntimeError) as err:
            raise DataError(f"bad image folder under '{root}': {err}") from None
        if train.classes != test.classes:
            raise DataError(f"train/ and {val_dir.name}/ in '{root}' have different class folders; make them match.")
        self.class_names = self.class_names or list(train.classes)
        return train, test, len(train.classes)


class ImageNetDataModule(ImageFolderDataModule):
    """ImageNet as ImageFolder ``train/`` and ``val/``: RandomResizedCrop 224 + flip; val resize 256, center crop 224."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("num_classes", 1000)
        kwargs.setdefault("image_size", 224)
        kwargs.setdefault("mean", (0.485, 0.456, 0.406))
        kwargs.setdefault("std", (0.229, 0.224, 0.225))
        super().__init__(scale=(0.08, 1.0), **kwargs)
