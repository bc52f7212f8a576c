"""CIFAR-10 from torchvision's format, an ImageFolder tree with train/ and test/, or .tar.gz archives."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from robustx.utils import one_line

from .base import BaseImageDataModule, DataError
from .cache import (
    MARKER,
    TAR_SUFFIXES,
    arrays_ready,
    extract_once,
    file_signature,
    is_tarball,
    load_arrays,
    save_arrays,
    source_dir,
)
from .tensor_dataset import PadCropFlip, UInt8ImageDataset

log = logging.getLogger(__name__)

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMG_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
HINT = "set data.root to a torchvision CIFAR-10 folder, an ImageFolder tree with train/ and test/, or a .tar.gz of one"


def _class_dirs(split_dir: Path) -> dict[str, Path]:
    return {p.name: p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}


def _image_files(class_dir: Path) -> list[Path]:
    return sorted(
        p for p in class_dir.iterdir() if p.suffix.lower() in IMG_EXT and not p.name.startswith(".") and p.is_file()
    )


def check_classes(split_dir: Path, classes: list[str]) -> dict[str, Path]:
    """Class folders of ``split_dir``, which must be exactly ``classes`` (any order on disk)."""
    found = _class_dirs(split_dir)
    if set(found) != set(classes):
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        raise DataError(
            f"'{split_dir}' does not hold the {len(classes)} CIFAR-10 class folders (missing {missing}, unexpected {extra}); "
            "fix the tree, or use ImageFolderDataModule for other datasets."
        )
    return found


def tree_signature(split_dir: Path, classes: list[str]) -> str:
    """Cheap fingerprint of an image tree: names, sizes and mtimes of every file."""
    h = hashlib.sha1(str(split_dir.resolve()).encode())
    dirs = check_classes(split_dir, classes)
    for cls in classes:
        with os.scandir(dirs[cls]) as it:
            for e in sorted(it, key=lambda e: e.name):
                if e.is_file():
                    st = e.stat()
                    h.update(f"{cls}/{e.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return "tree:" + h.hexdigest()


def decode_tree(split_dir: Path, classes: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``split_dir/<class>/*`` into uint8 (N, 3, size, size) and int64 labels (class order = ``classes``)."""
    dirs = check_classes(split_dir, classes)
    files: list[tuple[Path, int]] = []
    for label, cls in enumerate(classes):
        found = _image_files(dirs[cls])
        if not found:
            raise DataError(f"no images in '{dirs[cls]}'; every class folder needs image files ({', '.join(IMG_EXT)}).")
        files += [(f, label) for f in found]
    x = np.empty((len(files), 3, size, size), dtype=np.uint8)
    y = np.fromiter((label for _, label in files), dtype=np.int64, count=len(files))
    log.info("decoding %d images from %s (once; cached afterwards)", len(files), split_dir)
    for i, (f, _) in enumerate(files):
        try:
            with Image.open(f) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise DataError(f"unreadable image '{f}' ({one_line(err)}); remove or replace it.") from None
        if arr.shape != (size, size, 3):
            raise DataError(f"image '{f}' is {arr.shape[1]}x{arr.shape[0]}, not {size}x{size}; CIFAR-10 images must be {size}x{size}.")
        x[i] = arr.transpose(2, 0, 1)
    return x, y


def find_split_dir(base: Path, split: str, *, archive_split: str | None = None) -> Path | None:
    """``base/<split>`` or ``base/*/<split>``; for a per-split archive also ``base`` or ``base/*`` holding class folders."""
    subdirs = [p for p in sorted(base.iterdir()) if p.is_dir() and not p.name.startswith(".")] if base.is_dir() else []
    for cand in [base / split] + [d / split for d in subdirs]:
        if cand.is_dir():
            return cand
    if archive_split == split:
        for cand in [base] + subdirs:
            if cand.is_dir() and set(CIFAR10_CLASSES) <= set(_class_dirs(cand)):
                return cand
    return None


