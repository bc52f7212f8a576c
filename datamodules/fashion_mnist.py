"""Fashion-MNIST (28x28 grayscale, 10 classes) read straight from the original IDX files."""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from robustx.utils import one_line

from .base import BaseImageDataModule, DataError
from .tensor_dataset import PadCropFlip, UInt8ImageDataset

log = logging.getLogger(__name__)

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"  # apt-get install dataset-fashion-mnist
FASHION_MNIST_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (gzipped if it ends in .gz) with ``ndim`` dimensions."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
        if len(data) < 4:
            raise ValueError("file too short")
        zero, dtype_code, nd = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08 or nd != ndim:
            raise ValueError(f"bad IDX header (magic {data[:4].hex()}, expected 000008{ndim:02x})")
        header = 4 + 4 * nd
        shape = struct.unpack(f">{nd}I", data[4:header])
        expected = int(np.prod(shape, dtype=np.int64))
        if len(data) - header != expected:
            raise ValueError(f"{len(data) - header} data bytes for shape {shape}, expected {expected}")
        return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)
    except (OSError, EOFError, zlib.error, ValueError, struct.error) as err:
        raise DataError(
            f"corrupt Fashion-MNIST file '{path}' ({one_line(err)}); replace it with a good copy or point data.root elsewhere."
        ) from None


def find_idx_files(root: Path) -> dict[tuple[str, str], Path] | None:
    """The four IDX files (plain or .gz) directly in ``root`` or in torchvision's ``root/FashionMNIST/raw``."""
    for d in (root, root / "FashionMNIST" / "raw"):
        found = {}
        for key, stem in FILES.items():
            for cand in (d / stem, d / f"{stem}.gz"):
                if cand.is_file():
                    found[key] = cand
                    break
        if len(found) == len(FILES):
            return found
    return None


class FashionMNISTDataModule(BaseImageDataModule):
    """Fashion-MNIST: 60,000 train / 10,000 test images, kept in memory as uint8.

    Files are looked for in ``root`` (the four IDX files, directly or in torchvision's
    ``FashionMNIST/raw`` layout) or, when root is null, Debian's ``/usr/share/datasets/fashion-mnist``;
    if missing, torchvision downloads them (into ``root``, or ``cache_dir`` when root is null)
    unless ``download`` is false.
    Training augmentation (``augment``, off by default): random crop with zero padding 2.

    Args (besides :class:`~datamodules.base.BaseImageDataModule`'s):
        download: allow downloading when no local copy is found.
    """

    cache_name = "fashion-mnist"

    def __init__(self, *, download: bool = True, **kwargs) -> None:
        kwargs.setdefault("augment", False)
        kwargs.setdefault("in_channels", 1)
        kwargs.setdefault("image_size", 28)
        kwargs.setdefault("mean", [0.2860])
        kwargs.setdefault("std", [0.3530])
        if kwargs.get("class_names") is None and kwargs.get("num_classes", 10) == 10:
            kwargs["class_names"] = list(FASHION_MNIST_CLASSES)
        super().__init__(**kwargs)
        self.download = bool(download)
        if self.in_channels != 1 or self.image_size != 28:
            raise DataError(
                f"Fashion-MNIST is 1x28x28 but data.in_channels={self.in_channels}, data.image_size={self.image_size}; set 1 and 28."
            )
        self._files: dict[tuple[str, str], Path] | None = None

    def _where(self) -> str:
        if self._files:
            return f"'{self._files['test', 'images'].parent}'"
        return super()._where()

    def _download(self, target: Path) -> None:
        import torchvision

        existing = next((p for p in [target, *target.parents] if p.exists()), None)
        new_top = None if existing == target else next(p for p in [target, *target.parents] if p.parent == existing)
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):  # torchvision prints its progress
                torchvision.datasets.FashionMNIST(str(target), train=True, download=True)
        except Exception as err:  # noqa: BLE001 - network errors come in many types
            log.warning("Fashion-MNIST download to %s failed: %s", target, one_line(err))
            if new_top is not None:  # don't leave empty folders behind a failed download
                shutil.rmtree(new_top, ignore_errors=True)
        finally:
            if out.getvalue().strip():
                log.info("torchvision: %s", one_line(out.getvalue()))

    def locate(self) -> dict[tuple[str, str], Path]:
        """Find (or download) the four IDX files; raises DataError naming every option tried.

        An explicit ``root`` is authoritative (no silent fallback to another copy): the files
        must be there, or are downloaded there. Without ``root``: Debian's copy, then a download
        into ``cache_dir``.
        """
        if self._files is not None:
            return self._files
        tried = []
        root = Path(self.root).expanduser() if self.root else None
        local = root if root is not None else Path(DEBIAN_DIR)
        files = find_idx_files(local)
        if files:
            self._files = files
            return files
        tried.append(f"'{local}'")
        if self.download:
            target = root if root is not None else self.cache_dir
            self._download(target)
            files = find_idx_files(target)
            if files:
                self._files = files
                return files
            tried.append(f"a download to '{target}'")
        else:
            tried.append("no download (data.download=false)")
        raise DataError(
            f"Fashion-MNIST not found (tried {', '.join(tried)}): set data.root to a folder with the four IDX files, "
            "run `apt-get install dataset-fashion-mnist` (and leave data.root null), or set data.download=true with internet access."
        )

    def prepare_data(self) -> None:
        self.locate()  # downloads on one process per node, if needed

    def _build_split(self, split: str) -> tuple[Dataset, int]:
        files = self.locate()
        images = read_idx(files[split, "images"], 3)
        labels = read_idx(files[split, "labels"], 1)
        if images.shape[1:] != (28, 28):
            raise DataError(f"'{files[split, 'images']}' holds {images.shape[1:]} images, not 28x28; it is not Fashion-MNIST.")
        if len(images) != len(labels):
            raise DataError(
                f"'{files[split, 'images']}' has {len(images)} images but '{files[split, 'labels']}' {len(labels)} labels; "
                "replace the mismatched file."
            )
        x = torch.from_numpy(images.copy())[:, None]  # (N, 1, 28, 28) uint8
        y = torch.from_numpy(labels.astype(np.int64))
        aug = PadCropFlip(2, flip=False, mode="constant") if (split == "train" and self.augment) else None
        found = int(y.max()) + 1 if len(y) else 0
        return UInt8ImageDataset(x, y, aug), found
