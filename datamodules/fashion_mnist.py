"""Fashion-MNIST (28x28 grayscale, 10 classes) from the original IDX files."""

from __future__ import annotations

import gzip
import logging
import os
import struct
from pathlib import Path

import numpy as np
import torch

from .base import BaseImageDataModule, DataError
from .tensor_dataset import PadCropFlip, UInt8ImageDataset

log = logging.getLogger(__name__)

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("bad magic")
        shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
        arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        if arr.size != int(np.prod(shape)):
            raise ValueError("truncated")
        return arr.reshape(shape)
    except (OSError, EOFError, ValueError, struct.error) as err:
        raise DataError(f"corrupt Fashion-MNIST file '{path}' ({err}); re-download it or point data.root elsewhere.") from None


def find_files(root: Path) -> dict[str, Path] | None:
    """Locate the four IDX files (plain or .gz) in root or torchvision's FashionMNIST/raw layout."""
    for d in (root, root / "FashionMNIST" / "raw", root / "fashion-mnist"):
        found = {}
        for key, stem in FILES.items():
            for cand in (d / stem, d / f"{stem}.gz"):
                if cand.is_file():
                    found[key] = cand
                    break
        if len(found) == 4:
            return found
    return None


class FashionMNISTDataModule(BaseImageDataModule):
    """Fashion-MNIST from ``root``, else Debian's copy, else torchvision's download.

    Args (besides :class:`BaseImageDataModule`'s):
        download: allow torchvision to download into ``root`` (or ~/.cache/robustx/datasets).
    """

    def __init__(self, *, download: bool = True, **kwargs) -> None:
        kwargs.setdefault("in_channels", 1)
        kwargs.setdefault("image_size", 28)
        kwargs.setdefault("augment", False)
        super().__init__(**kwargs)
        self.download = download

    def _locate(self) -> dict[str, Path]:
        tried = []
        if self.root:
            root = Path(os.path.expanduser(str(self.root)))
            files = find_files(root)
            if files:
                return files
            tried.append(str(root))
        else:
            files = find_files(Path(DEBIAN_DIR))
            if files:
                return files
            tried.append(DEBIAN_DIR)
        if self.download:
            target = Path(self.root or Path(os.environ.get("ROBUSTX_CACHE", "~/.cache/robustx")).expanduser() / "datasets")
            try:
                import torchvision

                for train in (True, False):
                    torchvision.datasets.FashionMNIST(str(target), train=train, download=True)
            except Exception as err:  # network errors come in many types
                log.warning("Fashion-MNIST download failed: %s", err)
            files = find_files(target)
            if files:
                return files
            tried.append(f"download to {target}")
        raise DataError(
            f"Fashion-MNIST not found (tried {', '.join(tried)}): set data.root to a folder with the four IDX files, "
            "`apt-get install dataset-fashion-mnist`, or allow data.download=true with internet access."
        )

    def _make_datasets(self):
        files = self._locate()
        arrays = {k: read_idx(p) for k, p in files.items()}
        for split in ("train", "test"):
            if len(arrays[f"{split}_images"]) != len(arrays[f"{split}_labels"]):
                raise DataError(f"Fashion-MNIST {split} images and labels differ in length; re-download the files.")
        tr_x = torch.from_numpy(arrays["train_images"].copy())[:, None]  # (N, 1, 28, 28)
        te_x = torch.from_numpy(arrays["test_images"].copy())[:, None]  # (N, 1, 28, 28)
        tr_y = torch.from_numpy(arrays["train_labels"].astype(np.int64))
        te_y = torch.from_numpy(arrays["test_labels"].astype(np.int64))
        aug = PadCropFlip(pad=2, flip=False) if self.augment else None
        found = int(max(tr_y.max(), te_y.max())) + 1
        return UInt8ImageDataset(tr_x, tr_y, aug), UInt8ImageDataset(te_x, te_y), found