class CIFAR10DataModule(BaseImageDataModule):
    """CIFAR-10 (32x32 RGB, 10 classes, kept in memory as uint8).

    ``root`` may be: torchvision's format (a folder containing ``cifar-10-batches-py``, or that
    folder); an ImageFolder tree ``train/<class>/*.jpg`` + ``test/<class>/*.jpg``; a folder with
    ``train.tar.gz`` and ``test.tar.gz`` of such trees; or a single ``.tar.gz`` of a tree (or of
    ``cifar-10-batches-py``). Archives are extracted once into ``cache_dir`` and JPEG/PNG trees are
    decoded once into uint8 ``.npy`` files there, so later runs load in well under a second.
    Class folders are mapped by name to the standard order (airplane, ..., truck).

    Training augmentation (``augment``, the paper's): replicate-pad 4, random 32x32 crop, random
    horizontal flip. Evaluation: none.

    Args (besides :class:`~datamodules.base.BaseImageDataModule`'s):
        download: let torchvision download its CIFAR-10 format into ``root`` (or ``cache_dir``).
    """

    cache_name = "cifar10"

    def __init__(self, *, download: bool = False, **kwargs) -> None:
        if kwargs.get("class_names") is None and kwargs.get("num_classes", 10) == 10:
            kwargs["class_names"] = list(CIFAR10_CLASSES)
        kwargs.setdefault("mean", [0.4914, 0.4822, 0.4465])
        kwargs.setdefault("std", [0.2470, 0.2435, 0.2616])
        super().__init__(**kwargs)
        self.download = bool(download)
        if self.in_channels != 3 or self.image_size != 32:
            raise DataError(
                f"CIFAR-10 is 3x32x32 but data.in_channels={self.in_channels}, data.image_size={self.image_size}; set 3 and 32."
            )

    # -- locating the data -----------------------------------------------------------------
    def _resolve(self) -> tuple[str, Path]:
        """(kind, path): kind is 'torchvision' (path = torchvision root), 'tree', 'tars' or 'tar'."""
        if not self.root:
            if self.download:
                return "torchvision", self.cache_dir
            raise DataError(f"CIFAR-10 location not set (data.root is null): {HINT}.")
        p = Path(self.root).expanduser()
        if p.is_file() and is_tarball(p):
            return "tar", p
        if p.is_dir():
            if (p / "cifar-10-batches-py").is_dir():
                return "torchvision", p
            if p.name == "cifar-10-batches-py":
                return "torchvision", p.parent
            if (p / "train").is_dir() and (p / "test").is_dir():
                return "tree", p
            if self._split_archive(p, "train") and self._split_archive(p, "test"):
                return "tars", p
        if self.download and not p.is_file():
            return "torchvision", p
        raise DataError(f"CIFAR-10 not found at '{p}': {HINT}.")

    @staticmethod
    def _split_archive(folder: Path, split: str) -> Path | None:
        return next((folder / f"{split}{s}" for s in TAR_SUFFIXES if (folder / f"{split}{s}").is_file()), None)

    # -- loading ---------------------------------------------------------------------------
    def _torchvision(self, base: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
        import torchvision

        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):  # torchvision prints download progress
                ds = torchvision.datasets.CIFAR10(str(base), train=(split == "train"), download=self.download)
        except Exception as err:  # noqa: BLE001 - missing/corrupt files and network errors
            raise DataError(
                f"CIFAR-10 (torchvision format) unusable at '{base}' ({one_line(err)}); fix data.root or set data.download=true."
            ) from None
        finally:
            if out.getvalue().strip():
                log.info("torchvision: %s", one_line(out.getvalue()))
        return np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)), np.asarray(ds.targets, dtype=np.int64)

    def _cached_tree(self, split_dir: Path, cache: Path, split: str, signature: str | None) -> tuple[np.ndarray, np.ndarray]:
        signature = signature or tree_signature(split_dir, CIFAR10_CLASSES)
        hit = load_arrays(cache, split, signature)
        if hit is not None:
            return hit["x"], hit["y"]
        x, y = decode_tree(split_dir, CIFAR10_CLASSES, self.image_size)
        save_arrays(cache, split, signature, x, y)
        log.info("cached decoded CIFAR-10 %s split (%d images) in %s", split, len(x), cache)
        return x, y

    def _from_archive(self, archive: Path, split: str, *, archive_split: str | None) -> tuple[np.ndarray, np.ndarray]:
        cache = source_dir(self.cache_dir, archive)
        signature = "archive:" + file_signature(archive)
        hit = load_arrays(cache, split, signature)
        if hit is not None:
            return hit["x"], hit["y"]
        extracted = cache / "extracted"
        marker = extracted / MARKER
        if marker.is_file() and marker.read_text().strip() != file_signature(archive):
            log.info("archive %s changed since extraction; extracting again", archive)
            shutil.rmtree(extracted)
        extract_once(archive, extracted)
        batches = next((d for d in (extracted / "cifar-10-batches-py", *extracted.glob("*/cifar-10-batches-py")) if d.is_dir()), None)
        if batches is not None:
            return self._torchvision(batches.parent, split)
        split_dir = find_split_dir(extracted, split, archive_split=archive_split)
        if split_dir is None:
            raise DataError(f"no {split}/ folder in archive '{archive}'; it must hold {split}/<class>/*.jpg ({HINT}).")
        return self._cached_tree(split_dir, cache, split, signature)

    def split_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, 3, 32, 32) images and int64 labels of ``split`` ('train' or 'test')."""
        kind, path = self._resolve()
        if kind == "torchvision":
            return self._torchvision(path, split)
        if kind == "tree":
            split_dir = path / split
            return self._cached_tree(split_dir, source_dir(self.cache_dir, path), split, None)
        if kind == "tars":
            archive = self._split_archive(path, split)
            assert archive is not None
            return self._from_archive(archive, split, archive_split=split)
        return self._from_archive(path, split, archive_split=None)

    def _cache_ready(self, split: str) -> bool:
        kind, path = self._resolve()
        if kind == "tree":
            return arrays_ready(source_dir(self.cache_dir, path), split, tree_signature(path / split, CIFAR10_CLASSES))
        if kind in ("tars", "tar"):
            archive = self._split_archive(path, split) if kind == "tars" else path
            assert archive is not None
            return arrays_ready(source_dir(self.cache_dir, archive), split, "archive:" + file_signature(archive))
        return not self.download  # torchvision's format: only a download needs preparing

    def prepare_data(self) -> None:
        # Download / extract / decode once (Lightning runs this on one process per node);
        # setup() then only loads the cached arrays.
        for split in ("train", "test"):
            if not self._cache_ready(split):
                self.split_arrays(split)

    def _build_split(self, split: str) -> tuple[Dataset, int]:
        x, y = self.split_arrays(split)
        if x.shape[1:] != (3, 32, 32) or len(x) != len(y):
            raise DataError(f"CIFAR-10 {split} data at '{self.root}' has shape {x.shape} for {len(y)} labels; expected (N, 3, 32, 32).")
        aug = PadCropFlip(4, flip=True, mode="replicate") if (split == "train" and self.augment) else None
        labels = torch.from_numpy(y)
        found = int(labels.max()) + 1 if len(labels) else 0
        return UInt8ImageDataset(torch.from_numpy(x), labels, aug), found
